"""MLflow for rollcast: tag and metric names (:mod:`~models.tracking.tags`), the client and registry
(:mod:`~models.tracking.client`), a training cycle's runs (:mod:`~models.tracking.runs`) and the pyfunc
model (:mod:`~models.tracking.pyfunc`).

``from models import tracking`` gives the names of all three modules: ``tracking.champion(settings)``,
``tracking.publish(...)``, ``tracking.TRIGGER_TAG``.
"""

from models.tracking.client import *  # noqa: F403
from models.tracking.runs import *  # noqa: F403
from models.tracking.tags import *  # noqa: F403
