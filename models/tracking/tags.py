"""Every tag and metric name rollcast writes to MLflow, and the values they take: defined here, once.

The train job writes them (:mod:`models.tracking.runs`), the forecast and train jobs read them back
(:mod:`models.tracking.client`, :mod:`models.scoring.drift`), and the tests check them by these names.
"""

from __future__ import annotations

# Inside a logged pyfunc model: the saved forecaster (weights.pt + config) and serving settings.
MODEL_ARTIFACT = "model"
SERVING_ARTIFACT = "serving"


# Tags of registered versions (and of runs, where they say the same)
VALIDATION_TAG = "validation_status"  # "passed" or "failed"; only a passed version is ever promoted
VALIDATION_REASON_TAG = "validation_reason"
PROMOTION_TAG = "promotion"  # the decision of the cycle, in words
MODEL_TYPE_TAG = "model_type"
CYCLE_TAG = "cycle_id"
CODE_VERSION_TAG = "code_version"
DATA_START_MS_TAG = "data_start_ms"
DATA_END_MS_TAG = "data_end_ms"  # the training schedule goes on from the newest version's data end
CYCLE_KIND_TAG = "cycle_kind"  # CYCLE_FULL (trained from scratch) or CYCLE_WARM (fine-tuned from its parent)
PARENT_VERSION_TAG = "parent_version"  # the champion version a warm cycle fine-tuned; absent for a full one
WARM_CYCLES_TAG = "warm_cycles"  # warm cycles in a row up to this one since the last full retrain (0: full)
CYCLE_FULL = "full"
CYCLE_WARM = "warm"
# Tags of runs only
RUN_CYCLE_TAG = "rollcast.cycle_id"
RUN_MODEL_TYPE_TAG = "rollcast.model_type"
RUN_CODE_VERSION_TAG = "rollcast.code_version"
RUN_INCOMPLETE_TAG = "rollcast.incomplete"
# What started a cycle, on its runs and versions: TRIGGER_* (plus rollcast.trigger_reason, in words, and
# for a drift cycle the figures, rollcast.drift.*: models.scoring.drift.Drift.tags)
TRIGGER_TAG = "rollcast.trigger"
TRIGGER_REASON_TAG = "rollcast.trigger_reason"
TRIGGER_SCHEDULE = "schedule"  # train.every_minutes passed, or the start-up cycle
TRIGGER_WINDOWS = "windows"  # train.after_windows new windows
TRIGGER_DRIFT = "drift"  # the champion's live accuracy (models.scoring.drift)
TRIGGER_MANUAL = "manual"  # `rollcast train --once`
# MLflow 3's UI (3.1-3.16) opens an experiment on the page of its kind; without the tag it guesses, and
# shows the GenAI overview (traces, tokens). rollcast's runs are model development.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI ignores that tag: a "GenAI / Model training" switch picks the page, from the URL's
# ``workflowType`` or else the browser's last choice (GenAI at first). The links rollcast prints set it.
UI_WORKFLOW = "workflowType=machine_learning"

# Holdout metrics of a run (and tags of its version): the gate's figures
HOLDOUT_MAE = "holdout_mae"  # the new model's; the gate compares it with the two below
HOLDOUT_REL_MAE = "holdout_rel_mae_seasonal_naive"  # holdout MAE / seasonal naive's; the drift factor multiplies it
HOLDOUT_REL_MAE_CHAMPION = "holdout_rel_mae_champion"
CHAMPION_HOLDOUT_MAE = "champion_holdout_mae"
SEASONAL_NAIVE_HOLDOUT_MAE = "seasonal_naive_holdout_mae"
# Live accuracy logged on the serving version's run (models.scoring.drift), one step per scored window
LIVE_METRICS = ("live_mae", "live_relative_mae", "live_coverage", "live_model_coverage", "live_points")
