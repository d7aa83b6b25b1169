"""Training checkpoints, so that a stopped `pointsman train` picks up where it was.

One training run takes about 40 minutes per seed on a CPU with fast int8/fp32 units and about
2 hours on an AVX2-only one; a soup takes that per seed. A process that is stopped (a preempted
host, a session's time limit, Ctrl-C) should not lose that work. Every ``every`` optimizer steps
the model, optimizer, scheduler and random-number states are written here atomically, and each
seed's finished fp32 export is kept; the same command run again resumes bit-for-bit, because the
batch order of an epoch is rebuilt from the RNG state saved at its start.

A checkpoint belongs to one run: its key hashes the data fingerprint and every training setting
that changes the weights, so a checkpoint of another run is never resumed (it is replaced).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("pointsman.train")

# TrainConfig fields that do not change the weights one seed produces.
NOT_IN_KEY = frozenset(
    {
        "shared_dir",
        "natural_dir",
        "out_dir",
        "keep_fp32",
        "checkpoint_dir",
        "checkpoint_every",
        "calibration_cap",
        "agreement_rows",
        "soup",
        "seed",
    }
)


def run_key(settings: dict[str, Any], data_fingerprint: str, seed: int) -> str:
    """What one seed's weights depend on: the data, the settings that shape training, the seed."""
    kept = {k: str(v) for k, v in sorted(settings.items()) if k not in NOT_IN_KEY}
    blob = json.dumps({"data": data_fingerprint, "seed": seed, "settings": kept}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpoints:
    """The checkpoint folder of one training run: ``seed-<n>.pt`` (the latest state of a seed
    still training), ``member-<n>.onnx`` (a seed's finished fp32 export) and ``keys.json``."""

    def __init__(self, directory: Path, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint interval must be at least 1 step, got {every}")
        self.directory = directory
        self.every = every
        self.directory.mkdir(parents=True, exist_ok=True)

    def _keys(self) -> dict[str, str]:
        path = self.directory / "keys.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _matches(self, seed: int, key: str) -> bool:
        return self._keys().get(str(seed)) == key

    def _claim(self, seed: int, key: str) -> None:
        """Record that this seed's files now belong to the run ``key``."""
        keys = self._keys()
        if keys.get(str(seed)) != key:
            for stale in (self.state_path(seed), self.member_path(seed)):
                stale.unlink(missing_ok=True)
            keys[str(seed)] = key
            blob = json.dumps(keys, indent=2).encode()
            _replace_atomic(self.directory / "keys.json", lambda tmp: tmp.write_bytes(blob))

    def state_path(self, seed: int) -> Path:
        return self.directory / f"seed-{seed}.pt"

    def member_path(self, seed: int) -> Path:
        return self.directory / f"member-{seed}.onnx"

    def finished_member(self, seed: int, key: str) -> Path | None:
        """The seed's fp32 export if this run already finished it."""
        path = self.member_path(seed)
        return path if self._matches(seed, key) and path.is_file() else None

    def load(self, seed: int, key: str) -> dict[str, Any] | None:
        """The latest saved training state of this run's seed, if any; files of another run
        for the same seed are removed."""
        import torch

        if not self._matches(seed, key):
            if self.state_path(seed).exists() or self.member_path(seed).exists():
                log.info("checkpoint of seed %d belongs to another run: starting afresh", seed)
            self._claim(seed, key)
            return None
        path = self.state_path(seed)
        if not path.is_file():
            return None
        state: dict[str, Any] = torch.load(path, weights_only=False)
        log.info("resuming seed %d at step %d from %s", seed, state["step"], path)
        return state

    def save(self, seed: int, key: str, state: dict[str, Any]) -> None:
        import torch

        self._claim(seed, key)
        _replace_atomic(self.state_path(seed), lambda tmp: torch.save(state, tmp))

    def finish(self, seed: int, key: str, fp32: Path) -> None:
        """Keep the seed's export; its training state is no longer needed."""
        self._claim(seed, key)
        _replace_atomic(self.member_path(seed), lambda tmp: shutil.copyfile(fp32, tmp))
        self.state_path(seed).unlink(missing_ok=True)

    def clear(self) -> None:
        """The artifact is written: nothing here is needed any more."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _replace_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through a temporary file beside it, so a stop never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    os.replace(tmp, path)
