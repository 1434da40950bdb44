"""Compiled inference: a saved model's ONNX graph, run by ONNX Runtime instead of eager PyTorch.

:func:`models.save_model` writes ``model.onnx`` beside the weights (:func:`export_onnx`), so the graph
travels with the MLflow version; :func:`load_compiled` opens it with ONNX Runtime and checks it against
the module on a probe batch. :func:`models.predict` takes either form and gives both the same inputs
(the gap rule, calendar features), so the compiled form only replaces the forward pass.

Why ONNX Runtime (``benchmarks/compiled.py``): of the options measured it is the one that keeps the
forecasts (equal to eager's to ~1e-7 relative) and costs little at training time: the TorchScript
exporter handles every network in 0.2-2 s. On one thread it beats eager PyTorch on small batches
(100 series: 1.1-1.6x faster) but not on large ones (1,000 series, with the job's malloc settings: TCN,
HRNN and pyramid take ~1.3x eager's time, LSTM the same; TCN's convolutions are slower in ONNX Runtime
than in torch's oneDNN).
``torch.compile`` was no faster than eager after a minute of compiling; dynamic int8 quantisation was
no faster and moved forecasts by ~1e-2. The baselines use ``torch.quantile``, which the TorchScript
exporter lacks: they have no graph (the dynamo exporter handles them, in 4-40 s per model).

So the forecast job serves the graph only with ``forecast.runtime = "onnxruntime"`` (default ``"eager"``);
the pyfunc model always uses it. Whenever the graph is missing, fails to load, or differs from the
module, the module serves eagerly and a warning says why; :attr:`OnnxModel.runtime` (``"onnxruntime"``)
or :data:`EAGER` says which.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.data import make_inputs

if TYPE_CHECKING:
    from models.base import ForecastModel, ModelConfig

log = logging.getLogger("rollcast.models")

ONNX_FILE = "model.onnx"
ONNXRUNTIME = "onnxruntime"
EAGER = "eager"
OPSET = 17
# the compiled form must equal the module's forecasts to this (float32 rounding is ~1e-7 relative)
RTOL, ATOL = 1e-4, 1e-5
PROBE_BATCH = 8


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def probe_inputs(config: ModelConfig, n: int = PROBE_BATCH) -> np.ndarray:
    """``(n, L, C)`` model inputs, the same for every call: random walks around 100 on an hourly grid
    whose end differs per row (so calendar features, when configured, differ too)."""
    rng = np.random.default_rng(0)
    L = config.context
    values = 100 + rng.standard_normal((n, L)).cumsum(axis=1)
    ends = 1_700_000_000_000 + 3_600_000 * (rng.integers(0, 24 * 7, size=(n, 1)) + np.arange(L))
    return make_inputs(values, ends, config)


def export_onnx(model: ForecastModel, path: str | Path) -> bool:
    """Write ``model``'s ONNX graph to ``path`` (batch size free, everything else fixed by its config) if
    ONNX Runtime then gives its forecasts; False, with a warning saying why and nothing written, if not.

    The module's mode and gradients are left as they were.
    """
    buffer = io.BytesIO()
    x = torch.from_numpy(probe_inputs(model.config, 2))
    try:
        # traced with gradients on, as in training: under no_grad torch.nn's transformer layers take a
        # fused kernel the exporter lacks. The warnings: the tracer's notes on shape checks inside
        # torch.nn (the graph is checked below instead) and the TorchScript exporter's deprecation notice.
        with eval_mode(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # asked first: a failed export prints the whole graph to stderr
            _, lacking = torch.onnx.utils.unconvertible_ops(model, (x,), opset_version=OPSET)
            if not lacking:
                torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=OPSET, input_names=["x"],
                                  output_names=["q"], dynamic_axes={"x": {0: "batch"}, "q": {0: "batch"}})
        if lacking:
            problem = f"the exporter lacks {', '.join(sorted(set(lacking)))}"
        else:
            problem = OnnxModel(buffer.getvalue(), model.config, threads=1).mismatch(model)
    except Exception as e:  # noqa: BLE001 - whatever the exporter cannot handle, the module serves eagerly
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem:
        log.warning("no ONNX graph for %s (%s): it will serve in eager PyTorch", model.name, problem)
        return False
    Path(path).write_bytes(buffer.getvalue())
    return True


class OnnxModel:
    """A module's ONNX graph in an ONNX Runtime session: ``run`` maps model inputs ``(B, L, C)`` to
    quantiles ``(B, H, Q)``, as the module's forward does; ``config`` is the module's.

    ``threads``: intra-op threads (None: torch's setting, which the forecast job sets from
    ``forecast.inference_threads``); one inter-op thread and sequential execution, as eager inference.
    """

    runtime = ONNXRUNTIME

    def __init__(self, graph: str | Path | bytes, config: ModelConfig, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.config = config
        self.session = ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), options,
                                            providers=["CPUExecutionProvider"])

    @property
    def threads(self) -> int:
        return int(self.session.get_session_options().intra_op_num_threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        """``(B, L, C)`` float32 model inputs -> ``(B, H, Q)`` float32 quantiles."""
        return self.session.run(None, {"x": x})[0]

    def mismatch(self, module: ForecastModel) -> str | None:
        """Why this graph cannot stand in for ``module`` (other shapes, or other forecasts on the probe
        batch and on one row of it), or None."""
        cfg = self.config
        want = ["batch", cfg.context, cfg.channels]
        got = [list(v.shape) for v in self.session.get_inputs()]
        if got != [want] or len(self.session.get_outputs()) != 1:
            return f"the graph takes {got} to {len(self.session.get_outputs())} output(s); the config gives {want}"
        x = probe_inputs(cfg)
        with eval_mode(module), torch.inference_mode():
            expected = module(torch.from_numpy(x)).numpy()
        for rows in (slice(None), slice(0, 1)):  # the batch size is free
            got_q, want_q = self.run(x[rows]), expected[rows]
            if got_q.shape != want_q.shape:
                return f"the graph forecasts {got_q.shape[1:]}; the config gives {want_q.shape[1:]}"
            if not np.allclose(got_q, want_q, rtol=RTOL, atol=ATOL):
                err = float(np.max(np.abs(got_q - want_q) / (np.abs(want_q) + ATOL)))
                return f"its forecasts differ from the module's by up to {err:.2g} (relative)"
        return None


def load_compiled(directory: str | Path, module: ForecastModel, threads: int | None = None) -> OnnxModel | None:
    """The ONNX graph saved with ``module`` in ``directory``, in an ONNX Runtime session with ``threads``
    intra-op threads (None: torch's setting); None when there is none, or it fails to load or to give
    the module's forecasts (a warning says which): the caller then runs ``module`` itself."""
    path = Path(directory) / ONNX_FILE
    if not path.is_file():
        log.debug("%s has no %s: %s serves in eager PyTorch", directory, ONNX_FILE, module.name)
        return None
    try:
        compiled = OnnxModel(path, module.config, threads)
        problem = compiled.mismatch(module)
    except Exception as e:  # noqa: BLE001 - a graph ONNX Runtime cannot load or run: the module serves
        problem = f"{type(e).__name__}: {e}"
    if problem:
        log.warning("not using %s (%s): %s serves in eager PyTorch", path, problem, module.name)
        return None
    return compiled
