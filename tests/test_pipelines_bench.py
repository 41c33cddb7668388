"""`fastcifar bench --stage pipeline`: rows in DESIGN.md's shape, the table, the JSON, bad input.
Behaviour only: no figure is asserted (speed is the bench's job, not the tests')."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastcifar import BadInput
from fastcifar import bench

KEYS = {"stage", "backend", "image_size", "batch_size", "device", "images_per_sec", "aug"}


AUGS = ("none", "oneof", "trivialaugment", "randaugment")


def test_pipeline_rows_table_json(store, tmp_path):
    """Rows for every backend, size and augmentation (none, OneOf and the two policies); the
    tutorial's albumentations path has no policy, so where it is installed its policy rows are
    left out (and said so), and without it its torch fallback runs them."""
    from pipelines.tutorial import albumentations_available

    out = tmp_path / "b" / "bench.json"
    lines = []
    # batch 16 so the quick plan's (2 + 3 * 8) batches fit the 500-image test store in one epoch
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
    r = subprocess.run([sys.executable, "-m", "fastcifar", "bench", "--stage", "nope", "--data-dir", str(store.dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Unknown bench stage 'nope'" in r.stderr and "Traceback" not in r.stderr
