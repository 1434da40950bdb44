"""The forecast job's work per batch besides the model: scoring, forecast messages and score messages.

For ``--series`` series (H=24, Q=3, calibration on) it feeds a live :class:`~models.scoring.scorer.Scorer`
one window per series per round, as the forecast job does, with random contexts and forecasts. After
``H + 2`` rounds every round settles a forecast per series, so each timed round does the steady state's
work: ``Scorer.score_batch`` (settle, calibrate, issue), the calibrated forecast messages
(``forecast_message_chunks``, as ``Forecaster.messages`` calls it) and the score messages
(``Emitted.messages``, built off the job's loop since issue 29). It prints the median time of each over
``--rounds`` rounds and the mean size of a message.

The public calls it makes are the same at earlier commits, so a before/after comparison runs this file
against another checkout's modules::

    python benchmarks/messages.py --series 1000
    PYTHONPATH=/path/to/other/checkout python benchmarks/messages.py --series 1000

It reports wall time and the process's CPU time (``time.process_time``, every thread: polars builds the
text on a pool of its own), the steadier figure on a shared host.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from models.scoring.scorer import ModelRef, Scorer
from pipeline.config import load_settings
from pipeline.forecasts_io import forecast_message_chunks

H, L, Q, STEP = 24, 96, (0.1, 0.5, 0.9), 60_000
T0 = 1_700_000_000_000


@dataclass
class Inference:
    """What Scorer.score_batch reads of the forecast job's inference."""

    keys: list
    use: np.ndarray
    contexts: np.ndarray
    preds: np.ndarray
    issued_at: int


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    n = args.series
    settings = load_settings(env={"ROLLCAST_DATA_DIR": tempfile.mkdtemp(prefix="rollcast-messages-")})
    model = ModelRef("tcn", "1", list(Q))
    scorer = Scorer(settings, model, H, STEP)
    rng = np.random.default_rng(0)
    names = [f"s{i:05d}" for i in range(n)]
    times: dict[str, list[tuple[float, float]]] = {"scoring": [], "forecast messages": [], "score messages": []}
    sizes: dict[str, list[float]] = {"forecast messages": [], "score messages": []}
    for r in range(H + 2 + args.rounds):
        end = T0 + r * STEP
        v = rng.normal(100, 5, n)
        table = pa.table({"series": names, "window_start": [end - STEP] * n, "window_end": [end] * n,
                          "count": [5] * n, "first": v, "last": v, "min": v - 1, "max": v + 1, "mean": v,
                          "sum": 5 * v})
        preds = np.sort(rng.normal(100, 5, (n, H, len(Q))), axis=-1).astype(np.float32)
        inference = Inference([(s, end) for s in names], np.arange(n), rng.normal(100, 5, (n, L)), preds,
                              int(time.time() * 1000))
        t0 = time.perf_counter(), time.process_time()
        batch = scorer.score_batch(inference, [table], [0], "mean", 24)
        t1 = time.perf_counter(), time.process_time()
        forecasts = [m for g in batch.forecasts()
                     for chunk in forecast_message_chunks([names[i] for i in g.index.tolist()],
                                                          np.full(len(g.index), end), g.served, g.model, STEP,
                                                          g.issued_at, 250, model_preds=g.model_q)
                     for m in chunk]
        t2 = time.perf_counter(), time.process_time()
        scores = batch.emitted.messages()
        t3 = time.perf_counter(), time.process_time()
        if r < H + 2:
            continue
        assert len(forecasts) == n and len(scores) == n, (len(forecasts), len(scores))
        for name, (a, b) in zip(times, ((t0, t1), (t1, t2), (t2, t3)), strict=True):
            times[name].append((b[0] - a[0], b[1] - a[1]))
        sizes["forecast messages"].append(np.mean([len(v) for _, v in forecasts]))
        sizes["score messages"].append(np.mean([len(v) for _, v in scores]))
    print(f"{n} series, H={H}, Q={len(Q)}, calibrated; median of {args.rounds} rounds\n")
    print("| work per batch | wall ms | CPU ms | bytes per message |")
    print("|---|---|---|---|")
    for name, took in times.items():
        wall, cpu = np.median(np.array(took), axis=0) * 1000
        size = f"{np.mean(sizes[name]):.0f}" if name in sizes else "-"
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {size} |")


if __name__ == "__main__":
    main()
