"""runtime: the backend flags a run sets are the same for train and bench and come back when the
run ends; StopSignals puts the previous handlers back."""

import os
import signal

import pytest
import torch

from fastcifar import bench, runtime
from test_train import QUIET, info, store, tiny  # noqa: F401 (store: the fixture)

import fastcifar.train as T


def flags() -> dict:
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@pytest.fixture
def odd_flags(monkeypatch):
    """Flags set to values no run chooses, so a run that forgets one leaves a visible change."""
    saved = flags()
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, False
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield flags()
    torch.use_deterministic_algorithms(saved["deterministic"])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved["cudnn.benchmark"], saved["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul.allow_tf32"]


@pytest.mark.parametrize("deterministic", [False, True])
def test_backend_settings_set_and_restore_every_flag(odd_flags, deterministic):
    with runtime.backend_settings(deterministic):
        inside = flags()
    assert flags() == odd_flags
    if deterministic:
        assert inside["deterministic"] and not inside["cudnn.benchmark"] and inside["CUBLAS_WORKSPACE_CONFIG"]
    else:
        assert inside["cudnn.benchmark"] and inside["cudnn.allow_tf32"] and inside["matmul.allow_tf32"]


def test_bench_measures_under_the_training_flags(store, odd_flags, monkeypatch):
    seen = {}

    def probe(**kw):
        seen["bench"] = flags()
        return []

    monkeypatch.setitem(bench.STAGES, "probe", probe)
    bench.run(stages=["probe"], data_dir=store, device="cpu", log=lambda *a: None)
    with runtime.backend_settings(deterministic=False):
        seen["train"] = flags()
    assert seen["bench"] == seen["train"] and seen["bench"]["cudnn.benchmark"]
    assert flags() == odd_flags


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_training_run_leaves_the_flags_and_handlers_as_it_found_them(store, tmp_path, odd_flags, deterministic):
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    T.train(tiny(train__epochs=1, train__deterministic=deterministic, data__subset=0.2), info(), out=tmp_path / "run",
            data_dir=store, **QUIET)
    assert flags() == odd_flags
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
