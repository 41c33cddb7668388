"""fastcifar deletes, replaces or recovers only what it can prove it wrote (owned.py). A look-alike
of every name it uses - the same name, extension, even the same contents, or a copy of its own
folder - is the user's: exit 2 with one paragraph, its bytes unchanged. Its own files are still
replaced and cleaned up as before."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastcifar import owned
from fastcifar.errors import BadInput
from fastcifar import data as fdata
from fastcifar.checkpoint import atomic_write, write_json
from fastcifar.reproduce import reproduce
from helpers import cli, make_run, one_paragraph

RUN = "tiny_own-seed0"  # the table's one run directory


def tree(root: Path) -> dict:
    """Every path under root with its bytes (files) and mtime: what "nothing touched" compares."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir", p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_table(table, out, store_dir):
    return cli("reproduce", table, "--out", out, "--data-dir", store_dir)


# ---- the rule itself


def test_a_file_is_fastcifars_while_it_is_as_written(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_json(d / "a.json", {"x": 1}, by="bench")
    assert owned.is_ours(d / "a.json", "bench") and not owned.is_ours(d / "a.json", "report")  # and by which command
    d.rename(tmp_path / "moved")  # a folder moved whole keeps its inodes: still fastcifar's
    d = tmp_path / "moved"
    assert owned.is_ours(d / "a.json", "bench")
    shutil.copytree(d, tmp_path / "copy")  # a copy is not, manifest and all
    assert not owned.is_ours(tmp_path / "copy" / "a.json")
    with pytest.raises(BadInput, match="`fastcifar bench` did not write a.json, .fastcifar-owned.json in"):
        write_json(tmp_path / "copy" / "a.json", {}, by="bench")
    (tmp_path / "other.json").write_text('{"x": 1}\n')
    os.replace(tmp_path / "other.json", d / "a.json")  # the same name, put in its place
    assert not owned.is_ours(d / "a.json")
    write_json(d / "b.json", {"x": 1}, by="bench")
    with open(d / "b.json", "a") as f:  # edited in place: the same inode, another size and mtime
        f.write(" ")
    assert not owned.is_ours(d / "b.json")
    assert owned.remove(d / "b.json", "bench") is False and (d / "b.json").exists()


def test_a_look_alike_manifest_is_never_replaced(tmp_path):
    for d, text in ((tmp_path / "mine", '{"my": "settings"}'), (tmp_path / "forged", '{"self": [1, 2], "entries": {}}')):
        d.mkdir()
        (d / owned.MANIFEST).write_text(text)
        code, _, err = cli("bench", "--json", d / "bench.json", "--quick")
        assert code == 2 and one_paragraph(err) and owned.MANIFEST in err, err
        assert sorted(os.listdir(d)) == [owned.MANIFEST] and (d / owned.MANIFEST).read_text() == text


RECORDER = """
import sys
from pathlib import Path
from fastcifar.checkpoint import write_json
d, who = Path(sys.argv[1]), sys.argv[2]
for i in range(25):
    write_json(d / f"{who}-{i}.json", {"i": i}, by="bench")
"""


def test_two_processes_recording_in_one_folder_lose_no_entry(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RECORDER, str(tmp_path), who], stderr=subprocess.PIPE, text=True)
             for who in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    files = [p for p in tmp_path.iterdir() if p.name != owned.MANIFEST]
    assert len(files) == 50 and all(owned.is_ours(p, "bench") for p in files)


# ---- reproduce


@pytest.mark.parametrize("name", ["results.md", "results.json", owned.MANIFEST])
def test_reproduce_never_replaces_a_results_file_it_did_not_write(table, store_dir, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("# my own results\n")
    before = tree(out)
    code, _, err = run_table(table, out, store_dir)
    assert code == 2 and one_paragraph(err) and name in err, err
    assert tree(out) == before  # no run started, nothing written


@pytest.mark.parametrize("name", ["recipe.json", "recipe.py", "metrics.jsonl", "summary.json", "best.pt",
                                  "events.out.tfevents.1700000000.host.1.0", ".recipe.json.k2j4.tmp", owned.MANIFEST])
def test_reproduce_never_deletes_a_run_file_it_did_not_write(table, store_dir, tmp_path, name):
    """A run directory without last.pt is restarted (its files deleted) only when that run wrote
    every file in it: one look-alike of the user's and the table stops there."""
    run = tmp_path / "out" / RUN
    run.mkdir(parents=True)
    (run / name).write_text('{"finished": false}\n')
    before = tree(tmp_path / "out")
    code, _, err = run_table(table, tmp_path / "out", store_dir)
    assert code == 2 and one_paragraph(err) and name in err, err
    assert tree(tmp_path / "out") == before


def test_a_finished_run_is_reported_and_never_retrained_or_changed(table, store_dir, tmp_path):
    """The user deleted a finished run's .pt files to free disk: the next reproduce reports it from
    its summary and touches none of its files (it used to restart the run, deleting the rest)."""
    out = tmp_path / "out"
    first = reproduce(str(table), out=out, data_dir=store_dir, log=lambda *a, **k: None)
    assert first["recipes"][0]["n"] == 1
    (out / RUN / "last.pt").unlink()
    (out / RUN / "best.pt").unlink()
    before = tree(out / RUN)
    code, stdout, err = run_table(table, out, store_dir)
    assert code == 0 and "done, skipped" in stdout, err
    assert tree(out / RUN) == before
    assert json.loads((out / "results.json").read_text())["recipes"][0]["best_acc"] == first["recipes"][0]["best_acc"]


def test_a_table_in_use_is_refused_before_anything_is_touched(table, store_dir, tmp_path):
    """The run in DIR died before its first checkpoint (files it wrote, no last.pt): reproduce
    restarts it, deleting them. While another process holds DIR (a reproduce running), or the run
    itself (a train --resume of it), nothing is deleted; once free, its own files go."""
    out = tmp_path / "out"
    run = out / RUN
    run.mkdir(parents=True)
    write_json(run / "recipe.json", {"died": "before its first checkpoint"}, by="train")
    atomic_write(run / "metrics.jsonl", lambda f: None, by="train")
    before = tree(out)
    for held, message in ((out, f"--out {out} is in use"), (run, f"{run} is in use")):
        fd = os.open(held, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as another process would
            code, _, err = run_table(table, out, store_dir)
        finally:
            os.close(fd)
        assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), err
        assert tree(out) == before
    code, stdout, err = run_table(table, out, store_dir)
    assert code == 0 and "starting" in stdout, err
    assert json.loads((run / "summary.json").read_text())["finished"]  # restarted and trained anew


def test_reproduce_out_a_symlink_loop_is_exit_2(table, store_dir, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    code, _, err = run_table(table, tmp_path / "a", store_dir)
    assert code == 2 and one_paragraph(err) and "loop" in err, err
    assert os.readlink(tmp_path / "a") == str(tmp_path / "b")


# ---- report


def test_report_replaces_only_a_reports_own_files(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastcifar.report import report

    make_run(tmp_path / "runs", "a", [10.0, 20.0])
    mine = tmp_path / "mine"
    mine.mkdir()
    plt.figure().savefig(mine / "test_accuracy.png")  # a figure matplotlib wrote: the user's all the same
    plt.close("all")
    table = tmp_path / "table"  # a reproduce DIR: its results.md is reproduce's, not report's
    table.mkdir()
    atomic_write(table / "results.md", lambda f: f.write(b"| run | recipe |\n"), by="reproduce")
    for out, name in ((mine, "test_accuracy.png"), (table, "results.md")):
        before = tree(out)
        with pytest.raises(BadInput, match=f"`fastcifar report` did not write .*{name}"):
            report([tmp_path / "runs"], out)
        assert tree(out) == before
    report([tmp_path / "runs"], tmp_path / "rep")
    report([tmp_path / "runs"], tmp_path / "rep")  # its own: replaced


def test_a_report_that_cannot_write_its_pictures_leaves_results_md_as_it_was(tmp_path, monkeypatch):
    """A full disk while the PNGs are written: results.md is written last, so it never shows a new
    table beside old or missing pictures."""
    import fastcifar.report as R

    make_run(tmp_path / "runs", "a", [10.0, 20.0])
    R.report([tmp_path / "runs"], tmp_path / "rep")
    before = (tmp_path / "rep" / "results.md").read_bytes()
    make_run(tmp_path / "runs", "b", [30.0])
    write = R.atomic_write

    def full_disk(path, *a, **k):
        if Path(path).name == "test_loss.png":
            raise OSError(28, "No space left on device")
        return write(path, *a, **k)

    monkeypatch.setattr(R, "atomic_write", full_disk)
    with pytest.raises(BadInput, match="No space left"):
        R.report([tmp_path / "runs"], tmp_path / "rep")
    assert (tmp_path / "rep" / "results.md").read_bytes() == before


# ---- train --resume and export, beside a run's checkpoints


def test_resume_of_a_copied_run_is_refused_and_says_how_to_continue_it(trained_run, store_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    before = tree(copy)
    code, _, err = cli("train", "--resume", copy, "--set", "train.epochs=2", "--data-dir", store_dir)
    flat = " ".join(err.split())
    assert code == 2 and one_paragraph(err) and f"--resume {copy} --out NEW_DIR" in flat, err
    assert tree(copy) == before


def test_export_replaces_only_an_earlier_export(trained_run, store_dir, tmp_path):
    run = tmp_path / "run"  # the run, as if written here (export writes beside its best.pt)
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(owned.MANIFEST))
    mine = run / "best-timm.pth"  # the default name, a file of the user's
    mine.write_bytes(b"my own weights")
    args = ("export", run, "--format", "timm", "--data-dir", store_dir, "--force")
    code, _, err = cli(*args)
    assert code == 2 and one_paragraph(err) and "earlier export" in err.replace("\n", " ") and \
        mine.read_bytes() == b"my own weights", err
    mine.unlink()
    for _ in range(2):  # written, then its own replaced
        code, _, err = cli(*args)
        assert code == 0 and owned.is_ours(mine, "export"), err


# ---- the store and what a prepare leaves beside it

SMALL = dict(synthetic=True, n_train=200, n_test=100, log=lambda *_: None)


def test_look_alikes_of_a_prepares_leftovers_are_kept(tmp_path):
    """.NAME.tmp-* (unlocked) and .NAME.old-* folders beside a store are prepare's to delete only when
    its manifest proves it made them: a copy of a real store under that name is the user's."""
    store = fdata.prepare(tmp_path / "cifar100", **SMALL)
    shutil.copytree(store, tmp_path / ".cifar100.old-1-abcdef")  # a complete store, but a copy
    (tmp_path / ".cifar100.tmp-mine").mkdir()
    (tmp_path / ".cifar100.tmp-mine" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    fdata.open_store(store)
    fdata.prepare(store, **SMALL)
    assert tree(tmp_path) == before
    fdata.prepare(store, **{**SMALL, "seed": 1}, force=True)  # its own store still replaced, the look-alikes kept
    assert fdata.open_store(store).meta["source"]["seed"] == 1
    assert {k: v for k, v in tree(tmp_path).items() if k.startswith(".cifar100.")} == \
        {k: v for k, v in before.items() if k.startswith(".cifar100.")}


def test_a_copied_store_is_not_replaced_a_moved_one_is(tmp_path):
    store = fdata.prepare(tmp_path / "store", **SMALL)
    shutil.copytree(store, tmp_path / "copy")
    before = tree(tmp_path / "copy")
    code, _, err = cli("prepare", "--synthetic", "--train", "200", "--test", "100", "--seed", "1",
                       "--force", "--data-dir", tmp_path / "copy")
    assert code == 2 and one_paragraph(err) and "did not build there" in err.replace("\n", " "), err
    assert tree(tmp_path / "copy") == before
    store.rename(tmp_path / "moved")
    fdata.prepare(tmp_path / "moved", **{**SMALL, "seed": 1}, force=True)
    assert fdata.open_store(tmp_path / "moved").meta["source"]["seed"] == 1


def test_a_ctrl_c_between_the_rename_and_the_manifest_waits_for_both(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) the moment a file is renamed into place: it is entered in its manifest
    before the KeyboardInterrupt, so the next write (a stopped bench's last --json, the results of
    a stopped table) may replace it."""
    import signal

    record = owned.record

    def interrupted(paths, by, **kw):  # the signal lands after the rename, before the manifest is written
        signal.raise_signal(signal.SIGINT)  # in this (the main) thread: a process-wide kill may land on another
        record(paths, by, **kw)

    path = tmp_path / "bench.json"
    monkeypatch.setattr(owned, "record", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"rows": [1]}, by="bench")
    monkeypatch.setattr(owned, "record", record)
    assert owned.is_ours(path, "bench")
    write_json(path, {"rows": [1, 2]}, by="bench")  # the stopped bench's last write
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
