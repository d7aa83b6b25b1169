"""Model profiles: what the dispatcher knows about one model, and how to reach it.

A profile names a provider, an endpoint and a *reference* to a credential, never the credential
itself: the routing file may be committed, printed and logged. The credential is read only when
a call is about to be made (:func:`resolve_credential`, :func:`provider_target`), is held as a
:class:`~pydantic.SecretStr`, and errors about it name the variable or file, never the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from pointsman_dispatcher.cost import Price
from pointsman_dispatcher.providers.base import AwsCredentials, ProviderName, ProviderTarget

TierName = Literal["small", "medium", "large"]
NAMED_TIER_RANKS: dict[str, int] = {"small": 1, "medium": 2, "large": 3}


class CredentialError(Exception):
    """A credential reference cannot be resolved. The message never holds a secret value."""


@dataclass(frozen=True, slots=True)
class CredentialRef:
    """Where a secret lives: an environment variable or a file (exactly one of the two)."""

    env: str | None = None
    file: Path | None = None

    def describe(self) -> str:
        return f"env {self.env}" if self.env is not None else f"file {self.file}"


@dataclass(frozen=True, slots=True)
class AwsCredentialRefs:
    """AWS access key pair for SigV4 (Bedrock); omitted, the adapter's default chain applies."""

    access_key_id: CredentialRef
    secret_access_key: CredentialRef
    session_token: CredentialRef | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Provider quotas the concurrency layer enforces (None: no limit configured)."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True, slots=True)
class ProviderOptions:
    api_version: str | None = None  # Azure OpenAI (required), Anthropic version header
    deployment: str | None = None  # Azure OpenAI (required)
    region: str | None = None  # AWS Bedrock (required)


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """One routable model. ``tier_rank`` orders the tiers of one family (named tiers: 1-3)."""

    id: str
    provider: ProviderName
    endpoint: str
    model: str
    family: str
    tier: TierName | int
    tier_rank: int
    domains: frozenset[str]
    capabilities: frozenset[str]
    context_window: int
    price: Price
    timeout_s: float
    max_output_tokens: int
    limits: Limits = Limits()
    options: ProviderOptions = ProviderOptions()
    credential: CredentialRef | None = None
    aws_credentials: AwsCredentialRefs | None = None
    system_prompt: str | None = None

    def serves(self, domain: str) -> bool:
        """A model that lists ``general`` serves every domain."""
        return domain in self.domains or "general" in self.domains


def tier_rank(tier: str | int) -> int:
    return tier if isinstance(tier, int) else NAMED_TIER_RANKS[tier]


def resolve_credential(ref: CredentialRef, environ: Mapping[str, str] | None = None) -> SecretStr:
    """Read the secret a reference points at, at call time (I/O: environment or file)."""
    if ref.env is not None:
        value = (os.environ if environ is None else environ).get(ref.env)
        if not value:
            raise CredentialError(f"environment variable {ref.env} is not set or empty")
        return SecretStr(value)
    if ref.file is None:
        raise CredentialError("credential reference names neither env nor file")
    try:
        text = ref.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CredentialError(f"credential file {ref.file} cannot be read: {reason}") from None
    value = text.strip()
    if not value:
        raise CredentialError(f"credential file {ref.file} is empty")
    return SecretStr(value)


def provider_target(
    profile: ModelProfile, environ: Mapping[str, str] | None = None
) -> ProviderTarget:
    """The adapter's view of a profile, with credentials resolved now (raises CredentialError)."""
    api_key = resolve_credential(profile.credential, environ) if profile.credential else None
    aws = None
    if profile.aws_credentials is not None:
        refs = profile.aws_credentials
        token = refs.session_token
        aws = AwsCredentials(
            access_key_id=resolve_credential(refs.access_key_id, environ).get_secret_value(),
            secret_access_key=resolve_credential(refs.secret_access_key, environ),
            session_token=resolve_credential(token, environ) if token else None,
        )
    return ProviderTarget(
        provider=profile.provider,
        base_url=profile.endpoint,
        model=profile.model,
        api_key=api_key,
        timeout_s=profile.timeout_s,
        api_version=profile.options.api_version,
        deployment=profile.options.deployment,
        region=profile.options.region,
        aws=aws,
    )
