"""Serving the model: int8 ONNX + tokenizer + metadata, no torch.

An artifact is a folder with ``model.onnx``, ``tokenizer.json`` and ``metadata.json``. The
metadata lists the sha256 of the other two files and :meth:`ClassifierModel.load` refuses a folder
whose files do not match, so a half-copied or tampered model never serves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Tokenizer

from pointsman_classifier.buckets import DEFAULT_MAX_ROWS, DEFAULT_SLACK, length_buckets
from pointsman_classifier.calibrate import decide_risk, softmax

ARTIFACT_FILES = ("model.onnx", "tokenizer.json")


class ArtifactError(RuntimeError):
    pass


def default_artifact() -> Path:
    return Path(str(resources.files("pointsman_classifier").joinpath("artifact")))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# onnxruntime's fused SkipLayerNormalization kernel is slower on this model than the Add and
# LayerNormalization it replaces: measured 744 -> 840 queries/s on one thread and 1,074 -> 1,158 on
# two with the fusion off (test-split mix, int8 artifact; the profile had it at 15% of the time).
SLOW_FUSIONS = ["SkipLayerNormFusion"]

# On x86 CPUs without VNNI (AVX2, AVX-512F: AMD EPYC before Zen 4, many Xeons) onnxruntime's
# fast U8S8 matrix multiplication adds pairs of u8 x s8 products in 16 bits, which saturate.
# This option makes it convert the int8 weights so the products are exact (U8U8), as they are on
# VNNI CPUs, so the model decides the same on every CPU and `make eval` reproduces the card.
# Measured on an AVX2-only EPYC: without it, natural test self_harm recall 0.823 -> 0.805 and the
# stored thresholds no longer recompute; the cost in speed is in docs/classifier.md.
PRECISE_INT8 = "session.x64quantprecision"
# The x86 CPU features that decide which int8 kernels onnxruntime runs: AVX2 or AVX-512F alone
# (the saturating U8S8 path that PRECISE_INT8 replaces), VNNI, or AMX (much faster).
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Which of :data:`INT8_CPU_FLAGS` this CPU has (empty where /proc/cpuinfo says nothing), so
    that figures measured on it can say what they were measured with."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return [f for f in INT8_CPU_FLAGS if f in flags]


def inference_environment() -> dict[str, Any]:
    """What the model's figures depend on besides the artifact: the runtime and the CPU."""
    return {"onnxruntime": ort.__version__, "cpu_int8_features": int8_cpu_features()}


def open_session(
    path: Path, intra_op_threads: int = 1, *, exact_int8: bool = True
) -> ort.InferenceSession:
    """An onnxruntime CPU session with all graph optimizations except :data:`SLOW_FUSIONS`, and
    exact int8 matrix products on every x86 CPU (:data:`PRECISE_INT8`; ``exact_int8=False`` only
    for the benchmark that measures what exactness costs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry(PRECISE_INT8, "1" if exact_int8 else "0")
    return ort.InferenceSession(
        str(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=SLOW_FUSIONS,
    )


@dataclass(frozen=True)
class Prediction:
    domain: str
    risk: str
    domain_probs: dict[str, float]
    risk_probs: dict[str, float]
    confidence: float
    ambiguous: bool
    truncated: bool
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "risk": self.risk,
            "confidence": round(self.confidence, 6),
            "ambiguous": self.ambiguous,
            "truncated": self.truncated,
            "domain_probs": {k: round(v, 6) for k, v in self.domain_probs.items()},
            "risk_probs": {k: round(v, 6) for k, v in self.risk_probs.items()},
            "model_version": self.model_version,
        }


@dataclass(frozen=True)
class Encoded:
    input_ids: NDArray[np.int64]
    attention_mask: NDArray[np.int64]
    truncated: list[bool]


def pad_ids(ids: Sequence[Sequence[int]]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Right-pad token id lists to the longest one; 1 marks real tokens in the mask."""
    longest = max(len(x) for x in ids)
    arr = np.zeros((len(ids), longest), dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for i, x in enumerate(ids):
        arr[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return arr, mask


def _pad(encodings: Sequence[Any]) -> Encoded:
    ids, mask = pad_ids([e.ids for e in encodings])
    return Encoded(ids, mask, [bool(e.overflowing) for e in encodings])


class ClassifierModel:
    def __init__(
        self,
        directory: Path,
        metadata: dict[str, Any],
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
    ) -> None:
        self.directory = directory
        self.metadata = metadata
        self.session = session
        self.tokenizer = tokenizer
        self.domains: tuple[str, ...] = tuple(metadata["labels"]["domain"])
        self.risks: tuple[str, ...] = tuple(metadata["labels"]["risk"])
        self.max_length = int(metadata["max_length"])
        self.version = str(metadata["model_version"])
        self.t_domain = float(metadata["calibration"]["temperature_domain"])
        self.t_risk = float(metadata["calibration"]["temperature_risk"])
        thresholds = metadata["calibration"]["risk_thresholds"]
        self.risk_thresholds = np.array([1.0] + [thresholds[r] for r in self.risks[1:]])
        self.ambiguity_threshold = float(metadata["calibration"]["ambiguity_threshold"])

    @classmethod
    def load(
        cls, directory: Path | None = None, *, intra_op_threads: int = 1, verify: bool = True
    ) -> ClassifierModel:
        directory = directory or default_artifact()
        meta_path = directory / "metadata.json"
        if not meta_path.is_file():
            raise ArtifactError(f"no metadata.json in {directory}: not a classifier artifact")
        metadata = json.loads(meta_path.read_text())
        if verify:
            for name in ARTIFACT_FILES:
                expected = metadata["files"].get(name)
                path = directory / name
                if not path.is_file():
                    raise ArtifactError(f"{path} is missing")
                actual = sha256_file(path)
                if actual != expected:
                    raise ArtifactError(
                        f"{path}: sha256 {actual} does not match metadata {expected}"
                    )
        session = open_session(directory / "model.onnx", intra_op_threads)
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=int(metadata["max_length"]))
        return cls(directory, metadata, session, tokenizer)

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Token ids padded to the longest text of the batch (dynamic padding)."""
        return _pad(self.tokenizer.encode_batch(list(texts)))

    def chunks(
        self, texts: Sequence[str], max_rows: int = DEFAULT_MAX_ROWS, slack: float = DEFAULT_SLACK
    ) -> Iterator[tuple[list[int], Encoded]]:
        """The texts tokenized once and cut into chunks of similar token length
        (:func:`~pointsman_classifier.buckets.length_buckets`), each padded only to its own
        longest text, with the input positions of its rows. Serving, calibration and evaluation
        all run the model this way: dynamic int8 scales activations per chunk, so the chunking
        is part of what the model outputs."""
        encodings = self.tokenizer.encode_batch(list(texts))
        for chunk in length_buckets([len(e.ids) for e in encodings], max_rows, slack):
            yield chunk, _pad([encodings[i] for i in chunk])

    def with_graph(self, path: Path) -> ClassifierModel:
        """The same tokenizer and calibration over another ONNX graph (e.g. the fp32 export)."""
        return ClassifierModel(self.directory, self.metadata, open_session(path), self.tokenizer)

    def logits(self, encoded: Encoded) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        domain, risk = self.session.run(
            ["domain_logits", "risk_logits"],
            {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask},
        )
        return np.asarray(domain, dtype=np.float64), np.asarray(risk, dtype=np.float64)

    def predict(
        self, texts: Sequence[str], max_rows: int = DEFAULT_MAX_ROWS, slack: float = DEFAULT_SLACK
    ) -> list[Prediction]:
        """Predictions in input order, computed chunk by chunk (:meth:`chunks`)."""
        out: list[Prediction | None] = [None] * len(texts)
        for chunk, encoded in self.chunks(texts, max_rows, slack):
            domain_logits, risk_logits = self.logits(encoded)
            predictions = self.decide(domain_logits, risk_logits, encoded.truncated)
            for i, p in zip(chunk, predictions, strict=True):
                out[i] = p
        return [p for p in out if p is not None]

    def decide(
        self,
        domain_logits: NDArray[np.float64],
        risk_logits: NDArray[np.float64],
        truncated: Sequence[bool],
    ) -> list[Prediction]:
        dp = softmax(domain_logits, self.t_domain)
        rp = softmax(risk_logits, self.t_risk)
        risk_idx = decide_risk(rp, self.risk_thresholds)
        out = []
        for i in range(len(dp)):
            d = int(dp[i].argmax())
            confidence = float(dp[i, d])
            out.append(
                Prediction(
                    domain=self.domains[d],
                    risk=self.risks[int(risk_idx[i])],
                    domain_probs={k: float(v) for k, v in zip(self.domains, dp[i], strict=True)},
                    risk_probs={k: float(v) for k, v in zip(self.risks, rp[i], strict=True)},
                    confidence=confidence,
                    ambiguous=confidence < self.ambiguity_threshold,
                    truncated=truncated[i],
                    model_version=self.version,
                )
            )
        return out
