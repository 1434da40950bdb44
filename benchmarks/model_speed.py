"""Training throughput and batched inference latency of every model at its default size.

For each registered model: training samples/s (Lightning fit, 1 epoch over
synthetic sine samples) and the latency of one plain-PyTorch ``predict`` call
for 1,000 series at L=96, H=24 (p50/p99 over --runs calls after a warm-up).
Usage: python benchmarks/model_speed.py [--runs N] [--train-samples N] [--threads N] [--models NAME ...]
[--inference-only] (``--threads 1`` is what the forecast job uses by default; the process sets
glibc's malloc thresholds as the job does, see ``keep_freed_heap``; ``--inference-only`` skips the
training column).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from models import available_models, create_model, predict
from models.data import Samples
from models.train.fit import fit
from pipeline.runtime import keep_freed_heap

L, H, SERIES = 96, 24, 1000


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1000, size=(n, 1)) + np.arange(L + H)
    return 10 + 3 * np.sin(2 * np.pi * t / 24) + 0.3 * rng.standard_normal(t.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--train-samples", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    parser.add_argument("--inference-only", action="store_true", help="skip training (no samples/s column)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_heap()  # as the forecast job: without it each call faults its tensors' pages in again
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {SERIES} series, L={L}, H={H}\n")
    print("| model | parameters | train samples/s | inference p50 ms | inference p99 ms |")
    print("|---|---|---|---|---|")
    ctx = synthetic(SERIES, seed=1)[:, :L]
    for name in args.models or available_models():
        model = create_model(name, context=L, horizon=H, season=24, base_lag=24)
        n_params = sum(p.numel() for p in model.parameters())
        if args.inference_only:
            rate = "skipped"
        elif model.trainable:
            s = synthetic(args.train_samples)
            train = Samples(s[:, :L, None].astype(np.float32), s[:, L:].astype(np.float32))
            rate = f"{fit(model, train, None, max_epochs=1, batch_size=256).samples_per_s:,.0f}"
        else:
            rate = "no training"
        for _ in range(3):
            predict(model, ctx)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            predict(model, ctx)
            times.append(1000 * (time.perf_counter() - t0))
        p50, p99 = np.percentile(times, [50, 99])
        print(f"| {name} | {n_params:,} | {rate} | {p50:.1f} | {p99:.1f} |", flush=True)


if __name__ == "__main__":
    main()
