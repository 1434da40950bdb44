"""`rollcast scores` against a real broker.

The score messages here are scripted by the test (in pipeline/scores_io.py's format 2, and some in the
format before it, as a topic holds them after an upgrade), not produced by the forecast job: the
command's figures are checked against sums computed here from the same scripted actuals, forecasts and
intervals, independently of pipeline/scores_io.py.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import random
import re
import signal
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import Settings, load_settings
from tests.support import rollcast, start_rollcast, wait_for

STEP = 3_600_000
BASE = 472_222 * STEP  # an hour boundary in November 2023
QUANTILES = [0.1, 0.5, 0.9]
IDLE = ("--idle-ms", "1000")


@pytest.fixture
def scores_settings(test_env: dict[str, str]) -> Iterator[Settings]:
    """Settings with a scores topic of this test's own."""
    from pipeline.kafka.clients import ensure_topics

    test_env["ROLLCAST_TOPICS__SCORES"] = f"scores-{uuid.uuid4().hex[:10]}"
    s = load_settings(env=test_env)
    ensure_topics(s, [s.topics.scores])
    yield s
    delete_topic(s, s.topics.scores)


def delete_topic(s: Settings, topic: str) -> None:
    """Delete a test's own topic; a failure is logged, never the test's."""
    from pipeline.kafka.clients import make_admin

    admin = make_admin(s)
    try:
        admin.delete_topics([topic])
    except Exception as e:  # noqa: BLE001 - cleanup must not fail the test
        logging.getLogger(__name__).warning("could not delete the test topic: %s", e)
    finally:
        admin.close()


def f32(x: float) -> float:
    """``x`` rounded to float32, as the forecast job's values are (format 2 carries float32)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def raw_points(rng: random.Random, gap: bool = False) -> list[tuple | None]:
    """Three steps of (actual, forecast, served lo, served hi, model lo, model hi, naive); None: a gap."""
    out: list[tuple | None] = []
    for h in range(3):
        if gap and h == 1:
            out.append(None)
            continue
        actual = rng.uniform(0, 10)
        forecast = actual + rng.uniform(-2, 2)
        half, model_half = rng.uniform(0.3, 2.5), rng.uniform(0.2, 1.5)
        out.append(tuple(f32(x) for x in (actual, forecast, forecast - half, forecast + half, forecast - model_half,
                                          forecast + model_half, actual + rng.uniform(-3, 3))))
    return out


def message(series: str, model: str, version: str, k: int, raw: list[tuple | None], fmt: int = 2) -> dict:
    end = BASE + k * STEP
    head = {"series": series, "last_window_end": end, "model": {"name": model, "version": version},
            "issued_at": end + 1000, "step_ms": STEP, "calibrated": True, "quantiles": QUANTILES}
    if fmt == 2:
        return {"format": 2, **head, "actual": [None if r is None else r[0] for r in raw],
                "served": [[1.0, 1.0, 1.0] if r is None else [r[2], r[1], r[3]] for r in raw],
                "naive": [None if r is None else r[6] for r in raw],
                "model_inside": [None if r is None else r[4] <= r[0] <= r[5] for r in raw]}
    points = []
    for h, r in enumerate(raw, start=1):
        ts = end + (h - 1) * STEP
        if r is None:
            points.append({"h": h, "ts": ts, "actual": None, "forecast": 1.0, "abs_error": None, "sq_error": None,
                           "pinball": None, "inside": None, "model_inside": None, "naive": None,
                           "naive_abs_error": None})
            continue
        actual, forecast, lo, hi, mlo, mhi, naive = r
        points.append({"h": h, "ts": ts, "actual": actual, "forecast": forecast, "abs_error": abs(actual - forecast),
                       "sq_error": (actual - forecast) ** 2, "pinball": {"0.1": 0.0, "0.5": 0.0, "0.9": 0.0},
                       "inside": lo <= actual <= hi, "model_inside": mlo <= actual <= mhi, "naive": naive,
                       "naive_abs_error": abs(actual - naive)})
    return {**head, "points": points}


def expected(entries: list[tuple[str, str, str, int, list, int]]) -> dict:
    """Per version: per series and for all series, the figures computed from the raw points."""
    rows: dict[str, dict[str, list]] = {}
    for series, _model, version, k, raw, _fmt in entries:
        for key in (series, "all series"):
            rows.setdefault(version, {}).setdefault(key, []).append((k, raw))
    out: dict = {}
    for version, by_series in rows.items():
        for key, items in by_series.items():
            known = [r for _, raw in items for r in raw if r is not None]
            err = [abs(a - f) for a, f, *_ in known]
            naive = [abs(a - n) for a, *_, n in known]
            out[(version, key)] = {
                "forecasts": len(items), "points": len(known), "mae": sum(err) / len(err),
                "rmse": math.sqrt(sum(e * e for e in err) / len(err)), "relative_mae": sum(err) / sum(naive),
                "coverage": sum(lo <= a <= hi for a, _, lo, hi, *_ in known) / len(known),
                "model_coverage": sum(mlo <= a <= mhi for a, _, _, _, mlo, mhi, _ in known) / len(known),
                "last_window_end": BASE + max(k for k, _ in items) * STEP,
            }
    return out


def produce(settings: Settings, values: list[bytes | dict]) -> None:
    from pipeline.kafka.clients import make_producer

    producer = make_producer(settings)
    try:
        for v in values:
            if isinstance(v, dict):
                producer.send(settings.topics.scores, key=v["series"].encode(), value=json.dumps(v).encode())
            else:
                producer.send(settings.topics.scores, key=b"junk", value=v)
        producer.flush(timeout=30)
    finally:
        producer.close()


def figures(doc: dict) -> dict:
    out = {}
    for v in doc["versions"]:
        for r in [*v["series"], v["all_series"]]:
            assert r["version"] == v["version"]
            out[(v["version"], r["series"])] = r
    return out


def check(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, w in want.items():
        for name, value in w.items():
            assert got[key][name] == pytest.approx(value, rel=1e-9), (key, name)


def scripted() -> list[tuple[str, str, str, int, list, int]]:
    """Version 1 (tcn) scored for series a and b after windows 0-3, version 2 (lstm) for a after 2-4;
    one gap step. Version 1's first three windows in the format before format 2 (written before an
    upgrade), the rest in format 2."""
    rng = random.Random(7)
    entries = [(s, "tcn", "1", k, raw_points(rng, gap=(s, k) == ("b", 2)), 1 if k < 3 else 2)
               for k in range(4) for s in ("a", "b")]
    entries += [("a", "lstm", "2", k, raw_points(rng), 2) for k in range(2, 5)]
    return entries


def test_scores_table_json_plot_and_filters(scores_settings: Settings, test_env: dict[str, str],
                                            tmp_path: Path) -> None:
    entries = scripted()
    msgs = [message(*e) for e in entries]
    # a restarted forecast job republishes a score with the same values; a stray record is not a score
    produce(scores_settings, [*msgs[:5], msgs[2], b"not a score", *msgs[5:], msgs[-1]])

    r = rollcast("scores", "--json", *IDLE, env=test_env)
    assert r.returncode == 0, r.stderr
    check(figures(json.loads(r.stdout)), expected(entries))
    assert [v["nominal_coverage"] for v in json.loads(r.stdout)["versions"]] == pytest.approx([0.8, 0.8])

    png = tmp_path / "live.png"
    r = rollcast("scores", "--plot", str(png), *IDLE, env=test_env)
    assert r.returncode == 0, r.stderr
    assert f"wrote {png}" in r.stdout
    lines = r.stdout.splitlines()
    for (version, series), w in expected(entries).items():
        title = lines.index(f"model {'tcn' if version == '1' else 'lstm'} v{version}: live accuracy, "
                            "nominal coverage 0.80")
        row = next(line for line in lines[title:] if line.startswith(f"{series} "))
        assert re.split(r"\s{2,}", row) == [
            series, str(w["forecasts"]), str(w["points"]), f"{w['mae']:.4g}", f"{w['relative_mae']:.3f}",
            f"{w['coverage']:.3f}", f"{w['model_coverage']:.3f}",
            dt.datetime.fromtimestamp(w["last_window_end"] / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    r = rollcast("scores", "--json", "--series", "b", "--last-windows", "2", *IDLE, env=test_env)
    assert r.returncode == 0, r.stderr
    check(figures(json.loads(r.stdout)), expected([e for e in entries if e[0] == "b" and e[3] >= 2]))

    r = rollcast("scores", "--json", "--last-windows", "2", *IDLE, env=test_env)
    assert r.returncode == 0, r.stderr
    newest = {"1": 3, "2": 4}  # per version, its last two windows
    check(figures(json.loads(r.stdout)), expected([e for e in entries if e[3] >= newest[e[2]] - 1]))


def test_scores_with_none_yet_and_follow(scores_settings: Settings, test_env: dict[str, str],
                                         tmp_path: Path) -> None:
    r = rollcast("scores", *IDLE, env=test_env)
    assert r.returncode == 0, r.stderr
    assert "no scores yet" in r.stdout

    entries = scripted()
    produce(scores_settings, [message(*e) for e in entries[:3]])
    log = tmp_path / "follow.log"
    proc = start_rollcast("scores", "--follow", "--json", *IDLE, env=test_env, log=log)
    try:
        def docs() -> list[dict]:  # the complete JSON lines printed so far
            text = log.read_text()
            return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.startswith("{")]

        wait_for(lambda: docs(), 60, "the first report")
        check(figures(docs()[0]), expected(entries[:3]))
        produce(scores_settings, [message(*entries[3])])
        wait_for(lambda: len(docs()) >= 2, 30, "a report with the score produced after the command started")
        check(figures(docs()[-1]), expected(entries[:4]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_scores_anomalies_lists_the_anomalies_topic_once_each(test_env: dict[str, str]) -> None:
    """Anomaly messages (pipeline.anomalies_io's format, as the scorer builds them; not produced by the
    forecast job here) on a topic of the test's own, one repeated and one stray record among them."""
    import numpy as np

    from pipeline.anomalies_io import anomaly_messages
    from pipeline.kafka.clients import ensure_topics, make_producer

    test_env["ROLLCAST_TOPICS__ANOMALIES"] = f"anomalies-{uuid.uuid4().hex[:10]}"
    s = load_settings(env=test_env)
    ensure_topics(s, [s.topics.anomalies])
    hour = 3_600_000
    msgs = anomaly_messages(["a", "b", "a"], np.array([5 * hour, 2 * hour, 9 * hour]), np.array([9.5, -4.0, 12.25]),
                            np.zeros(3), np.full(3, -2.0), np.full(3, 2.0), np.array([1e-5, 3e-3, 1e-9]), 0.98,
                            [("tcn", "1"), ("tcn", "2")], np.array([0, 0, 1]), np.array([1, 2, 3]), hour)
    producer = make_producer(s)
    try:
        for key, value in [*msgs, msgs[0], ("junk", b"{not an anomaly")]:
            producer.send(s.topics.anomalies, key=key.encode(), value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()
    try:
        r = rollcast("scores", "--anomalies", "--json", *IDLE, env=test_env)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert [(m["series"], m["ts"], m["side"], m["model"]["version"]) for m in got] == [
            ("b", 2 * hour, "below", "1"), ("a", 5 * hour, "above", "1"), ("a", 9 * hour, "above", "2")]
        assert got[1]["actual"] == 9.5 and got[1]["lower"] == -2.0 and got[1]["tail_probability"] == 1e-5
        r = rollcast("scores", "--anomalies", "--series", "a", *IDLE, env=test_env)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 2 and all(line.startswith("a  ") for line in lines), r.stdout
        assert "actual 9.5 above the 98% interval [-2, 2]" in lines[0] and "v2" in lines[1]
    finally:
        delete_topic(s, s.topics.anomalies)
