"""Live accuracy in the train job: the scores topic read back, the drift trigger, live metrics in MLflow.

The forecast job scores every forecast against the windows that settle it and publishes one message per
scored forecast to ``topics.scores`` (:mod:`pipeline.scores_io`; scores in the format before its format 2,
kept on the topic across an upgrade, are read too). :class:`LiveMonitor` reads that topic
in a background thread of the train job (consumer group ``groups.scores``, from the earliest offset; it
only keeps sliding sums, so re-reading after a restart is harmless) into a
:class:`~models.scoring.accuracy.LiveAccuracy` per model version, and

* judges the serving version (the one carrying the champion alias; scores of other versions are kept
  for MLflow but never judged) with :func:`judge`: once it has ``train.drift_min_points`` scored points
  in the last ``train.drift_windows`` windows, it has drifted when its live relative MAE (MAE over
  seasonal naive's on the same points) exceeds its holdout relative MAE times ``train.drift_factor``,
  or its live coverage falls below ``train.drift_coverage_floor``. Outside the cooldown
  (``train.drift_cooldown_minutes`` since the last cycle, whatever started it) it sets :attr:`wake`,
  so the train job's loop starts a ``drift`` cycle within a fraction of a second;
* every ``train.live_log_s`` logs ``live_mae``, ``live_relative_mae``, ``live_coverage``,
  ``live_model_coverage`` and ``live_points`` of every version with new scores to that version's
  training run (step: the index of its newest scored window, ``last_window_end // step_ms``), so
  the MLflow runs table shows live accuracy next to holdout accuracy.

A broker or MLflow outage is logged (once per outage) and waited out; the train job's schedules go on.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass

from models.scoring.accuracy import LiveAccuracy, LiveTotals
from pipeline.config import Settings
from pipeline.errors import MlflowUnavailable
from pipeline.scores_io import decode_score

log = logging.getLogger("rollcast.train")

COMMIT_EVERY_S = 5.0


@dataclass(frozen=True)
class Drift:
    """The figures of one judgement of the serving version's live accuracy."""

    version: str
    points: int
    windows: int
    live_relative_mae: float
    holdout_relative_mae: float | None
    factor: float | None
    live_coverage: float
    coverage_floor: float | None
    by_mae: bool = False  # live relative MAE > holdout relative MAE x factor
    by_coverage: bool = False  # live coverage < floor

    @property
    def drifted(self) -> bool:
        return self.by_mae or self.by_coverage

    def reason(self) -> str:
        why = []
        if self.by_mae:
            why.append(f"live relative MAE {self.live_relative_mae:.4g} > holdout {self.holdout_relative_mae:.4g} "
                       f"x {self.factor:g}")
        if self.by_coverage:
            why.append(f"live coverage {self.live_coverage:.3f} < {self.coverage_floor:g}")
        return (f"drift of version {self.version}: " + " and ".join(why or ["none"])
                + f" ({self.points} points in the last {self.windows} windows)")

    def tags(self) -> dict[str, str]:
        """The figures as MLflow tags of the cycle's runs and versions."""
        def fmt(x: float | None) -> str:
            return "" if x is None else f"{x:.6g}"

        return {
            "rollcast.drift.version": self.version,
            "rollcast.drift.points": str(self.points),
            "rollcast.drift.windows": str(self.windows),
            "rollcast.drift.live_relative_mae": fmt(self.live_relative_mae),
            "rollcast.drift.holdout_relative_mae": fmt(self.holdout_relative_mae),
            "rollcast.drift.factor": fmt(self.factor),
            "rollcast.drift.live_coverage": fmt(self.live_coverage),
            "rollcast.drift.coverage_floor": fmt(self.coverage_floor),
            "rollcast.drift.by": ",".join(k for k, on in (("relative_mae", self.by_mae),
                                                          ("coverage", self.by_coverage)) if on),
        }


def judge(version: str, totals: LiveTotals, holdout_relative_mae: float | None, *, factor: float | None,
          coverage_floor: float | None, min_points: int, windows: int) -> Drift | None:
    """Whether ``version``'s live ``totals`` (its last ``windows`` windows) show drift; None while it has
    fewer than ``min_points`` scored points. The MAE test needs a finite positive holdout relative MAE
    and a live one (seasonal naive scored); ``factor`` or ``coverage_floor`` None turns its test off."""
    if totals.points < min_points:
        return None
    live_rel, cov = totals.relative_mae, totals.coverage
    by_mae = (factor is not None and holdout_relative_mae is not None and math.isfinite(holdout_relative_mae)
              and holdout_relative_mae > 0 and math.isfinite(live_rel) and live_rel > holdout_relative_mae * factor)
    by_cov = coverage_floor is not None and math.isfinite(cov) and cov < coverage_floor
    return Drift(version, totals.points, windows, live_rel, holdout_relative_mae, factor, cov, coverage_floor,
                 by_mae, by_cov)


def cooled_down(since_last_cycle_s: float, cooldown_minutes: float) -> bool:
    return since_last_cycle_s >= cooldown_minutes * 60


def drift_trigger(drift: Drift | None, since_last_cycle_s: float, cooldown_minutes: float) -> Drift | None:
    """The drift that starts a cycle now: drifted, and the cooldown since the last cycle has passed."""
    if drift is None or not drift.drifted or not cooled_down(since_last_cycle_s, cooldown_minutes):
        return None
    return drift


def live_metrics(totals: LiveTotals) -> dict[str, float]:
    """The MLflow live metrics of one version (non-finite ones left out)."""
    values = {"live_mae": totals.mae, "live_relative_mae": totals.relative_mae, "live_coverage": totals.coverage,
              "live_model_coverage": totals.model_coverage, "live_points": float(totals.points)}
    return {k: v for k, v in values.items() if math.isfinite(v)}


def process_rank() -> tuple[int, int]:
    """(global rank, world size) of this process as torchrun or SLURM set them (0, 1 when neither did)."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"
    try:
        return int(rank), int(world)
    except ValueError:
        return 0, 1


class LiveMonitor:
    """Reads the scores topic in a thread; judges the champion; logs live metrics to MLflow.

    The train loop calls :meth:`start`, waits on :attr:`wake` (with its poll interval), asks
    :meth:`drift` for a due drift trigger, tells :meth:`cycle_done` when a cycle ended (the cooldown
    starts; the champion is looked up again), and :meth:`stop` at the end.
    """

    def __init__(self, settings: Settings, last_cycle: float | None = None, *, judge_drift: bool = True):
        t = settings.train
        self.settings = settings
        self.live = LiveAccuracy(max(t.drift_windows, settings.scoring.live_windows))
        self.judge_drift = judge_drift and (t.drift_factor is not None or t.drift_coverage_floor is not None)
        self.wake = threading.Event()
        self.last_cycle = time.monotonic() if last_cycle is None else last_cycle  # monotonic
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._champion: tuple[str, float | None] | None = None  # (version, holdout relative MAE)
        self._champion_stale = True
        self._added: dict[str, int] = {}  # messages added per version, to log only what changed
        self._logged: dict[str, int] = {}
        self._runs: dict[str, str] = {}  # version -> run id
        self._steps: dict[str, int] = {}  # version -> step_ms of its scores
        self._thread = threading.Thread(target=self._run, name="live-monitor", daemon=True)
        self.messages = 0

    # ------------------------------------------------------------------ the train loop's side

    def start(self) -> LiveMonitor:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def cycle_done(self) -> None:
        """A cycle ended (whatever started it): the cooldown counts from now; the alias may have moved."""
        with self._lock:
            self.last_cycle = time.monotonic()
            self._champion_stale = True
        self.wake.clear()

    def judgement(self) -> Drift | None:
        """The current judgement of the champion (None: no champion known, or too few points)."""
        with self._lock:
            champ = self._champion
            if champ is None:
                return None
            t = self.settings.train
            totals = self.live.totals(champ[0], t.drift_windows)
        return judge(champ[0], totals, champ[1], factor=t.drift_factor, coverage_floor=t.drift_coverage_floor,
                     min_points=t.drift_min_points, windows=t.drift_windows)

    def drift(self) -> Drift | None:
        """The drift that should start a cycle now, or None (no drift, or within the cooldown)."""
        self.wake.clear()
        if not self.judge_drift:
            return None
        with self._lock:
            since = time.monotonic() - self.last_cycle
        return drift_trigger(self.judgement(), since, self.settings.train.drift_cooldown_minutes)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        from kafka.errors import KafkaError

        from pipeline.errors import BrokerUnavailable
        from pipeline.kafka.clients import Backoff

        backoff, said = Backoff(), False
        while not self._stop.is_set():
            try:
                self._session()
                return
            except (KafkaError, BrokerUnavailable, OSError) as e:
                if not said:
                    log.warning("live accuracy: cannot read %s (%s); retrying", self.settings.topics.scores, e)
                    said = True
                backoff.sleep(self._stop.is_set)
            except Exception:  # noqa: BLE001 - the monitor must never take the train job down
                log.exception("live accuracy monitor failed; retrying")
                backoff.sleep(self._stop.is_set)

    def _session(self) -> None:
        from pipeline.kafka.clients import make_consumer

        s = self.settings
        consumer = make_consumer(s, s.groups.scores, s.topics.scores, auto_offset_reset="earliest",
                                 max_poll_records=5000)
        log.info("live accuracy: reading %s in group %s", s.topics.scores, s.groups.scores)
        last_commit = last_log = last_champion = time.monotonic()
        champion_every = max(5.0, min(30.0, s.forecast.champion_poll_s))
        try:
            while not self._stop.is_set():
                records = consumer.poll(timeout_ms=500)
                with self._lock:
                    for batch in records.values():
                        for r in batch:
                            msg = decode_score(r.value)
                            if msg is None:
                                continue
                            version = self.live.add_message(msg)
                            if version is not None:
                                self._steps[version] = int(msg["step_ms"])
                                self._added[version] = self._added.get(version, 0) + 1
                                self.messages += 1
                now = time.monotonic()
                if self._champion_stale or now - last_champion >= champion_every:
                    self._refresh_champion()
                    last_champion = now
                if self.judge_drift and not self.wake.is_set() and self.drift_is_due():  # also at a cooldown's end
                    self.wake.set()
                if records and now - last_commit >= COMMIT_EVERY_S:
                    consumer.commit()
                    last_commit = now
                if now - last_log >= s.train.live_log_s:
                    self.log_live_metrics()
                    last_log = now
            self.log_live_metrics()
            consumer.commit()
        finally:
            consumer.close(autocommit=False)

    def drift_is_due(self) -> bool:
        with self._lock:
            since = time.monotonic() - self.last_cycle
        return drift_trigger(self.judgement(), since, self.settings.train.drift_cooldown_minutes) is not None

    def _refresh_champion(self) -> None:
        from models import tracking

        try:
            found = tracking.champion_version(self.settings)
            champ = None
            if found is not None:
                version = str(found.version)
                current = self._champion
                rel = current[1] if current is not None and current[0] == version else \
                    tracking.holdout_relative_mae(self.settings, found)
                champ = (version, rel)
        except MlflowUnavailable as e:
            log.debug("live accuracy: champion not looked up: %s", e)
            return
        with self._lock:
            if champ != self._champion:
                log.info("live accuracy: judging version %s (holdout relative MAE %s)",
                         champ[0] if champ else None, f"{champ[1]:.4g}" if champ and champ[1] is not None else "?")
            self._champion, self._champion_stale = champ, False

    def log_live_metrics(self) -> None:
        """Log the live metrics of every version with scores added since its last log to its run."""
        from models import tracking

        with self._lock:
            due = {v: (self.live.totals(v), self.live.newest(v), self._steps.get(v, 1), n)
                   for v, n in self._added.items() if self._logged.get(v) != n}
        for version, (totals, newest, step_ms, n) in due.items():
            values = live_metrics(totals)
            if not values:
                continue
            try:
                run_id = self._runs.get(version) or tracking.version_run_id(self.settings, version)
                if run_id is None:
                    self._logged[version] = n
                    continue
                self._runs[version] = run_id
                tracking.log_live_metrics(self.settings, run_id, values, step=int(newest or 0) // int(step_ms or 1))
                self._logged[version] = n
            except MlflowUnavailable as e:
                log.warning("live metrics of version %s not logged: %s", version, e)
                return
            except Exception as e:  # noqa: BLE001 - a version of another model, a deleted run: skip it
                log.warning("live metrics of version %s not logged: %s", version, e)
                self._logged[version] = n


def wait_either(stop: threading.Event, wake: threading.Event | None, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` until ``stop`` or ``wake`` is set; True when ``stop`` is."""
    if wake is None:
        return stop.wait(timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if stop.is_set():
            return True
        if wake.is_set() or left <= 0:
            return False
        wake.wait(min(0.2, left))
