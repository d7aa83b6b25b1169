"""`pointsman local-llm`: weights verified before loading, and the real model over real HTTP.

The integrity tests use small files and run in milliseconds. The serving tests start the command
in a subprocess with the real Qwen2.5-Coder-0.5B GGUF (about 1-4 s to load on 2 threads) and keep
every generation at 16 tokens or fewer.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from pointsman_dispatcher.local_llm import (
    DEFAULT_ALIASES,
    MODEL_SHA256,
    MODEL_SIZE,
    ModelIntegrityError,
    Stamp,
    assemble,
    part_paths,
    prepare_model,
    read_stamp,
    stamp_path,
    stamp_vouches,
    verify,
)

POINTSMAN = str(Path(sys.executable).with_name("pointsman"))
START_TIMEOUT_S = 120.0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- integrity (fast) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stamp", "vouches"),
    [
        (Stamp("ab" * 32, 10, 5), True),
        (Stamp("AB" * 32, 10, 5), False),  # digests are recorded lower-case
        (Stamp("cd" * 32, 10, 5), False),  # recorded for another digest
        (Stamp("ab" * 32, 11, 5), False),  # the file grew or shrank since
        (Stamp("ab" * 32, 10, 6), False),  # the file was rewritten since
        (None, False),
    ],
)
def test_a_stamp_vouches_only_for_the_same_digest_size_and_mtime(
    stamp: Stamp | None, vouches: bool
) -> None:
    assert stamp_vouches(stamp, "AB" * 32, size=10, mtime_ns=5) is vouches


def test_a_corrupted_gguf_is_refused_before_loading(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelIntegrityError, match="refusing to load") as caught:
        prepare_model(gguf=bad, sha256=MODEL_SHA256)
    assert _sha(bad.read_bytes()) in str(caught.value)
    assert not stamp_path(bad).exists()


def test_the_command_refuses_a_corrupted_gguf_without_serving(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    started = time.monotonic()
    done = subprocess.run(
        [POINTSMAN, "local-llm", "--port", "0", "--gguf", str(bad), "--sha256", MODEL_SHA256],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""  # no base URL: nothing was served
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    refused = [e for e in events if e["msg"] == "model refused"]
    assert refused and "does not match" in refused[0]["why"]
    assert not any(e["msg"] == "local model ready" for e in events)
    assert time.monotonic() - started < 30


def test_a_user_gguf_needs_its_sha256(tmp_path: Path) -> None:
    own = tmp_path / "own.gguf"
    own.write_bytes(b"weights")
    with pytest.raises(ModelIntegrityError, match="--sha256"):
        prepare_model(gguf=own)


def test_a_verified_file_is_stamped_and_rehashed_once_it_changes(tmp_path: Path) -> None:
    model = tmp_path / "own.gguf"
    model.write_bytes(b"good weights")
    digest = _sha(b"good weights")
    assert verify(model, digest) is True  # hashed, then stamped
    stamp = read_stamp(model)
    assert stamp is not None and stamp.sha256 == digest and stamp.size == 12
    assert verify(model, digest) is False  # the stamp vouches: no hashing
    model.write_bytes(b"evil weights")  # same size, new mtime
    os.utime(model, ns=(stamp.mtime_ns + 1_000_000, stamp.mtime_ns + 1_000_000))
    with pytest.raises(ModelIntegrityError, match="does not match"):
        verify(model, digest)


def test_a_forged_stamp_does_not_vouch_for_another_digest(tmp_path: Path) -> None:
    model = tmp_path / "own.gguf"
    model.write_bytes(b"other weights")
    st = model.stat()
    stamp_path(model).write_bytes(
        orjson.dumps({"sha256": "ab" * 32, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    )
    with pytest.raises(ModelIntegrityError):
        verify(model, "cd" * 32)


def test_assembly_concatenates_in_order_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    parts = []
    for n, body in enumerate([b"one-", b"two-", b"three"], start=1):
        part = tmp_path / f"part{n:02d}.bin"
        part.write_bytes(body)
        parts.append(part)
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelIntegrityError, match="does not verify"):
        assemble(parts, target, expected_sha256=_sha(b"three-two-one-"))
    assert list((tmp_path / "cache").iterdir()) == []  # no partial or temp file
    assemble(parts, target, expected_sha256=_sha(b"one-two-three"))
    assert target.read_bytes() == b"one-two-three"
    assert verify(target, _sha(b"one-two-three")) is False  # recorded at assembly


def test_the_pinned_parts_add_up_to_the_model_size() -> None:
    paths = part_paths()
    assert [p.name for p in paths] == [f"part{n:02d}.bin" for n in range(1, 7)]
    assert sum(p.stat().st_size for p in paths) == MODEL_SIZE


# --- the real model over HTTP ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(*extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start `pointsman local-llm` on a free port; return it and the base URL it printed."""
    port = _free_port()
    proc = subprocess.Popen(
        [POINTSMAN, "local-llm", "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    started = time.monotonic()
    line = proc.stdout.readline().strip()  # printed only once /v1/models answered
    if not line:
        proc.kill()
        proc.wait()
        pytest.fail(f"local-llm exited with {proc.returncode} before announcing readiness")
    assert time.monotonic() - started < START_TIMEOUT_S
    assert line == f"http://127.0.0.1:{port}/v1"
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    proc, url = _start()
    try:
        yield url
    finally:
        _stop(proc)


def test_models_lists_every_demo_alias(base_url: str) -> None:
    body = httpx.get(f"{base_url}/models", timeout=10).json()
    assert body["object"] == "list"
    assert set(body["data"][0]["aliases"]) == set(DEFAULT_ALIASES)


def test_a_chat_completion_answers_with_openai_usage(base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/chat/completions",
        json={
            "model": "local-code",
            "messages": [
                {"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What does the Python len() function return?"},
            ],
            "max_tokens": 16,
            "temperature": 0,
        },
        timeout=60,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10
    assert 1 <= usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_streamed_chat_completion_sends_sse_chunks_then_done(base_url: str) -> None:
    lines: list[str] = []
    with httpx.stream(
        "POST",
        f"{base_url}/chat/completions",
        json={
            "model": "local-code",
            "messages": [{"role": "user", "content": "Name one sorting algorithm."}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
        },
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) >= 2
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()


def test_sigterm_stops_the_server_cleanly() -> None:
    proc, url = _start("--alias", "local-code", "--ctx-size", "512", "--parallel", "1")
    names = httpx.get(f"{url}/models", timeout=10).json()["data"][0]["aliases"]
    assert names == ["local-code"]
    assert _stop(proc) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models", timeout=2)
