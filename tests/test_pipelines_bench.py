"""`fastcifar bench --stage pipeline`: rows in DESIGN.md's shape, the table, the JSON, bad input.
Behaviour only: no figure is asserted (speed is the bench's job, not the tests')."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fastcifar import bench
from fastcifar.errors import BadInput
from helpers import cli, needs_dali

KEYS = {"stage", "backend", "image_size", "batch_size", "device", "images_per_sec", "aug"}


AUGS = ("none", "oneof", "trivialaugment", "randaugment")


def test_pipeline_rows_table_json(store, short_bench_plans, tmp_path):
    """Rows for every backend, size and augmentation (none, OneOf and the two policies); the
    tutorial's albumentations path has no policy, so where it is installed its policy rows are
    left out (and said so), and without it its torch fallback runs them."""
    from fastcifar.pipelines.tutorial import albumentations_available

    out = tmp_path / "b" / "bench.json"
    lines = []
    rows = bench.run(stages=["pipeline"], json_path=out, quick=True, backends=["tutorial", "torch"],
                     batch_size=16, data_dir=store.dir, device="cpu", log=lines.append)
    tutorial_augs = AUGS[:2] if albumentations_available() else AUGS
    for r in rows:
        assert KEYS <= set(r) and r["stage"] == "pipeline" and r["device"] == "cpu" and r["batch_size"] == 16
        # whole numbers from 100 img/s up, three significant figures below (bench.img_s): a loaded machine gives those
        assert isinstance(r["images_per_sec"], int if r["images_per_sec"] >= 100 else (int, float))
        assert r["images_per_sec"] > 0
    assert sorted((r["backend"], r["image_size"], r["aug"]) for r in rows) == sorted(
        [("tutorial", s, a) for s in (32, 224) for a in tutorial_augs] + [("torch", s, a) for s in (32, 224) for a in AUGS])
    if albumentations_available():
        assert sum("skipped, albumentations has no" in line for line in lines) == 2 * 2
    assert all(r["vs_tutorial"] == 1.0 for r in rows if r["backend"] == "tutorial")
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["meta"]["quick"] is True and saved["meta"]["store"] == "synthetic"
    printed = "\n".join(lines)
    assert bench.table(rows) in printed and printed.count("| pipeline |") == len(rows)


@needs_dali
def test_each_dali_row_comes_with_its_host_side_alone(store, short_bench_plans, monkeypatch):
    """After each DALI row, its host side alone (dali-host: the memmap reads and draws its thread
    makes for external_source, timed over the row's own batches, in ms per batch too), on the CPU;
    not a loader, so neither compared with the tutorial's path nor in the headroom or the picture;
    bench/tables.py shows it with what it is."""
    import threading

    from fastcifar.pipelines.dali import DaliBackend

    made, inputs = [], DaliBackend.inputs

    def spy(self, batches, epoch):
        for a in inputs(self, batches, epoch):
            made.append(threading.current_thread() is threading.main_thread())
            yield a

    monkeypatch.setattr(DaliBackend, "inputs", spy)
    rows = bench.run(stages=["pipeline"], quick=True, backends=["tutorial", "dali"], sizes=[32], batch_size=16,
                     data_dir=store.dir, device="cpu", log=lambda *_: None)
    warmup, repeats, batches = bench.PLAN["quick"][32]
    assert sum(made) == len(AUGS) * (warmup + repeats * batches)  # the host rows' batches, made on the bench's thread
    host = [r for r in rows if r["backend"] == bench.HOST]
    assert [r["aug"] for r in host] == list(AUGS)
    for r in host:
        before = rows[rows.index(r) - 1]
        assert (before["backend"], before["aug"]) == ("dali-cpu", r["aug"]) and KEYS <= set(r)
        assert r["device"] == "cpu" and r["images_per_sec"] > 0 and "vs_tutorial" not in r
        assert abs(r["ms_per_batch"] - 1000 * 16 / r["images_per_sec"]) <= 0.01 * r["ms_per_batch"] + 1e-3
    step = {"stage": "train_step", "model": "m", "image_size": 32, "images_per_sec": 100}
    assert {h["pipeline"] for h in bench.headroom(rows + [step])} == {"tutorial", "dali-cpu"}
    fig = bench.figure({"meta": {}, "rows": rows, "headroom": []})
    assert {b.get_gid() for b in fig.axes[0].patches} == {"tutorial", "dali-cpu"}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import tables

    assert "| dali-host (host side alone: reads + draws) |" in tables.pipeline_table(rows)


def test_table_is_generic():
    """Later stages bring other columns: the table takes the union of keys, blanks where absent."""
    t = bench.table([{"stage": "a", "images_per_sec": 1234}, {"stage": "b", "loss": 0.5}])
    assert t.splitlines() == ["| stage | images_per_sec | loss |", "|---|---|---|",
                              "| a | 1,234 |  |", "| b |  | 0.5 |"]


def test_bad_input(store):
    with pytest.raises(BadInput, match="stage"):
        bench.run(stages=["nope"], data_dir=store.dir, log=lambda *_: None)
    with pytest.raises(BadInput, match="backend"):
        bench.run(backends=["jax"], data_dir=store.dir, log=lambda *_: None)
    with pytest.raises(BadInput, match="store has 500"):  # the full plan needs 155 batches of 250
        bench.run(quick=False, backends=["torch"], data_dir=store.dir, device="cpu", log=lambda *_: None)


def test_cli_bad_stage_exits_2(store):
    code, _, err = cli("bench", "--stage", "nope", "--data-dir", store.dir)
    assert code == 2 and "Unknown bench stage 'nope'" in err and "Traceback" not in err


def _clock(monkeypatch):
    """A fake bench clock (seconds); the code under test advances it by what each batch or step costs."""
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_measure_is_the_median_repeat_in_images_per_second_after_the_warm_up(monkeypatch):
    """The warm-up batches (a loader's start-up: slow) are read and not timed; a repeat's rate is its
    images (not batches) over its seconds; the row takes the median repeat, not the best or worst."""
    import torch

    now = _clock(monkeypatch)
    costs = [50.0, 50.0, 1.0, 1.0, 2.0, 2.0, 0.5, 0.5]  # seconds per batch: 2 warm-up, then 3 repeats of 2
    read = []

    def loader():
        for k, cost in enumerate(costs + [99.0]):  # one batch more than the plan reads
            now[0] += cost
            read.append(k)
            yield torch.zeros(10, 3, 4, 4), torch.zeros(10)  # 10 images a batch

    # repeats: 20 images in 2 s, 4 s and 1 s -> 10, 5 and 20 img/s
    assert bench.measure(loader(), torch.device("cpu"), warmup=2, repeats=3, batches=2) == 10.0
    assert read == list(range(len(costs)))


def test_vs_tutorial_is_each_rows_speed_over_the_tutorials_at_the_same_size_and_aug():
    rows = [{"stage": "pipeline", "backend": "tutorial", "image_size": 32, "aug": "oneof", "images_per_sec": 1000},
            {"stage": "pipeline", "backend": "torch", "image_size": 32, "aug": "oneof", "images_per_sec": 4000},
            {"stage": "pipeline", "backend": "torch", "image_size": 224, "aug": "oneof", "images_per_sec": 500},
            {"stage": "pipeline", "backend": "torch", "image_size": 32, "aug": "none", "images_per_sec": 9000}]
    bench.vs_tutorial(rows)
    assert [r.get("vs_tutorial") for r in rows] == [1.0, 4.0, None, None]  # no tutorial row to compare with: none


def test_a_store_of_exactly_the_plans_images_is_measured_and_one_batch_short_is_refused(store, monkeypatch):
    """The warm-up and the repeats read one epoch at most: a store that holds exactly their images is
    measured; a batch size that needs 5 more images than the store holds is refused before measuring."""
    monkeypatch.setitem(bench.PLAN, "quick", {32: (1, 1, 4), 224: (1, 1, 4)})  # 5 batches
    rows = bench.run(stages=["pipeline"], quick=True, backends=["torch"], sizes=[32], batch_size=100,
                     data_dir=store.dir, device="cpu", log=lambda *_: None)  # 5 x 100 = the store's 500 images
    assert len(rows) == len(AUGS) and all(r["images_per_sec"] > 0 for r in rows)
    with pytest.raises(BadInput, match="reads 505 train images in one epoch at 32 px, but the store has 500"):
        bench.run(stages=["pipeline"], quick=True, backends=["torch"], sizes=[32], batch_size=101,
                  data_dir=store.dir, device="cpu", log=lambda *_: None)
