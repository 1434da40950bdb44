"""MLflow for rollcast: tag and metric names (:mod:`~models.tracking.tags`), the client and registry
(:mod:`~models.tracking.client`), a training cycle's runs (:mod:`~models.tracking.runs`) and the pyfunc
model (:mod:`~models.tracking.pyfunc`).

``from models import tracking`` gives the public names of the first three (``__all__`` of client and
runs, every constant of tags): ``tracking.champion(settings)``, ``tracking.publish(...)``, ``tracking.TRIGGER_TAG``.
The pyfunc module is not among them: MLflow runs it as a file when it loads a model.
"""

from models.tracking.client import *  # noqa: F403
from models.tracking.runs import *  # noqa: F403
from models.tracking.tags import *  # noqa: F403
