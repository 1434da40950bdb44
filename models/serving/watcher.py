"""The forecast job's view of the registry: wait for a first champion, then notice when it moves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from models.tracking.client import champion
from pipeline.config import Settings
from pipeline.errors import MlflowUnavailable

if TYPE_CHECKING:
    from models.serving.forecaster import LoadedModel

log = logging.getLogger("rollcast.registry")


def wait_for_champion(settings: Settings, shutdown: threading.Event, health: Any,
                      on_reachable: Callable[[bool], Any] = lambda up: None) -> LoadedModel | None:
    """Block until the registered model has a champion (None if asked to shut down first).

    ``on_reachable(up)`` is told after every look-up whether MLflow answered."""
    from models.serving.forecaster import load_saved_model

    said, down = False, False
    while not shutdown.is_set():
        try:
            found = champion(settings)
            on_reachable(True)
            down = False
        except MlflowUnavailable as e:  # say so (once per outage) and keep waiting
            on_reachable(False)
            if not down:
                log.warning("MLflow unreachable while looking for a champion: %s", e)
            down, found = True, None
        if found is not None:
            version, model_dir = found
            return load_saved_model(model_dir, version, compiled=settings.forecast.runtime == "onnxruntime")
        if not said:
            log.info("no %r alias on %s yet; waiting for the first promoted model",
                     settings.mlflow.champion_alias, settings.mlflow.registered_model)
            said = True
        health.facts["waiting_for"] = "champion"
        health.polled()
        time.sleep(min(settings.forecast.champion_poll_s, 2.0))
    return None


class ChampionWatcher:
    """Watches the champion alias in a background thread, so MLflow never blocks the consume loop.

    Every ``forecast.champion_poll_s`` it resolves the alias; when it has moved, it downloads
    and loads the new version off the loop and leaves it for :meth:`take`, which the loop calls
    between batches. While MLflow is unreachable it backs off (up to 30 s), logs one warning
    per outage and one line when MLflow is back, and the loop keeps serving the model it has.
    """

    def __init__(self, settings: Settings, current: LoadedModel,
                 on_reachable: Callable[[bool], Any] = lambda up: None):
        self.settings = settings
        self.on_reachable = on_reachable
        self.version = current.version
        self._pending: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)

    def start(self) -> ChampionWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> LoadedModel | None:
        """The new champion, loaded, if the alias moved since the last call."""
        with self._lock:
            model, self._pending = self._pending, None
        return model

    def _run(self) -> None:
        from models.serving.forecaster import load_saved_model

        poll = self.settings.forecast.champion_poll_s
        wait, down_since = poll, None
        while not self._stop.wait(wait):
            try:
                found = champion(self.settings)
            except MlflowUnavailable as e:
                self.on_reachable(False)
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow unreachable (%s); still serving version %s", e, self.version)
                wait = min(max(wait * 2, 1.0), 30.0)
                continue
            self.on_reachable(True)
            if down_since is not None:
                log.info("MLflow reachable again after %.0fs", time.monotonic() - down_since)
                down_since = None
            wait = poll
            if found is None or found[0] == self.version:
                continue
            version, model_dir = found
            model = load_saved_model(model_dir, version, compiled=self.settings.forecast.runtime == "onnxruntime")
            log.info("champion moved: version %s -> %s (%s)", self.version, version, model.name)
            with self._lock:
                self._pending = model
            self.version = version
