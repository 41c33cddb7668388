"""`fastcifar report`: the results table and plots from run directories (DESIGN.md run contract)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar import BadInput
from fastcifar.report import find_runs, report, results_table


def make_run(root: Path, name: str, accs: list[float], synthetic=False, val=None, summary=True, description="what it does"):
    """A run directory as `fastcifar train` writes it, with the given test accuracy per epoch."""
    d = root / name
    d.mkdir(parents=True)
    epochs = []
    for i, acc in enumerate(accs, 1):
        e = {"epoch": i, "train_loss": 4.0 / i, "train_acc": acc + 5, "test_acc": acc, "test_top5": min(acc + 20, 100),
             "test_loss": 5.0 - acc / 25, "lr": 1e-3, "images_per_sec": 1000.0 + i, "epoch_seconds": 10.0,
             "wall_seconds": 10.0 * i}
        if val:
            e.update(val_acc=val[i - 1], val_top5=val[i - 1] + 10, val_loss=1.0)
        epochs.append(e)
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (d / "recipe.json").write_text(json.dumps({"name": name.split("-")[0], "description": description,
                                               "train": {"epochs": len(accs)}}))
    if summary:
        best = max(range(len(accs)), key=accs.__getitem__)
        s = {"recipe": name.split("-")[0], "description": description, "best_acc": accs[best], "best_epoch": best + 1,
             "final_acc": accs[-1], "final_top5": 90.0, "epochs_done": len(accs), "epochs": len(accs),
             "train_images_per_sec": 1234.5, "wall_seconds": 10.0 * len(accs) + 3725 * (name == "slow"),
             "device": "cpu", "backend": "torch", "world_size": 1, "synthetic": synthetic,
             "selection": "val" if val else "test", "finished": True, "stop_reason": None}
        if val:
            bv = max(range(len(val)), key=val.__getitem__)
            s.update(best_val_acc=val[bv], best_val_epoch=bv + 1, test_acc_at_best_val=accs[bv])
        (d / "summary.json").write_text(json.dumps(s))
    return d


def _row(table: str, run: str) -> list[str]:
    line = next(l for l in table.splitlines() if l.startswith(f"| {run} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_has_tutorial_shape_and_flags(tmp_path):
    make_run(tmp_path, "r18_baseline-1", [30.0, 44.26, 41.0], description="timm resnet18 from scratch")
    make_run(tmp_path, "smoke-1", [10.0, 55.5], synthetic=True)
    make_run(tmp_path, "slow", [60.0])
    table = results_table(find_runs([tmp_path]))
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert head == ["run", "recipe", "what changes", "best test acc (epoch)", "final test acc", "epochs", "wall time", "train img/s"]
    assert _row(table, "r18_baseline-1") == ["r18_baseline-1", "r18_baseline", "timm resnet18 from scratch",
                                             "44.26% (2)", "41.00%", "3/3", "0m 30s", "1,234"]
    assert "synthetic data" in _row(table, "smoke-1")[1]
    assert "synthetic data" not in _row(table, "r18_baseline-1")[1]
    assert "say nothing about CIFAR-100" in table
    assert _row(table, "slow")[6] == "1h 02m"


def test_validation_and_test_shown_apart(tmp_path):
    make_run(tmp_path, "withval", [40.0, 50.0, 45.0], val=[41.0, 43.0, 47.0])
    make_run(tmp_path, "noval", [20.0])
    table = results_table(find_runs([tmp_path / "withval", tmp_path / "noval"]))
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert head[4:6] == ["best val acc (epoch)", "test acc at best val"]
    row = _row(table, "withval")
    assert row[3] == "50.00% (2)"              # best on test, the tutorial's way
    assert row[4:6] == ["47.00% (3)", "45.00%"]  # selected on validation: test at that epoch
    assert _row(table, "noval")[4:6] == ["—", "—"]


def test_run_without_summary_is_derived_and_marked(tmp_path):
    make_run(tmp_path, "crashed", [12.0, 30.0, 25.0], summary=False)
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "test_a')  # cut short by the crash
    (run,) = find_runs([tmp_path / "crashed"])
    assert run.summary["best_acc"] == 30.0 and run.summary["best_epoch"] == 2 and run.summary["final_acc"] == 25.0
    assert "unfinished" in _row(results_table([run]), "crashed")[1]


def test_report_writes_table_and_pngs(tmp_path):
    make_run(tmp_path / "runs", "a", [10.0, 20.0, 30.0])
    make_run(tmp_path / "runs", "b", [15.0, 25.0], synthetic=True)
    table, files = report([tmp_path / "runs"], tmp_path / "out")
    assert (tmp_path / "out" / "results.md").read_text() == table
    for png in files[1:]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.md", "test_accuracy.png", "test_loss.png"]


def test_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no run directories"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(BadInput, match="not a directory"):
        find_runs([tmp_path / "missing"])
    d = make_run(tmp_path, "bad", [1.0])
    (d / "summary.json").write_text("{not json")
    with pytest.raises(BadInput, match="Cannot read"):
        find_runs([d])


def test_cli_report(tmp_path):
    make_run(tmp_path / "runs", "r18_lbsmooth-1", [44.81])
    r = subprocess.run([sys.executable, "-m", "fastcifar", "report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "44.81% (1)" in r.stdout and (tmp_path / "rep" / "test_accuracy.png").is_file()
    r = subprocess.run([sys.executable, "-m", "fastcifar", "report", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a directory" in r.stderr
