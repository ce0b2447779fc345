"""The one training engine every schedule (sync averaging, WASAP-SGD) runs on.

``core.py``: :class:`Engine` (start, the training step, agreements and what follows from
them, the topology update, evaluation, the metrics writer, saving, finishing). ``loop.py``:
the one step loop and the :class:`Plan` a schedule hands it. ``agreement.py``: the ranks'
agreement at a meeting point. ``metrics.py``: the epoch record. ``topology_update.py``: the
epoch-end topology update. ``resume.py``: the agreed, checked resume and the run's
checkpoint lineage; ``rank_models.py``: per-rank models in a checkpoint. ``failure.py``: one
failing rank ends the job. ``ownership.py``: the run dir's lock. ``progress.py``: the run's
position. ``services.py``: threads, data and evaluation, also for the other commands.
"""

from hpc_sparse.engine.agreement import Agreement
from hpc_sparse.engine.core import Engine, Schedule
from hpc_sparse.engine.loop import Checkpoint, EpochEnd, Plan
from hpc_sparse.engine.metrics import AsyncFigures, EpochRecord, MergeFigures, Traffic
from hpc_sparse.engine.progress import Progress
from hpc_sparse.engine.resume import Resumed
from hpc_sparse.engine.services import configure_threads, evaluate, load_data
from hpc_sparse.engine.topology_update import TopologyUpdate

__all__ = ["Agreement", "AsyncFigures", "Checkpoint", "Engine", "EpochEnd", "EpochRecord", "MergeFigures", "Plan",
           "Progress", "Resumed", "Schedule", "TopologyUpdate", "Traffic", "configure_threads", "evaluate",
           "load_data"]
