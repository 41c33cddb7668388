import os
import sys
from pathlib import Path

# FASTCIFAR_HIDE_DALI=1 runs the suite as on a machine without DALI, before anything imports it:
# `import nvidia.dali` fails in this process and, through tests/hide_dali/sitecustomize.py, in
# every Python process the tests start (CLI runs, torchrun ranks, doctor's steps).
if os.environ.get("FASTCIFAR_HIDE_DALI") == "1":
    sys.modules["nvidia.dali"] = None
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).parent / "hide_dali"), os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402

# tests/ helpers (cifar_fixture, ...) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))

from fastcifar.data import open_store, prepare  # noqa: E402
from pipelines_helpers import N_TEST, N_TRAIN  # noqa: E402


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A small synthetic store (N_TRAIN / N_TEST images) shared by the pipeline and bench tests."""
    d = tmp_path_factory.mktemp("store")
    prepare(d, synthetic=True, n_train=N_TRAIN, n_test=N_TEST, seed=0, log=lambda *_: None)
    return open_store(d)
