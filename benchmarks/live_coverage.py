"""Live scoring and online calibration through the whole pipeline, on a bundled dataset.

Starts what ``rollcast up`` starts (tansu broker, MLflow server), then the ingest and forecast jobs;
replays the first ``--train-fraction`` of a dataset, trains once (``rollcast train --once``, which
promotes a champion), replays the rest so that the forecast job forecasts, scores and calibrates every
closed window, and reads the ``scores`` topic back. Reports, over the scored forecasts issued after a
burn-in of ``--burn-in`` windows per series: the live coverage of the served (calibrated) 80% interval
and of the model's own, MAE and MAE relative to seasonal naive. Prints one JSON line.

    PYTHONPATH=. python benchmarks/live_coverage.py --dataset victoria_electricity_halfhourly.csv
    PYTHONPATH=. python benchmarks/live_coverage.py --dataset eu_stocks_daily.csv \\
        --columns symbol,date,close --set window.length_ms=86400000 --set window.target=last \\
        --set model.season=5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from jobs.stack import start_services
from models.scoring.accuracy import LiveTotals, totals_of
from pipeline import replay
from pipeline.config import load_settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.replay import wait_for_windows
from pipeline.scores_io import decode_score


def read_scores(settings, quiet_s: float) -> list[dict]:
    """Every score message, from the beginning, until none came for ``quiet_s``."""
    from kafka.structs import TopicPartition

    from pipeline.kafka.clients import make_consumer

    consumer = make_consumer(settings, None)
    topic = settings.topics.scores
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out, last = [], time.monotonic()
    while time.monotonic() - last < quiet_s:
        for records in consumer.poll(timeout_ms=500).values():
            for rec in records:
                msg = decode_score(rec.value)
                if msg is not None:
                    out.append(msg)
            last = time.monotonic()
    consumer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="victoria_electricity_halfhourly.csv")
    ap.add_argument("--columns", default="series,ts,value", help="series,ts,value column names")
    ap.add_argument("--train-fraction", type=float, default=0.3)
    ap.add_argument("--burn-in", type=int, default=500, help="windows per series after the first live one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, e.g. model.season=5")
    ap.add_argument("--timeout-s", type=float, default=1800)
    args = ap.parse_args()

    for item in args.set:
        key, value = item.split("=", 1)
        os.environ["ROLLCAST_" + key.upper().replace(".", "__")] = value
    data_dir = Path(tempfile.mkdtemp(prefix="rollcast-live-"))
    os.environ["ROLLCAST_DATA_DIR"] = str(data_dir)
    os.environ["ROLLCAST_TRAIN__EVERY_MINUTES"] = "100000"  # one champion: the calibration is what is measured
    settings = load_settings()
    series_col, ts_col, value_col = args.columns.split(",")
    df = load_observations(resolve_dataset(args.dataset), ColumnMap(series_col, ts_col, value_col))
    cut = df["ts"].quantile(args.train_fraction, "nearest")
    history, live = df.filter(pl.col("ts") <= cut), df.filter(pl.col("ts") > cut)

    t0 = time.monotonic()
    st = start_services(settings, None)
    try:
        settings = settings.replace(**{"kafka.bootstrap_servers": st.bootstrap_servers,
                                       "mlflow.tracking_uri": st.tracking_uri})
        st.start_job("ingest")
        replay.replay(settings, history)
        wait_for_windows(settings, history, args.timeout_s)
        train = subprocess.run(st.job_argv("train", "--once"), env=st.job_env("train"), timeout=args.timeout_s,
                               capture_output=True, text=True)
        if train.returncode != 0:
            sys.exit(f"train --once failed:\n{train.stderr[-3000:]}")
        if "champion -> version" not in train.stdout:  # nothing to serve: the forecast job would wait
            sys.exit(f"train --once promoted no champion (try a larger --train-fraction):\n{train.stdout[-3000:]}")
        st.start_job("forecast")
        replay.replay(settings, live)
        wait_for_windows(settings, live, args.timeout_s)
        scores = read_scores(settings, quiet_s=30)
    finally:
        st.stop()
    if not scores:
        sys.exit(f"no scores were published; see {data_dir / 'logs'}")

    step = settings.window.length_ms
    first_live = {s: (t // step + 1) * step for s, t in live.group_by("series").agg(pl.col("ts").min()).iter_rows()}
    seen: set[tuple] = set()
    after, before = LiveTotals(), LiveTotals()
    for msg in scores:
        key = (msg["series"], msg["last_window_end"], msg["model"]["version"])
        if key in seen:  # a repeat (identical values)
            continue
        seen.add(key)
        burned = msg["last_window_end"] >= first_live[msg["series"]] + args.burn_in * step
        (after if burned else before).add(totals_of(msg))
    print(json.dumps({
        "dataset": args.dataset, "settings": args.set, "series": df["series"].n_unique(),
        "scored_forecasts": len(seen), "burn_in_windows": args.burn_in,
        "after_burn_in": after.as_dict(), "during_burn_in": before.as_dict(),
        "quantiles": settings.model.quantiles, "wall_s": round(time.monotonic() - t0, 1),
    }))


if __name__ == "__main__":
    main()
