"""Provenance (fastcifar/provenance.py): what produced a run, in summary.json; git is asked with a
timeout and never fails a run; report's checks of runs that differ in data or software."""

import io
import json
import os
import shutil
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

from fastcifar import provenance


def test_collect_names_software_hardware_data_and_command(store, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fastcifar", "train", "smoke", "--set", "train.epochs=1"])
    p = provenance.collect(torch.device("cpu"), 1, store)
    assert (p["python"], p["torch"], p["timm"]) == (platform.python_version(), str(torch.__version__), timm.__version__)
    assert p["cuda"] == torch.version.cuda and p["world_size"] == 1 and p["gpu"] is None and p["cpu"]
    assert p["argv"] == ["fastcifar", "train", "smoke", "--set", "train.epochs=1"] and p["cwd"] == os.getcwd()
    assert p["data"]["dataset"] == "synthetic" and p["data"]["source"]["kind"] == "synthetic"
    assert p["data"]["outputs_sha256"] == store.meta["checksums"]["outputs_sha256"]
    assert json.loads(json.dumps(p)) == p  # plain JSON: summary.json reads back equal
    buf = io.BytesIO()
    torch.save({"provenance": p}, buf)  # and last.pt, which holds it, still loads with weights_only=True
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["provenance"] == p
    try:
        import nvidia.dali
        assert p["dali"] == nvidia.dali.__version__
    except ImportError:
        assert p["dali"] is None
    # this checkout's commit (the suite runs from a checkout; an installed wheel has no .git beside it)
    root = Path(provenance.__file__).resolve().parent.parent
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert p["git"]["commit"] == head and isinstance(p["git"]["dirty"], bool)


def test_data_names_the_data_set_of_a_real_store(store, tmp_path):
    """A CIFAR-10 store is named cifar10 (report tells its runs from CIFAR-100's by it), not cifar100."""
    import types

    for dataset in ("cifar100", "cifar10"):
        real = types.SimpleNamespace(meta={"dataset": dataset, "checksums": {}}, synthetic=False, dataset=dataset,
                                     dir=tmp_path)
        assert provenance.data_info(real)["dataset"] == dataset
    assert provenance.data_info(store)["dataset"] == "synthetic"


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_git_commit_and_dirty_tree(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "runs").mkdir()
    (repo / "runs" / "new.txt").write_text("untracked files are not a dirty tree")
    assert provenance.git_state(repo)["dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(repo) == {"commit": head, "dirty": True}
    assert provenance.git_state(tmp_path / "not-a-checkout") is None  # an installed package: no .git beside it


def test_missing_or_slow_git_never_fails_or_holds_up_a_run(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all
    assert provenance.git_state(repo) is None
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "git").write_text(f"#!/bin/sh\nexec {sleep} 30\n")
    (slow / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(slow))
    monkeypatch.setattr(provenance, "GIT_TIMEOUT", 0.5)
    t = time.perf_counter()
    assert provenance.git_state(repo) is None
    assert time.perf_counter() - t < 5


def test_a_git_status_that_fails_leaves_dirty_unknown(tmp_path, monkeypatch):
    """rev-parse answers but status fails (a lock, a damaged index): the commit is kept and dirty is
    None (unknown), neither False (a clean tree) nor read from the failed command's output."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "git").write_text('#!/bin/sh\ncase "$3" in\n  rev-parse) echo abc123; exit 0;;\n'
                              '  status) echo " M a.py"; exit 128;;\nesac\nexit 1\n')
    (bin_ / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    assert provenance.git_state(repo) == {"commit": "abc123", "dirty": None}


def test_cpu_model_is_the_model_name_line(monkeypatch):
    """/proc/cpuinfo has a 'model' line (a number) before 'model name': the name is what is reported."""
    from types import SimpleNamespace

    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9654 96-Core\n"
    monkeypatch.setattr(provenance, "Path", lambda p: SimpleNamespace(read_text=lambda: cpuinfo))
    assert provenance.cpu_model() == "AMD EPYC 9654 96-Core"


def test_summary_keeps_the_earlier_processes_of_a_resumed_run():
    a, b = {"torch": "2.10", "argv": ["x"]}, {"torch": "2.14", "argv": ["y"]}
    assert provenance.for_summary([]) is None
    assert provenance.for_summary([a]) == a
    assert provenance.for_summary([a, b]) == {**b, "earlier": [a]}


def prov(torch_v="2.14.1", dataset="cifar100", sha="aaa", timm_v="1.0.31", dali="2.4.0"):
    return {"torch": torch_v, "timm": timm_v, "dali": dali, "data": {"dataset": dataset, "outputs_sha256": {"x": sha}}}


def test_mismatches_name_runs_that_differ_in_data_or_software():
    assert provenance.mismatches([("a", prov()), ("b", prov())]) == []
    (msg,) = provenance.mismatches([("a", prov()), ("b", prov(dataset="synthetic")), ("c", prov())])
    assert "different data" in msg and "cifar100" in msg and "synthetic" in msg and "a, c" in msg
    (msg,) = provenance.mismatches([("a", prov()), ("b", prov(sha="bbb"))])  # same data set, another store
    assert "different data" in msg
    msgs = provenance.mismatches([("a", prov()), ("b", prov(torch_v="2.10.0", dali=None))])
    assert any("torch versions" in m and "2.10.0: b" in m for m in msgs)
    assert any("dali versions" in m and "none: b" in m for m in msgs)
    (msg,) = provenance.mismatches([("a", prov()), ("old", None)])
    assert "No provenance for old" in msg
    resumed = {**prov(), "earlier": [prov(timm_v="1.0.0")]}
    (msg,) = provenance.mismatches([("r", resumed)])
    assert "r was resumed under other software" in msg and "timm" in msg
    # a damaged summary's provenance is not a reason to fail
    assert provenance.mismatches([("a", {"earlier": 3, "data": 5}), ("b", "junk")])


def test_runs_all_without_provenance_get_no_warning():
    """'No provenance for X ... cannot be checked against the others'' needs others: a table of
    old runs only has nothing to compare them with."""
    assert provenance.mismatches([("old", None), ("older", None)]) == []
