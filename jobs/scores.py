"""Print the live accuracy of the served forecasts, per series and model version, from the scores topic.

Reads the scores topic (one message per forecast whose windows have all closed, README "Message
formats"; messages of the format before "format": 2, kept on the topic, are read too) from the
beginning to its end, and prints per model version a table of every series:
forecasts and points scored, MAE (and RMSE in --json), MAE relative to seasonal naive's on the same points,
coverage of the served (calibrated) outer interval, coverage of the model's own interval, and the
last window end of the newest forecast scored, with an "all series" row. A score published again (a restarted forecast job
repeats some with the same values) is counted once: one per series, model version and
last_window_end. --last-windows N keeps, per version, the forecasts issued in the last N windows
(the version's newest scored forecast and the N-1 windows before it). --series only reads the
partitions of those series. --json prints the same figures as one JSON document. --plot FILE
writes a PNG of MAE and coverage per window over time for each version, with the nominal coverage.
--follow keeps reading and prints (and plots) again as scores arrive, until Ctrl-C or SIGTERM.
With no scores yet it says so and exits 0.

--anomalies lists the anomalies topic instead: every settled actual outside the served anomalies.level
interval (README "Anomalies"), oldest first, one line each (series, window start, actual, the served
interval, side, tail probability, model version), counted once per series, window and version; with
--json as a JSON list, with --follow as they arrive.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from models.scoring.report import Scores, as_json, format_tables, plot, summarise
from pipeline.config import Settings

HELP = "print live accuracy per series and model version from the scores topic"

REPRINT_S = 1.0  # --follow prints at most this often


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series", nargs="+", metavar="S", help="only these series")
    parser.add_argument("--last-windows", type=int, metavar="N",
                        help="per model version, only forecasts issued in its last N windows")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--follow", action="store_true",
                        help="keep reading and print again as scores arrive, until Ctrl-C or SIGTERM")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="write MAE and coverage over time to a PNG")
    parser.add_argument("--anomalies", action="store_true",
                        help="list the anomalies topic (actuals outside the served anomalies.level interval)")
    parser.add_argument("--idle-ms", type=int, default=1500,
                        help="the topic's end: no record for this long (default 1500)")


def report(scores: Scores, args: argparse.Namespace) -> bool:
    """Print (and plot) the figures; False when there is no score to report."""
    chosen = scores.selected(args.last_windows)
    if not chosen:
        which = f" for {', '.join(args.series)}" if args.series else ""
        print(json.dumps({"versions": []}) if args.json else f"no scores yet{which}", flush=True)
        return False
    summary = summarise(chosen)
    if args.json:
        print(as_json(summary), flush=True)
    else:
        print(format_tables(summary), flush=True)
    if args.plot:
        plot(chosen, args.plot)
        if not args.json:
            print(f"wrote {args.plot}", flush=True)
    return True


def run(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.kafka.clients import poll_promptly
    from pipeline.kafka.readers import open_at_beginning, read_to_end
    from pipeline.runtime import Shutdown

    if args.last_windows is not None and args.last_windows < 1:
        raise ConfigError("--last-windows must be at least 1")
    if args.anomalies:
        return list_anomalies(settings, args)
    topic = settings.topics.scores
    consumer = open_at_beginning(settings, topic, args.series)
    if consumer is None:
        print(json.dumps({"versions": []}) if args.json else
              f"no scores yet: topic {topic} does not exist on {settings.kafka.bootstrap_servers}", flush=True)
        return 0
    scores = Scores(set(args.series) if args.series else None)
    try:
        read_to_end(consumer, args.idle_ms, scores.add_value)
        report(scores, args)
        if not args.follow:
            return 0
        shutdown = Shutdown("scores")  # SIGTERM and Ctrl-C end the loop at its next poll
        pending, printed_at = False, time.monotonic()
        while not shutdown.requested:
            for records in poll_promptly(consumer, 500).values():
                for rec in records:
                    pending |= scores.add_value(rec.value)
            if pending and time.monotonic() - printed_at >= REPRINT_S:
                report(scores, args)
                pending, printed_at = False, time.monotonic()
        if pending:
            report(scores, args)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def anomaly_line(m: dict) -> str:
    """One anomaly, for people."""
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(m["ts"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    p = m["tail_probability"]
    return (f"{m['series']}  {when}  actual {m['actual']:.6g} {m['side']} the {m['level']:.0%} interval "
            f"[{m['lower']:.6g}, {m['upper']:.6g}] (forecast {m['forecast']:.6g}), tail probability "
            f"{p:.3g}  model {m['model']['name']} v{m['model']['version']}")


def list_anomalies(settings: Settings, args: argparse.Namespace) -> int:
    """``rollcast scores --anomalies``: the anomalies topic, read from the beginning (module docstring)."""
    from pipeline.anomalies_io import decode_anomaly
    from pipeline.kafka.clients import poll_promptly
    from pipeline.kafka.readers import open_at_beginning, read_to_end
    from pipeline.runtime import Shutdown

    topic = settings.topics.anomalies
    wanted = set(args.series) if args.series else None
    consumer = open_at_beginning(settings, topic, args.series)
    if consumer is None:
        print("[]" if args.json else f"no anomalies yet: topic {topic} does not exist", flush=True)
        return 0
    seen: set[tuple[str, int, str]] = set()
    found: list[dict] = []

    def add(value: bytes | None) -> bool:
        m = decode_anomaly(value)
        if m is None or (wanted is not None and m["series"] not in wanted):
            return False
        key = (m["series"], m["ts"], m["model"]["version"])
        if key in seen:  # a restarted forecast job may publish one again, with the same values
            return False
        seen.add(key)
        found.append(m)
        if args.follow and not args.json:
            print(anomaly_line(m), flush=True)
        return True

    try:
        read_to_end(consumer, args.idle_ms, add)
        found.sort(key=lambda m: (m["ts"], m["series"]))
        if args.json:
            print(json.dumps(found), flush=True)
        elif not args.follow:
            print("\n".join(anomaly_line(m) for m in found) if found else "no anomalies", flush=True)
        if not args.follow:
            return 0
        shutdown = Shutdown("scores")
        while not shutdown.requested:
            for records in poll_promptly(consumer, 500).values():
                for rec in records:
                    if add(rec.value) and args.json:
                        print(json.dumps(found[-1]), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
