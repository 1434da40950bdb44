"""Compiled against eager inference: one ``models.predict`` call for 1,000 series at L=96, H=24, per model.

Each model (default size, weights perturbed so that its network computes something) is saved as
training saves it (``models.save_model``: weights plus its ONNX graph) and loaded as the forecast job
loads it (``load_saved_model``, ONNX Runtime on ``--threads`` intra-op threads, torch on as many). Then
``--runs`` calls of each path, interleaved (eager, compiled, eager, ...) after a warm-up, so that load
from other processes on the host falls on both alike: the median of each and their ratio, which is what
to read on a busy machine. It also prints the export time and the largest difference between the paths
(relative to the forecast, over every quantile of every series). Models without a graph (the baselines)
show eager only.

    python benchmarks/compiled.py [--runs 20] [--threads 1] [--series 1000] [--models tcn lstm ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import models
from models.serving.forecaster import load_saved_model
from pipeline.runtime import keep_freed_heap

L, H = 96, 24
HOUR = 3_600_000


def perturb(model: models.ForecastModel) -> models.ForecastModel:
    """Weights moved off the zero-initialised head (an untrained model forecasts exactly its base)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both (the job's default: 1)")
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave malloc's thresholds at glibc's defaults (the job raises them: keep_freed_heap)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.glibc_defaults:
        keep_freed_heap()  # as the forecast job: without it eager PyTorch faults its tensors' pages in again
    rng = np.random.default_rng(1)
    ctx = 100 + rng.standard_normal((args.series, L)).cumsum(axis=1)
    ends = 1_700_000_000_000 + HOUR * np.arange(L)
    print(f"torch {torch.__version__}, onnxruntime {ort_version()}, {args.threads} thread(s); {args.series} series, "
          f"L={L}, H={H}, median of {args.runs} interleaved calls"
          f"{'; glibc malloc defaults' if args.glibc_defaults else ''}\n")
    print("| model | export s | eager ms | onnxruntime ms | eager / onnxruntime | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for name in args.models or models.available_models():
        module = perturb(models.create_model(name, context=L, horizon=H, season=24, base_lag=24))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            models.save_model(module, Path(tmp) / name)
            export_s = time.perf_counter() - t0
            loaded = load_saved_model(Path(tmp) / name, "bench")
        paths = {"eager": loaded.module} | ({"onnxruntime": loaded.compiled} if loaded.compiled else {})
        times: dict[str, list[float]] = {k: [] for k in paths}
        out = {}
        for i in range(args.runs + 3):  # 3 warm-up calls each
            for path, runner in paths.items():
                t0 = time.perf_counter()
                out[path] = models.predict(runner, ctx, window_end_ms=ends)
                if i >= 3:
                    times[path].append(1000 * (time.perf_counter() - t0))
        eager = float(np.median(times["eager"]))
        if loaded.compiled is None:
            print(f"| {name} | no graph | {eager:.1f} | - | - | - |", flush=True)
            continue
        ort = float(np.median(times["onnxruntime"]))
        diff = float(np.max(np.abs(out["onnxruntime"] - out["eager"]) / np.maximum(np.abs(out["eager"]), 1e-6)))
        print(f"| {name} | {export_s:.2f} | {eager:.1f} | {ort:.1f} | {eager / ort:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
