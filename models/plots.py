"""Every plot rollcast draws, as PNG files: a training run's losses and holdout forecasts (MLflow
artifacts), a backtest's forecasts against actuals, `rollcast query --plot` and `rollcast scores --plot`.

matplotlib is imported inside each function, with the non-interactive Agg backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.quantiles import interval_indices

if TYPE_CHECKING:
    from models.train.backtest import BacktestResult
    from models.train.cycle import CycleData
    from models.train.selection import Candidate

PLOTTED_SERIES = 3  # series plotted per training run


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(cand: Candidate, path: Path) -> Path:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, len(cand.train_loss) + 1)
    ax.plot(list(epochs), cand.train_loss, marker="o", label="train")
    if cand.val_loss:
        ax.plot(list(range(1, len(cand.val_loss) + 1)), cand.val_loss, marker="o", label="validation")
    ax.set(xlabel="epoch", ylabel="pinball loss (normalised)", title=f"{cand.model_type}: loss per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_forecasts(
    cand: Candidate, data: CycleData, others: dict[str, BacktestResult], directory: Path
) -> list[Path]:
    """One PNG per plotted series: actuals over the holdout, the new model's median and outer
    quantile band at every origin, and the medians of the champion and seasonal naive."""
    plt = _pyplot()

    m, bt = data.holdout, cand.backtest  # the series the backtests scored, in their order
    H = bt.forecasts.shape[2]
    mid = list(bt.quantiles).index(0.5)
    first = int(data.origins[0])
    lo = max(0, first - 2 * H)
    times = [datetime.fromtimestamp(t / 1000, UTC) for t in m.window_end_ms]
    paths = []
    for s, name in enumerate(m.series[:PLOTTED_SERIES]):
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.plot(times[lo:], m.values[s, lo:], color="black", lw=1, label="actual")
        for i, o in enumerate(data.origins):
            t = times[int(o) : int(o) + H]
            lo, hi = interval_indices(bt.quantiles)
            ax.fill_between(t, bt.forecasts[s, i, :, lo], bt.forecasts[s, i, :, hi], color="C0", alpha=0.2,
                            label=f"{cand.model_type} q{bt.quantiles[lo]:g}-q{bt.quantiles[hi]:g}" if i == 0 else None)
            ax.plot(t, bt.forecasts[s, i, :, mid], color="C0", label=f"{cand.model_type} median" if i == 0 else None)
            for j, (label, other) in enumerate(others.items()):
                omid = list(other.quantiles).index(0.5)
                ax.plot(t, other.forecasts[s, i, :, omid], color=f"C{j + 1}", ls="--", lw=1,
                        label=f"{label} median" if i == 0 else None)
        ax.axvline(times[first], color="grey", ls=":", lw=1)
        ax.set(title=f"{name}: holdout forecasts vs actuals", ylabel="value")
        ax.legend(fontsize="small")
        fig.autofmt_xdate()
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        path = directory / f"forecast_{s}_{safe}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


MAX_ORIGIN_LINES = 100  # a backtest plot marks its drawn origins with vertical lines up to this many


def plotted_origins(origins: Any, horizon: int) -> Any:
    """Indices of the origins whose forecasts a backtest plot draws: the first, then each next one at
    least ``horizon`` steps after the last drawn, so the drawn forecasts never overlap (origins H apart:
    all of them; an origin every window: every H-th)."""
    import numpy as np

    keep: list[int] = []
    for i, o in enumerate(origins):
        if not keep or o - origins[keep[-1]] >= horizon:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def plot_backtest(path: Path, result: BacktestResult, data: Any) -> None:
    """Actuals over the test span with the median and outer interval of the forecasts of
    :func:`plotted_origins` (the model's and, calibrated, the served one), for the first 4 series; the
    burn-in origins (left out of coverage) shaded."""
    plt = _pyplot()
    import numpy as np

    n_series = min(4, len(result.series))
    fig, axes = plt.subplots(n_series, 1, figsize=(10, 2.6 * n_series), squeeze=False)
    s_, o_, h_, q_ = result.forecasts.shape
    origins = np.asarray(result.origins)
    start, stop = int(origins[0]), int(origins[-1]) + h_
    t = np.arange(start, stop)
    drawn = plotted_origins(origins, h_)

    def spread(forecasts: np.ndarray) -> np.ndarray:
        """``(S, stop - start, Q)``: the drawn origins' forecasts at their steps, NaN (a break) elsewhere."""
        out = np.full((s_, stop - start, q_), np.nan, dtype=np.float64)
        for i in drawn:
            out[:, origins[i] - start : origins[i] - start + h_] = forecasts[:, i]
        return out

    fc = spread(result.forecasts)
    cal = spread(result.calibrated) if result.calibrated is not None else None
    mid = result.quantiles.index(0.5)
    note = ""
    if len(drawn) < o_:
        note = f" (forecasts of {len(drawn)} of {o_} origins, none overlapping)"
    for i, ax in enumerate(axes[:, 0]):
        before = max(0, start - h_)
        ax.plot(np.arange(before, start), data.values[i, before:start], color="0.5", lw=1)
        ax.plot(t, data.values[i, start:stop], color="black", lw=1, label="actual")
        ax.plot(t, fc[i, :, mid], color="tab:blue", lw=1, label="median forecast")
        if q_ > 1:
            lo, hi = interval_indices(result.quantiles)
            ax.fill_between(t, fc[i, :, lo], fc[i, :, hi], color="tab:blue", alpha=0.2,
                            label=f"{result.quantiles[lo]:g}-{result.quantiles[hi]:g}")
            if cal is not None:
                ax.plot(t, cal[i, :, lo], color="tab:orange", lw=0.8, ls="--", label="calibrated (served)")
                ax.plot(t, cal[i, :, hi], color="tab:orange", lw=0.8, ls="--")
        if result.burn_in:
            ax.axvspan(start, origins[result.burn_in], color="0.9", zorder=0,
                       label=f"burn-in: {result.burn_in} origins, not in coverage")
        if len(drawn) <= MAX_ORIGIN_LINES:  # more would grey the whole plot
            for o in origins[drawn]:
                ax.axvline(o, color="0.85", lw=0.5)
        ax.set_title(f"{result.model}: {result.series[i]}{note}", fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_forecast_message(msg: dict, actual: Any, target: str, path: Path) -> None:
    """PNG of the forecast message ``msg``, its outer interval, and the ``actual`` windows before it (a
    history-store frame; the ``target`` column is plotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    if actual.height:
        ax.plot([datetime.fromtimestamp(t / 1000, tz=UTC) for t in actual["window_start"]],
                actual[target].to_list(), label=f"actual ({target})", color="black")
    times = [datetime.fromtimestamp(p["ts"] / 1000, tz=UTC) for p in msg["points"]]
    qs = list(msg["points"][0]["quantiles"])
    ax.plot(times, [p["mean"] for p in msg["points"]], label="forecast (median)", color="tab:blue")
    if len(qs) >= 2:
        ax.fill_between(times, [p["quantiles"][qs[0]] for p in msg["points"]],
                        [p["quantiles"][qs[-1]] for p in msg["points"]],
                        alpha=0.3, color="tab:blue", label=f"q{qs[0]}–q{qs[-1]}")
    ax.set_title(f"{msg['series']}: {msg['model']['name']} v{msg['model']['version']}")
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_live_scores(timeline: dict[str, list[tuple[int, Any]]], nominal: list[float], path: Path) -> None:
    """PNG of live accuracy over time (`rollcast scores --plot`): for each model version in ``timeline``
    (label -> ``(last_window_end ms, sums)`` oldest first, the sums a
    :class:`pipeline.scores_io.LiveTotals` of the forecasts issued after that window), MAE on top and,
    below, coverage of the served interval (solid) and of the model's own (dotted), with the
    ``nominal`` coverages as grey lines."""
    plt = _pyplot()
    fig, (err, cov) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for i, (label, points) in enumerate(timeline.items()):
        times = [datetime.fromtimestamp(end / 1000, tz=UTC) for end, _ in points]
        color = f"C{i % 10}"
        err.plot(times, [t.mae for _, t in points], color=color, marker=".", lw=1, label=label)
        cov.plot(times, [t.coverage for _, t in points], color=color, marker=".", lw=1, label=f"{label} served")
        cov.plot(times, [t.model_coverage for _, t in points], color=color, ls=":", lw=1,
                 label=f"{label} model's own")
    for n in nominal:
        cov.axhline(n, color="grey", ls="--", lw=1, label=f"nominal {n:.2f}")
    err.set(title="live accuracy per window (forecasts issued after it)", ylabel="MAE")
    cov.set(ylabel="interval coverage", xlabel="last window end (UTC)", ylim=(-0.05, 1.05))
    err.legend(fontsize="small")
    cov.legend(fontsize="small")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
