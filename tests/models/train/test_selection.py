"""The promotion rule: at most the best eligible candidate is promoted."""

from __future__ import annotations

import math

from models.train.selection import Candidate, decide


def _candidate(model_type: str, mae: float, failure: str | None = None) -> Candidate:
    return Candidate(model_type, {}, None, [0.1], [0.1], {"holdout_mae": mae}, None, 0.0, failure=failure)


def test_decide_promotes_at_most_the_best_eligible_candidate() -> None:
    a, b, c = _candidate("tcn", 0.8), _candidate("lstm", 0.7), _candidate("hrnn", 0.5, failure="non-finite loss")
    assert decide([a, b, c], baseline_mae=1.0, champion_mae=0.9, min_improvement=0.0) is b
    assert b.decision == "promoted" and "lstm is better" in a.decision and "failed validation" in c.decision
    # the margin is relative to the champion's MAE: 0.7 < 0.9 * (1 - 0.2) = 0.72, but not < 0.9 * 0.5
    assert decide([a, b], baseline_mae=1.0, champion_mae=0.9, min_improvement=0.2) is b
    assert decide([a, b], baseline_mae=1.0, champion_mae=0.9, min_improvement=0.5) is None
    assert "by the margin 0.5" in b.decision
    # with no champion the first model only has to beat seasonal naive
    assert decide([a], baseline_mae=0.75, champion_mae=None, min_improvement=0.0) is None
    assert "seasonal naive" in a.decision
    assert decide([_candidate("tcn", math.nan)], baseline_mae=1.0, champion_mae=None, min_improvement=0.0) is None


def test_a_tie_up_to_float_rounding_keeps_the_incumbent() -> None:
    """A model that learned nothing forecasts seasonal naive itself: its MAE differs from naive's in the
    8th digit, lower or higher by the CPU's rounding. Neither wins a tie, whichever way it rounds."""
    naive = 0.3234347661
    untrained = _candidate("tcn", 0.3234347478)  # 0.99999994 x naive's (a drift test's version 2, measured)
    assert decide([untrained], baseline_mae=naive, champion_mae=None, min_improvement=0.0) is None
    assert "does not beat seasonal naive" in untrained.decision
    same = _candidate("tcn", 0.5 * (1 - 1e-8))  # a full retrain from the same seed and data
    assert decide([same], baseline_mae=1.0, champion_mae=0.5, min_improvement=0.0) is None
    assert "does not beat the champion" in same.decision
    better = _candidate("tcn", 0.5 * (1 - 1e-4))  # a real improvement, however small, still wins
    assert decide([better], baseline_mae=1.0, champion_mae=0.5, min_improvement=0.0) is better
