"""Benchmark of the classifier model: latency, throughput, memory, cold start.

    make bench-model            # or: .venv/bin/python bench/model.py [--model DIR]

Prints its figures and writes bench/results/model.json. Figures are measured, not asserted:
- single-query latency p50/p99 on texts of at most 32 tokens (int8 ONNX, 1 intra-op thread);
- batch throughput (batches of 64, length-sorted) with 1 thread and with all cores, per core;
- the same architecture in fp32 PyTorch (base weights, same heads) for comparison;
- peak RSS of a fresh process that loads the model and classifies one query (no torch);
- cold start: from launching that process to its first result.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services" / "classifier" / "src"))

from harness import machine, write_result  # noqa: E402

from pointsman_classifier import data  # noqa: E402
from pointsman_classifier.runtime import (  # noqa: E402
    ClassifierModel,
    default_artifact,
    open_session,
)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def test_texts(model: ClassifierModel, limit: int, max_tokens: int | None, seed: int) -> list[str]:
    examples = data.load_all(ROOT.parent / "shared" / "datasets", ROOT / "data" / "natural")
    texts = [e.text for e in examples if e.split == "test"]
    random.Random(seed).shuffle(texts)
    if max_tokens is not None:
        texts = [t for t in texts[: limit * 4] if len(model.tokenizer.encode(t).ids) <= max_tokens]
    return texts[:limit]


def single_latency(model: ClassifierModel, texts: list[str]) -> list[float]:
    for t in texts[:50]:
        model.predict([t])
    out = []
    for t in texts:
        start = time.perf_counter()
        model.predict([t])
        out.append((time.perf_counter() - start) * 1000)
    return out


def throughput(model: ClassifierModel, texts: list[str], batch: int = 64) -> float:
    ordered = sorted(texts, key=len)
    model.predict(ordered[:batch])
    start = time.perf_counter()
    for i in range(0, len(ordered), batch):
        model.predict(ordered[i : i + batch])
    return len(ordered) / (time.perf_counter() - start)


def torch_fp32(model_dir: Path, texts: list[str], threads: int) -> dict[str, float] | None:
    try:
        import torch

        from pointsman_classifier.modeling import TwoHeadClassifier, load_encoder
        from pointsman_classifier.train import default_base
    except ImportError:
        return None
    torch.set_num_threads(threads)
    net = TwoHeadClassifier(load_encoder(default_base())).eval()
    m = ClassifierModel.load(model_dir)
    lat = []
    with torch.inference_mode():
        for t in texts[:20]:
            enc = m.encode([t])
            net(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
        for t in texts:
            start = time.perf_counter()
            enc = m.encode([t])
            net(torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask))
            lat.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}


# VmHWM (peak RSS of this process image), not ru_maxrss: Linux carries ru_maxrss over exec
# from the forked parent, which here holds torch and the data sets.
COLD = """
import sys
from pathlib import Path
from pointsman_classifier.runtime import ClassifierModel
m = ClassifierModel.load(Path(sys.argv[1]))
p = m.predict(["is it legal to bring melatonin into japan"])[0]
hwm = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(p.domain, hwm, "torch" in sys.modules)
"""


def cold_start(model_dir: Path, runs: int = 5) -> dict[str, float]:
    times, rss = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", COLD, str(model_dir)], capture_output=True, text=True, check=True
        )
        times.append(time.perf_counter() - start)
        _domain, maxrss_kb, torch_loaded = out.stdout.split()
        assert torch_loaded == "False", "serving must not import torch"
        rss.append(int(maxrss_kb) / 1024)
    return {
        "cold_start_s_median": statistics.median(times),
        "cold_start_s_max": max(times),
        "peak_rss_mb": max(rss),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_artifact())
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    one = ClassifierModel.load(args.model, intra_op_threads=1)
    short = test_texts(one, args.queries, 32, seed=1)
    mixed = test_texts(one, args.queries * 2, None, seed=2)
    lat = single_latency(one, short)
    tput_1 = throughput(one, mixed)
    # the fast U8S8 kernels, which saturate on x86 CPUs without VNNI (runtime.PRECISE_INT8): what
    # exact int8 costs on this CPU (nothing where the CPU has VNNI)
    fast = ClassifierModel(
        one.directory,
        one.metadata,
        open_session(args.model / "model.onnx", 1, exact_int8=False),
        one.tokenizer,
    )
    lat_fast = single_latency(fast, short[:300])
    tput_fast = throughput(fast, mixed)
    all_cores = ClassifierModel.load(args.model, intra_op_threads=cores)
    tput_all = throughput(all_cores, mixed)
    lat_all = single_latency(all_cores, short[:300])
    fp32 = torch_fp32(args.model, short[:300], threads=1)
    cold = cold_start(args.model)
    result = {
        "model_version": one.version,
        "machine": machine(),
        "single_query": {
            "queries": len(lat),
            "max_tokens": 32,
            "intra_op_threads": 1,
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "mean_ms": statistics.fmean(lat),
        },
        "single_query_all_cores": {
            "p50_ms": percentile(lat_all, 50),
            "p99_ms": percentile(lat_all, 99),
        },
        "batch_throughput": {
            "queries": len(mixed),
            "batch": 64,
            "qps_1_thread": tput_1,
            f"qps_{cores}_threads": tput_all,
            "qps_per_core_best": max(tput_1, tput_all / cores),
        },
        "saturating_int8_1_thread": {
            "p50_ms": percentile(lat_fast, 50),
            "qps": tput_fast,
            "exact_over_saturating_qps": tput_1 / tput_fast,
        },
        "torch_fp32_single_query": fp32,
        "speedup_vs_torch_fp32_p50": (fp32["p50_ms"] / percentile(lat[:300], 50)) if fp32 else None,
        **cold,
        "targets": {
            "p50_ms<=3": percentile(lat, 50) <= 3.0,
            "speedup>=3": bool(fp32 and fp32["p50_ms"] / percentile(lat[:300], 50) >= 3),
            "peak_rss_mb<=250": cold["peak_rss_mb"] <= 250,
            "cold_start_s<=2": cold["cold_start_s_max"] <= 2.0,
        },
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
