"""The one training engine every schedule (sync averaging, WASAP-SGD) runs on.

:class:`Engine` (``core.py``): start, the epoch-end topology update, evaluation, metrics,
divergence check, saving, stop handling, finishing. ``resume.py``: the agreed, checked
resume and the run's checkpoint lineage. ``failure.py``: one failing rank ends the job.
``progress.py``: the run's position.
"""

from hpc_sparse.engine.core import Engine, Schedule, TopologyUpdate, configure_threads, evaluate, load_data
from hpc_sparse.engine.progress import Progress
from hpc_sparse.engine.resume import MODEL_PREFIX, Resumed

__all__ = ["MODEL_PREFIX", "Engine", "Progress", "Resumed", "Schedule", "TopologyUpdate", "configure_threads",
           "evaluate", "load_data"]
