"""`fastcifar bench` stages train_step and end_to_end, and the headroom ratio. Behaviour only:
no figure is asserted (speed is the bench's job, not the tests')."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastcifar import bench
from pipelines.loader import dali_available
from pipelines_helpers import store  # noqa: F401 (a fixture)

ROW_KEYS = {"stage", "backend", "image_size", "batch_size", "device", "images_per_sec"}


@pytest.fixture
def tiny_models(monkeypatch):
    """timm's 0.4M-parameter test_resnet stands in for resnet18/50: the same code path, seconds not minutes."""
    monkeypatch.setattr(bench, "MODELS", ("test_resnet",))
    monkeypatch.setattr(bench, "CPU_STEP_BATCH", {32: 8, 224: 2})


def test_train_step_climbs_the_ladder(store, tiny_models):
    rows = bench.run(stages=["train_step"], quick=True, data_dir=store.dir, device="cpu", log=lambda *_: None)
    assert all(ROW_KEYS <= set(r) and r["stage"] == "train_step" and r["images_per_sec"] > 0 for r in rows)
    # --quick on a CPU leaves the compiled step out (a first compile costs ~40 s here)
    ladder = [(r["compiled"], r["memory_format"], r["precision"]) for r in rows if r["image_size"] == 32]
    assert ladder == [(False, "NCHW", "fp32"), (False, "channels_last", "fp32"), (False, "channels_last", "amp")]
    assert {r["image_size"]: r["batch_size"] for r in rows} == {32: 8, 224: 2}
    assert all(r["warmup_seconds"] >= 0 for r in rows)
    full = bench._ladder(torch.device("cpu"), quick=False)
    assert full[-1] == (True, True, True) and len(full) == 4  # the full run compiles, after the three eager settings


def test_train_step_trains():
    """The timed step is a real training step: on a fixed batch the loss goes down."""
    torch.manual_seed(0)
    step = bench.make_train_step("test_resnet", torch.device("cpu"), compiled=False, channels_last=True, amp=True)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (8,))
    losses = [step(images, labels).item() for _ in range(8)]
    assert losses[-1] < losses[0]


def test_end_to_end_and_headroom(store, tiny_models, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.run(stages=["pipeline", "train_step", "end_to_end"], quick=True, json_path=out,
                     backends=["torch"], batch_size=16, data_dir=store.dir, device="cpu", log=lambda *_: None)
    e2e = [r for r in rows if r["stage"] == "end_to_end"]
    assert [(r["model"], r["image_size"], r["backend"]) for r in e2e] == [("test_resnet", 32, "torch"), ("test_resnet", 224, "torch")]
    assert all(r["images_per_sec"] > 0 and r["precision"] == "amp" for r in e2e)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows
    room = saved["headroom"]
    default = "dali" if dali_available() else "torch"  # headroom is for what backend="auto" runs
    pipe = {(r["image_size"], r["aug"]): r["images_per_sec"] for r in rows
            if r["stage"] == "pipeline" and r["backend"].startswith(default)}
    step = {r["image_size"]: max(s["images_per_sec"] for s in rows if s["stage"] == "train_step"
                                 and s["image_size"] == r["image_size"]) for r in e2e}
    assert len(room) == len(pipe)  # one row per default-backend pipeline row (one model here)
    for h in room:
        assert h["pipeline_img_s"] == pipe[(h["image_size"], h["aug"])]
        assert h["train_step_img_s"] == step[h["image_size"]]
        assert h["headroom"] == round(h["pipeline_img_s"] / h["train_step_img_s"], 2)


def test_cli_bench_writes_json_atomically(store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "fastcifar", "bench", "--stage", "pipeline", "--quick", "--backend", "torch",
                        "--batch-size", "16", "--data-dir", str(store.dir), "--device", "cpu", "--json", str(blocker / "b.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Cannot write" in r.stderr and "Traceback" not in r.stderr
