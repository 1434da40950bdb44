"""Training throughput of the default TCN (L=96, H=24) on batches of 256 drawn by ``WindowSamples``, with
``N`` torch threads: forward, backward and an Adam step for 20 s; prints samples/s.

    PYTHONPATH=. python benchmarks/train_threads.py 1
    PYTHONPATH=. python benchmarks/train_threads.py 2
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from models import create_model
from models.data import SeriesMatrix
from models.train.sampling import WindowSamples


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    model = create_model("tcn", context=96, horizon=24)
    print(sum(p.numel() for p in model.parameters()), "params")
    rng = np.random.default_rng(0)
    matrix = SeriesMatrix([f"s{i}" for i in range(100)], rng.normal(10, 1, (100, 3000)).astype(np.float32),
                          np.arange(3000) * 3_600_000, 3_600_000)
    samples = WindowSamples(matrix, 96, 24, calendar=False, span=(96, 3000), budget=4096, seed=0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 20:
        x, y = samples.__getitems__(list(range(n % 3840, n % 3840 + 256)))
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 256
    print(sys.argv[1], "threads:", round(n / (time.perf_counter() - t)), "samples/s")


if __name__ == "__main__":
    main()
