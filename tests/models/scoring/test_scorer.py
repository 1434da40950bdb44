"""Live scoring (models.scoring.scorer.Scorer), pure logic: scores equal an offline computation, do not depend on
batching, survive a save and load, and repeats are sent as first served; the per-step errors
(models.scoring.scorer.point_errors) against a hand computation, their sums equal to those of the messages
built from them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.scoring.accuracy import totals_of
from models.scoring.scorer import ModelRef, Scorer, point_errors, score_totals, seasonal_naive
from pipeline.config import load_settings
from pipeline.scores_io import decode_score, score_messages

STEP, H, Q = 10, 3, [0.1, 0.5, 0.9]
NAN = math.nan
MODEL = ModelRef("tcn", "1", Q)


def settings(**env: str):
    return load_settings(env={f"ROLLCAST_{k}": v for k, v in env.items()})


def stream(n_series: int = 3, n: int = 30, seed: int = 0):
    """Windows (series, end, value) in time order with a gap, and a model forecast for each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for k in range(n_series):
            value = np.nan if (k == 1 and i == 7) else float(10 * k + rng.normal())
            base = 10 * k
            preds = np.array([[base - 0.5, base, base + 0.5]] * H) + rng.normal(0, 0.1, (H, 1))
            rows.append((f"s{k}", 1000 + i * STEP, value, np.sort(preds, axis=1), np.full(H, base + 0.2)))
    return rows


def run_all(scorer: Scorer, rows, batch: int):
    """Feed ``rows`` in batches of ``batch`` windows; every forecast sent and every score."""
    sent, scores = {}, []
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        out = scorer.run([r[0] for r in part], np.array([r[1] for r in part]), np.array([r[2] for r in part]),
                         np.zeros(len(part), dtype=np.int32), np.arange(len(part)),
                         np.stack([r[3] for r in part]).astype(np.float32), np.stack([r[4] for r in part]),
                         issued_at=lo)
        for g in out.issued:
            for j, served, model_q in zip(g.index.tolist(), g.served, g.model_q, strict=True):
                sent.setdefault((part[j][0], part[j][1]), []).append((served.copy(), model_q.copy(), g.model.version))
        scores += out.scores
    return sent, scores


def offline_scores(rows, sent):
    """The score of each forecast whose horizon has passed, computed from the sent forecasts and actuals."""
    actual = {(s, e): v for s, e, v, _, _ in rows}
    last = max(e for _, e, _, _, _ in rows)
    out = {}
    for (s, e), [(served, model_q, _)] in sent.items():
        if e + H * STEP > last:
            continue
        pts = []
        for h in range(H):
            y = actual[(s, e + (h + 1) * STEP)]
            q = served[h].astype(float)
            if np.isnan(y):
                pts.append(None)
                continue
            pin = [max(t * (y - qq), (t - 1) * (y - qq)) for t, qq in zip(Q, q, strict=True)]
            pts.append((abs(y - q[1]), pin, bool(q[0] <= y <= q[2]), bool(model_q[h, 0] <= y <= model_q[h, 2])))
        out[(s, e)] = pts
    return out


def as_tuples(scores):
    out = {}
    for m in scores:
        key = (m["series"], m["last_window_end"])
        assert key not in out
        out[key] = [None if a is None else (err, pin, inside, model_inside)
                    for a, err, pin, inside, model_inside in zip(m["actual"], m["abs_error"], m["pinball"],
                                                                 m["inside"], m["model_inside"], strict=True)]
    return out


def test_scores_equal_an_offline_computation_over_the_sent_forecasts() -> None:
    rows = stream()
    sent, scores = run_all(Scorer(settings(), MODEL, H, STEP), rows, batch=3)
    got, want = as_tuples(scores), offline_scores(rows, sent)
    assert set(got) == set(want) and len(got) == 3 * (30 - H)
    for key in want:
        for g, w in zip(got[key], want[key], strict=True):
            if w is None:
                assert g is None  # the gap window: no actual, no errors
                continue
            assert g[0] == pytest.approx(w[0], abs=1e-6) and g[1] == pytest.approx(w[1], abs=1e-6)
            assert g[2:] == w[2:]
    m = next(m for m in scores if m["series"] == "s0")
    assert m["naive"][0] == pytest.approx(0.2) and m["calibrated"] is True and len(m["actual"]) == H
    for m in scores:  # the served quantiles as sent, to the bit (float32 written as float32)
        [(served, _, _)] = sent[(m["series"], m["last_window_end"])]
        np.testing.assert_array_equal(np.array(m["served"], dtype=np.float32), served)
        assert m["forecast"] == [float(x) for x in served[:, 1]]


def test_scores_and_served_quantiles_do_not_depend_on_batching() -> None:
    rows = stream()
    one = run_all(Scorer(settings(), MODEL, H, STEP), rows, batch=1)
    many = run_all(Scorer(settings(), MODEL, H, STEP), rows, batch=len(rows))  # many windows per series
    assert as_tuples(one[1]) == as_tuples(many[1])
    for key in one[0]:
        np.testing.assert_array_equal(one[0][key][0][0], many[0][key][0][0])
    assert any(not np.array_equal(v[0][0], v[0][1]) for v in one[0].values())  # calibration moved some


def test_a_saved_state_resumes_with_the_same_scores_and_forecasts() -> None:
    rows = stream()
    whole = run_all(Scorer(settings(), MODEL, H, STEP), rows, batch=3)
    first = Scorer(settings(), MODEL, H, STEP)
    a = run_all(first, rows[:45], batch=3)
    saved = first.save(0, offset=45)
    second = Scorer(settings(), MODEL, H, STEP)  # a restarted process
    assert second.load(0, saved) == 45
    b = run_all(second, rows[45:], batch=3)
    assert as_tuples(a[1] + b[1]) == as_tuples(whole[1])
    for key, [(served, _, _)] in b[0].items():
        np.testing.assert_array_equal(served, whole[0][key][0][0])


def test_a_state_saved_before_the_experts_loads_with_every_expert_at_its_offset() -> None:
    """Scoring state format 1 (one offset per series, step and quantile, and the settled windows), as a
    forecast job saved it before this version: read, every expert starting from the offset."""
    import io
    import json

    scorer = Scorer(settings(), MODEL, H, STEP)
    run_all(scorer, stream(), batch=3)
    with np.load(io.BytesIO(scorer.save(0, offset=7)), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("cal_")}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    n = len(meta["series"])
    offsets = np.random.default_rng(1).normal(size=(n, H, len(Q))) * np.array([1.0, 0.0, 1.0])
    updates = np.arange(n * H).reshape(n, H)
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps({**meta, "format": 1}).encode(), dtype=np.uint8),
             offsets=offsets, updates=updates, **arrays)
    again = Scorer(settings(), MODEL, H, STEP)
    assert again.load(0, buf.getvalue()) == 7
    rows = np.array([again.rows[s] for s in meta["series"]])
    np.testing.assert_array_equal(again.tracker.experts[rows], np.repeat(offsets[..., None], 3, axis=-1))
    np.testing.assert_array_equal(again.tracker.updates[rows], updates)
    assert (again.tracker.guard[rows] == 0).all() and np.allclose(again.tracker.weights[rows], 1 / 3)


def test_a_repeated_window_is_sent_as_first_served_and_settles_nothing_again() -> None:
    rows = stream(n_series=1, n=12)
    scorer = Scorer(settings(), MODEL, H, STEP)
    sent, scores = run_all(scorer, rows, batch=1)
    again = rows[9:11]  # ingest produced two windows again after a crash
    out = scorer.run([r[0] for r in again], np.array([r[1] for r in again]), np.array([r[2] for r in again]),
                     np.zeros(2, dtype=np.int32), np.arange(2), np.stack([r[3] for r in again]).astype(np.float32) + 5,
                     np.stack([r[4] for r in again]), issued_at=99)
    assert not out.scores
    [g] = out.issued
    for j, served in zip(g.index.tolist(), g.served, strict=True):
        np.testing.assert_array_equal(served, sent[(again[j][0], again[j][1])][0][0])
    assert g.issued_at.tolist() == [9, 10]  # as first issued
    stale = rows[:1]  # older than the ring: already sent, not sent again
    out = scorer.run(["s0"], np.array([stale[0][1]]), np.array([1.0]), np.zeros(1, dtype=np.int32), np.arange(1),
                     stale[0][3][None].astype(np.float32), stale[0][4][None], issued_at=100)
    assert out.repeats_not_held == 1 and not out.issued


def test_calibration_brings_an_overconfident_model_to_its_nominal_coverage() -> None:
    rng = np.random.default_rng(1)
    scorer = Scorer(settings(), MODEL, H, STEP)
    n, inside, model_inside = 3000, [], []
    for i in range(n):
        y = rng.normal()
        preds = np.array([[[-0.3, 0.0, 0.3]] * H], dtype=np.float32)  # claims 80%, covers ~24%
        out = scorer.run(["x"], np.array([i * STEP]), np.array([y]), np.zeros(1, dtype=np.int32), np.arange(1),
                         preds, np.zeros((1, H)), issued_at=i)
        for m in out.scores:
            inside += m["inside"]
            model_inside += m["model_inside"]
    burn = 3 * 500
    assert np.mean(model_inside[burn:]) < 0.3
    assert abs(np.mean(inside[burn:]) - 0.8) < 0.03


def test_without_calibration_the_model_quantiles_are_served() -> None:
    rows = stream()
    sent, scores = run_all(Scorer(settings(CALIBRATION__ENABLED="false"), MODEL, H, STEP), rows, batch=3)
    for [(served, model_q, _)] in sent.values():
        np.testing.assert_array_equal(served, model_q)
    assert all(m["calibrated"] is False for m in scores)


def test_a_new_champion_only_its_own_forecasts_update_the_calibration() -> None:
    rows = stream(n_series=1, n=10)
    scorer = Scorer(settings(), MODEL, H, STEP)
    run_all(scorer, rows[:6], batch=1)
    before = scorer.tracker.offsets.copy()
    scorer.serve(ModelRef("tcn", "2", Q))
    # the next window settles only forecasts of version 1: scored, but the offsets stay
    out = scorer.run(["s0"], np.array([rows[6][1]]), np.array([rows[6][2]]), np.zeros(1, dtype=np.int32),
                     np.arange(0), np.zeros((0, H, 3), dtype=np.float32), np.zeros((0, H)), issued_at=0)
    assert [m["model"]["version"] for m in out.scores] == ["1"]
    np.testing.assert_array_equal(scorer.tracker.offsets, before)
    reset = Scorer(settings(CALIBRATION__ON_NEW_CHAMPION="reset"), MODEL, H, STEP)
    run_all(reset, rows[:6], batch=1)
    reset.serve(ModelRef("tcn", "2", Q))
    assert not reset.tracker.offsets.any()


def test_seasonal_naive_takes_the_value_one_season_back() -> None:
    ctx = np.arange(10, dtype=float)[None]
    assert seasonal_naive(ctx, 5, 3).tolist() == [[7, 8, 9, 7, 8]]
    assert seasonal_naive(ctx, 2, 1).tolist() == [[9, 9]]
    assert seasonal_naive(ctx, 2, 50).tolist() == [[0, 1]]  # a season longer than the context: all of it


def test_the_live_sums_of_a_batch_equal_those_of_its_messages() -> None:
    rows = stream()
    scorer = Scorer(settings(), MODEL, H, STEP)
    for lo in range(0, len(rows), 15):
        part = rows[lo:lo + 15]
        out = scorer.run([r[0] for r in part], np.array([r[1] for r in part]), np.array([r[2] for r in part]),
                         np.zeros(len(part), dtype=np.int32), np.arange(len(part)),
                         np.stack([r[3] for r in part]).astype(np.float32), np.stack([r[4] for r in part]), issued_at=1)
        sums = out.emitted.totals()
        assert len(sums) == len(out.scores)
        for (version, origin, t), msg in zip(sums, out.scores, strict=True):
            assert (version, origin) == (msg["model"]["version"], msg["last_window_end"])
            want = totals_of(msg)
            assert (t.points, t.inside, t.model_inside) == (want.points, want.inside, want.model_inside)
            assert t.abs_error == pytest.approx(want.abs_error) and t.sq_error == pytest.approx(want.sq_error)
            assert t.naive_abs_error == pytest.approx(want.naive_abs_error)


def batch():
    """Two forecasts of three steps: a gap at (0, 1), seasonal naive unknown at (1, 2)."""
    actual = np.array([[5.0, NAN, 7.0], [1.0, 2.0, 3.0]])
    served = np.array([[[4.0, 5.5, 6.0], [0.0, 1.0, 2.0], [6.5, 8.0, 9.0]],
                       [[0.0, 1.0, 2.0], [2.5, 3.0, 4.0], [1.0, 2.0, 2.5]]])
    model_q = np.array([[[5.2, 5.5, 5.8], [0.0, 1.0, 2.0], [7.5, 8.0, 8.5]],
                        [[0.5, 1.0, 1.5], [1.0, 3.0, 5.0], [2.9, 3.0, 3.1]]], dtype=np.float32)
    naive = np.array([[4.0, 4.0, 4.0], [0.5, 0.5, NAN]], dtype=np.float32)
    return actual, served, model_q, naive


def test_the_errors_of_each_step_by_hand() -> None:
    e = point_errors(*batch(), Q)
    assert e.known.tolist() == [[True, False, True], [True, True, True]]
    assert e.abs_error[0, [0, 2]].tolist() == [0.5, 1.0] and e.abs_error[1].tolist() == [0.0, 1.0, 1.0]
    assert e.sq_error[0, [0, 2]].tolist() == [0.25, 1.0] and e.sq_error[1].tolist() == [0.0, 1.0, 1.0]
    # pinball of (actual 5, served 4 / 5.5 / 6): 0.1 * 1, 0.5 * 0.5, 0.1 * 1
    assert e.pinball[0, 0].tolist() == pytest.approx([0.1, 0.25, 0.1])
    assert e.inside[0, [0, 2]].tolist() == [True, True] and e.inside[1].tolist() == [True, False, False]
    assert e.model_inside[0, [0, 2]].tolist() == [False, False] and e.model_inside[1].tolist() == [True, True, True]
    assert e.naive_abs_error[0, [0, 2]].tolist() == [1.0, 3.0] and math.isnan(e.naive_abs_error[1, 2])


def test_the_sums_by_hand_and_as_the_messages_give_them() -> None:
    actual, served, model_q, naive = batch()
    first, second = score_totals(actual, served, model_q, naive, Q)
    assert (first.points, first.abs_error, first.sq_error, first.naive_abs_error, first.inside,
            first.model_inside) == (2, 1.5, 1.25, 4.0, 2, 0)
    # seasonal naive unknown at the last step: it adds nothing to naive's sum (relative MAE uses the same points)
    assert (second.points, second.abs_error, second.sq_error, second.naive_abs_error, second.inside,
            second.model_inside) == (3, 2.0, 2.0, 2.0, 1, 3)
    e = point_errors(actual, served, model_q, naive, Q)
    messages = score_messages(["a", "b"], np.array([100, 100]), [("tcn", "1")], np.array([0, 0]), np.array([7, 7]),
                              10, True, Q, actual=actual, served=served, naive=naive, model_inside=e.model_inside)
    for i, ((series, value), want) in enumerate(zip(messages, e.totals(), strict=True)):
        msg = decode_score(value)
        assert msg is not None and msg["series"] == series
        assert totals_of(msg) == want
        # the errors the reader derives are the scorer's, to the bit
        known = e.known[i]
        for name in ("abs_error", "sq_error", "inside", "model_inside", "naive_abs_error"):
            want_col = [x.item() if k and not (isinstance(x.item(), float) and math.isnan(x)) else None
                        for x, k in zip(getattr(e, name)[i], known, strict=True)]
            assert msg[name] == want_col, name
        assert msg["pinball"] == [row.tolist() if k else None for row, k in zip(e.pinball[i], known, strict=True)]
