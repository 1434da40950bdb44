"""Live scoring and online calibration through the whole pipeline, on a bundled dataset.

Starts what ``rollcast up`` starts (tansu broker, MLflow server), then the ingest and forecast jobs;
replays the first ``--train-fraction`` of a dataset, trains once (``rollcast train --once``, which
promotes a champion), replays the rest so that the forecast job forecasts, scores and calibrates every
closed window, and reads the ``scores`` topic back. Reports, over the scored forecasts issued after a
burn-in of ``--burn-in`` windows per series: the live coverage of the served (calibrated) 80% interval
and of the model's own, MAE and MAE relative to seasonal naive. Also, under ``first_windows``: the
coverage of the 80% interval (the quantile pair 0.1 / 0.9, selected by value) served and the model's
own, over the forecasts the champion issued after the first ``--first`` windows per series it served
(issue 28: "coverage over the first 100 windows after a new champion is promoted"), with the number
of forecast steps counted. The served pair comes from the score messages, the model's own from the
forecast messages' ``model_quantiles`` (the score messages carry only whether the actual fell inside
the model's outer interval). Prints one JSON line.

    PYTHONPATH=. python benchmarks/live_coverage.py --dataset victoria_electricity_halfhourly.csv
    PYTHONPATH=. python benchmarks/live_coverage.py --dataset eu_stocks_daily.csv \\
        --columns symbol,date,close --set window.length_ms=86400000 --set window.target=last \\
        --set model.season=5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from jobs.stack import start_services
from models.scoring.accuracy import LiveTotals, totals_of
from pipeline import replay
from pipeline.config import load_settings
from pipeline.datasets import ColumnMap, load_observations, resolve_dataset
from pipeline.forecasts_io import decode_forecast
from pipeline.replay import wait_for_windows
from pipeline.scores_io import decode_score

INTERVAL = (0.1, 0.9)  # the 80% interval: the quantiles by value, not the outer pair


def read_scores(settings, quiet_s: float) -> list[dict]:
    """Every score message, from the beginning, until none came for ``quiet_s``."""
    return read_topic(settings, settings.topics.scores, decode_score, quiet_s)


def read_topic(settings, topic: str, decode, quiet_s: float) -> list[dict]:
    """Every message of ``topic`` ``decode`` reads (not None), from the beginning, until none came for
    ``quiet_s``."""
    from kafka.structs import TopicPartition

    from pipeline.kafka.clients import make_consumer

    consumer = make_consumer(settings, None)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    out, last = [], time.monotonic()
    while time.monotonic() - last < quiet_s:
        for records in consumer.poll(timeout_ms=500).values():
            for rec in records:
                msg = decode(rec.value)
                if msg is not None:
                    out.append(msg)
            last = time.monotonic()
    consumer.close()
    return out


def skip_to_end(settings, group: str, topic: str) -> None:
    """Commit ``group``'s offsets at the end of every partition of ``topic``."""
    from kafka.structs import TopicPartition

    from pipeline.kafka.clients import make_consumer

    consumer = make_consumer(settings, group)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
    if not parts:
        sys.exit(f"topic {topic} has no partitions")
    consumer.assign(parts)
    consumer.seek_to_end(*parts)
    for tp in parts:
        consumer.position(tp)
    consumer.commit()
    consumer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="victoria_electricity_halfhourly.csv")
    ap.add_argument("--columns", default="series,ts,value", help="series,ts,value column names")
    ap.add_argument("--train-fraction", type=float, default=0.3)
    ap.add_argument("--burn-in", type=int, default=500, help="windows per series after the first live one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting, e.g. model.season=5")
    ap.add_argument("--first", type=int, default=100,
                    help="report the 80%% interval's coverage over the forecasts of the first N windows per series "
                         "the champion served")
    ap.add_argument("--forecast-from", choices=["history", "live"], default="history",
                    help="where the forecast job starts reading the windows topic: its beginning (history: the "
                         "champion forecasts, scores and calibrates on the windows it was trained on first), or "
                         "the first window replayed after training (live: the forecast group's offsets are "
                         "committed at the topic's end before the job starts, as for a champion promoted while "
                         "the pipeline runs)")
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
        if args.forecast_from == "live":
            skip_to_end(settings, settings.groups.forecast, settings.topics.windows)
        st.start_job("forecast")
        replay.replay(settings, live)
        wait_for_windows(settings, live, args.timeout_s)
        scores = read_scores(settings, quiet_s=30)
        forecasts = read_topic(settings, settings.topics.forecasts, decode_forecast, quiet_s=10)
        champion = train.stdout.split("champion -> version", 1)[1].split()[0].strip(" :,.'\"")
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
    first = first_windows(scores, forecasts, champion, args.first, first_live, step)
    print(json.dumps({
        "dataset": args.dataset, "settings": args.set, "series": df["series"].n_unique(),
        "train_fraction": args.train_fraction, "forecast_from": args.forecast_from,
        "scored_forecasts": len(seen), "burn_in_windows": args.burn_in,
        "after_burn_in": after.as_dict(), "during_burn_in": before.as_dict(), "first_windows": first,
        "quantiles": settings.model.quantiles, "wall_s": round(time.monotonic() - t0, 1),
        # which library ran (a check when comparing commits): this process's, and whether the model version
        # was saved with holdout calibration offsets (calibration.json, issue 28) by the train job
        "library": str(Path(replay.__file__).resolve().parent.parent),
        "calibration_json_files": len(list(data_dir.rglob("calibration.json"))),
    }))


def _index(quantiles: list[float], q: float) -> int | None:
    found = [i for i, x in enumerate(quantiles) if abs(float(x) - q) < 1e-9]
    return found[0] if found else None


def first_windows(scores: list[dict], forecasts: list[dict], champion: str, n: int,
                  first_live: dict[str, int], step: int) -> dict:
    """Coverage of the 80% interval (0.1 / 0.9 by value), served and the model's own, over the steps of
    the forecasts ``champion`` issued after the first ``n`` windows per series it served.

    The first ``n`` windows of a series are the ``n`` earliest distinct ``last_window_end`` of the
    champion's forecast messages for it (every forecast issued, scored or not, so that a forecast that
    was never scored is counted as missing, not skipped). A step counts when its score has an actual
    (not a gap). Served values from the score message (``served``, the quantiles served, calibrated or
    not); the model's own from the forecast message (``model_quantiles`` when calibrated, else the served
    ``quantiles``). Inside means ``lo <= actual <= hi`` in float32, as the scorer compares."""
    issued: dict[str, dict[int, dict]] = {}
    for f in forecasts:
        if str((f.get("model") or {}).get("version")) != champion:
            continue
        issued.setdefault(f["series"], {}).setdefault(int(f["last_window_end"]), f)  # a repeat counts once
    by_key: dict[tuple[str, int], dict] = {}
    for msg in scores:
        if msg["model"]["version"] == champion:
            by_key.setdefault((msg["series"], msg["last_window_end"]), msg)
    out = {"windows": n, "model_version": champion, "interval": list(INTERVAL), "series": {},
           "forecasts": 0, "scored_forecasts": 0, "unscored_forecasts": 0, "points": 0,
           "served_inside": 0, "model_inside": 0, "model_inside_flag": 0, "model_inside_flag_points": 0}
    for series, by_end in sorted(issued.items()):
        ends = sorted(by_end)[:n]
        s = {"forecasts": len(ends), "first_origin_vs_first_live_windows":
             (ends[0] - first_live[series]) // step if ends and series in first_live else None,
             "points": 0, "served_inside": 0, "model_inside": 0}
        for end in ends:
            score = by_key.get((series, end))
            if score is None:
                out["unscored_forecasts"] += 1
                continue
            out["scored_forecasts"] += 1
            qs = score["quantiles"]
            lo_s, hi_s = _index(qs, INTERVAL[0]), _index(qs, INTERVAL[1])
            if lo_s is None or hi_s is None or score.get("served") is None:
                raise SystemExit(f"score without the quantiles {INTERVAL} served: {qs}")
            points = by_end[end]["points"]
            own_key = "model_quantiles" if by_end[end].get("calibrated") else "quantiles"
            outer = lo_s == 0 and hi_s == len(qs) - 1  # the score's model_inside is then the model's 80%
            for h, actual in enumerate(score["actual"]):
                if actual is None:
                    continue
                a = np.float32(actual)
                row = score["served"][h]
                if row[lo_s] is None or row[hi_s] is None:
                    raise SystemExit(f"a served quantile is null: {series} {end} h={h + 1}")
                own = points[h][own_key]
                lo_m, hi_m = own.get(f"{INTERVAL[0]:g}"), own.get(f"{INTERVAL[1]:g}")
                if lo_m is None or hi_m is None:
                    raise SystemExit(f"a model quantile is missing or null: {series} {end} h={h + 1}: {own}")
                if points[h]["ts"] != end + h * score["step_ms"]:
                    raise SystemExit(f"forecast and score steps differ: {series} {end} h={h + 1}")
                s["points"] += 1
                s["served_inside"] += bool(np.float32(row[lo_s]) <= a <= np.float32(row[hi_s]))
                s["model_inside"] += bool(np.float32(lo_m) <= a <= np.float32(hi_m))
                if outer:
                    out["model_inside_flag_points"] += 1
                    out["model_inside_flag"] += bool(score["model_inside"][h])
        out["forecasts"] += s["forecasts"]
        for k in ("points", "served_inside", "model_inside"):
            out[k] += s[k]
        s["served_coverage"] = s["served_inside"] / s["points"] if s["points"] else math.nan
        s["model_coverage"] = s["model_inside"] / s["points"] if s["points"] else math.nan
        out["series"][series] = s
    pts = out["points"]
    out["served_coverage"] = out["served_inside"] / pts if pts else math.nan
    out["model_coverage"] = out["model_inside"] / pts if pts else math.nan
    # the score's own flag (the model's outer interval), a check of the forecast messages' join
    flag_pts = out["model_inside_flag_points"]
    out["model_coverage_from_score_flag"] = out["model_inside_flag"] / flag_pts if flag_pts else None
    return out


if __name__ == "__main__":
    main()
