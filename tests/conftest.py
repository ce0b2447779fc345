import hashlib
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Dataset caches of the tests go to a folder of this checkout's own under /tmp, not the user's
# ~/.cache: the same path on every rank of an MPI test (so they share it, as on a cluster) and
# in every subprocess the tests start (they inherit the environment).
os.environ.setdefault("XDG_CACHE_HOME", str(Path(tempfile.gettempdir()) / (
    "hpc_sparse-test-cache-" + hashlib.sha256(str(Path(__file__).resolve().parents[1]).encode()).hexdigest()[:8])))
