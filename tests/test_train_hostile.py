"""Hostile and unlucky inputs to train, resume and eval: each gets one paragraph and exit 2, and
nothing of a run (or of the user's) is lost or half-written. The resume contract: a run continues
exactly as it was, on its own store, changing only what cannot change its meaning."""

import json
import os
import re
import resource
import signal
import sys

import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint, config
from fastcifar.data import prepare
from fastcifar.errors import BadInput
from helpers import CPU_ALLOC, QUIET, cli, fit, info, one_paragraph, tiny


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ---- the resume contract


def test_resume_finds_its_own_store_without_data_dir(run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data/cifar100 here: only the run knows where its store is
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)
    s = T.train(tiny(train__epochs=3), {}, resume=run_copy, **QUIET)
    assert s["finished"] and s["epochs_done"] == 3


def test_resume_refuses_a_different_store(run_copy, tmp_path):
    other = tmp_path / "other"
    prepare(other, synthetic=True, n_train=1000, n_test=300, seed=5, log=lambda *_: None)  # same shape, other images
    before = snapshot(run_copy)
    with pytest.raises(BadInput, match="holds other data"):
        T.train(tiny(train__epochs=3), {}, resume=run_copy, data_dir=other, **QUIET)
    assert snapshot(run_copy) == before


def test_resume_into_another_out_continues_there_and_only_reads_the_run(run_copy, tmp_path, store_dir):
    """--resume RUN --out NEW: how a run copied from elsewhere (whose files are not fastcifar's to
    replace) is continued. NEW must be new or empty; RUN is read, never written."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not empty"):
        T.train(tiny(train__epochs=3), {}, resume=run_copy, out=tmp_path / "full", data_dir=store_dir, **QUIET)
    before = snapshot(run_copy)
    s = T.train(tiny(train__epochs=3), {}, resume=run_copy, out=tmp_path / "elsewhere", data_dir=store_dir, **QUIET)
    assert s["finished"] and s["epochs_done"] == 3 and snapshot(run_copy) == before
    assert [json.loads(line)["epoch"] for line in (tmp_path / "elsewhere" / "metrics.jsonl").open()] == [1, 2, 3]
    assert checkpoint.load(tmp_path / "elsewhere" / "last.pt")["epoch"] == 3


@pytest.mark.parametrize("override, allowed", [
    ("model.name=resnet18", False), ("optim.lr=0.1", False), ("head.kind=arcface", False),
    ("data.batch_size=25", False), ("aug.hflip=0.5", False), ("train.seed=3", False), ("train.epochs=1", False),
    ("train.epochs=3", True), ("train.log_every=2", True), ("data.backend=tutorial", True),
])
def test_resume_overrides_only_what_keeps_the_run_the_same(run_copy, store_dir, override, allowed):
    before = snapshot(run_copy)
    code, _, err = cli("train", "--resume", run_copy, "--data-dir", store_dir, "--set", override)
    if allowed:
        assert code == 0, err
        return
    assert code == 2 and one_paragraph(err), err
    assert override.split("=")[0] in err
    assert snapshot(run_copy) == before  # refused before anything was written


def test_a_checkpoint_missing_a_key_is_named(run_copy, store_dir):
    ck = checkpoint.load(run_copy / "last.pt", need="resume")
    del ck["optimizer"]
    torch.save(ck, run_copy / "last.pt")
    with pytest.raises(BadInput, match=r"last\.pt lacks optimizer"):
        T.train(tiny(train__epochs=3), {}, resume=run_copy, data_dir=store_dir, **QUIET)


def test_weights_that_do_not_fit_the_recipe_are_named(run_copy, store_dir):
    ck = checkpoint.load(run_copy / "best.pt")
    ck["recipe"]["head"]["kind"] = "arcface"  # the recipe now describes another head than the weights
    torch.save(ck, run_copy / "best.pt")
    code, _, err = cli("eval", run_copy / "best.pt", "--data-dir", store_dir, "--device", "cpu")
    assert code == 2 and one_paragraph(err) and "do not fit" in err.replace("\n", " ") and "best.pt" in err


# ---- secure loading


class Payload:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_checkpoint_holding_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    torch.save({"model": {}, "recipe": {}, "epoch": 1, "x": Payload()}, tmp_path / "evil.pt")
    code, out, err = cli("eval", tmp_path / "evil.pt")
    assert code == 2 and one_paragraph(err) and "refuses" in err
    assert "weights_only=False" not in err and "would have run" not in out


# ---- where a run is written


def test_out_that_is_a_file_a_full_directory_or_unwritable(store_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for out, message in [(tmp_path / "file", "is a file"), (tmp_path / "mine", "not empty"),
                         ("/proc/fastcifar-run", "choose another --out")]:
        code, _, err = cli("train", "smoke", "--data-dir", store_dir, "--out", out)
        assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), err
    assert (tmp_path / "file").read_text() == "mine" and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_full_disk_mid_run_stops_with_last_pt_intact(store_dir, tmp_path):
    """From epoch 2's evaluation on, no file may grow past 256 KiB (RLIMIT_FSIZE: writes fail with
    EFBIG, as on a full disk): saving epoch 2's last.pt (~5 MB) fails."""
    run, limits = tmp_path / "run", resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    evaluations = []

    def disk_fills(epoch, i, images):  # evaluation always reads its loader as epoch 0: count the passes
        evaluations.append(i)
        if evaluations.count(0) == 2 and i == 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, limits[1]))

    try:
        with pytest.raises(BadInput, match=r"Could not write (best|last)\.pt.*--resume"):
            fit(tiny(data__subset=0.3, data__test_subset=0.3), info(), out=run, data_dir=store_dir, test_fn=disk_fills)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert checkpoint.load(run / "last.pt")["epoch"] == 1  # the previous complete one
    s = json.loads((run / "summary.json").read_text())
    assert not s["finished"] and re.search(r"could not write (best|last)\.pt", s["stop_reason"])
    # summary.json names only epochs whose checkpoints are on disk: epoch 2 was never saved
    assert s["epochs_done"] == 1 and s["best_epoch"] == checkpoint.load(run / "best.pt")["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def fail_in_epoch_2(monkeypatch, error: Exception) -> None:
    """Trainer.train_step raises `error` in epoch 2's first step, as the device's allocator would."""
    step = T.Trainer.train_step

    def tight(self, *a):
        if self.progress.epoch == 1:
            raise error
        return step(self, *a)

    monkeypatch.setattr(T.Trainer, "train_step", tight)


def test_running_out_of_device_memory_is_one_paragraph_keeping_the_last_epoch(store_dir, tmp_path, monkeypatch):
    """A batch the GPU cannot hold (torch.OutOfMemoryError, raised here in epoch 2's first step as
    CUDA's allocator would): exit 2 naming what to lower, summary.json says why, last.pt is epoch 1's.
    eval --batch-size too big for the device is the same kind of error."""
    fail_in_epoch_2(monkeypatch, torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity of 79.00 GiB\nIf reserved but "
        "unallocated memory is large try setting ..."))
    run = tmp_path / "run"
    with pytest.raises(BadInput, match=r"ran out of memory on cpu in epoch 2 \(CUDA out of memory\. Tried to "
                                       r"allocate 9\.00 GiB.*\); last\.pt holds epoch 1\. Lower data\.batch_size"):
        T.train(tiny(train__epochs=2, data__subset=0.3), info(), out=run, data_dir=store_dir, **QUIET)
    assert checkpoint.load(run / "last.pt")["epoch"] == 1
    s = json.loads((run / "summary.json").read_text())
    assert not s["finished"] and s["stop_reason"] == "out of device memory" and s["epochs_done"] == 1
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    code, _, err = cli("eval", run, "--data-dir", store_dir, "--device", "cpu", "--batch-size", 100)
    assert code == 2 and one_paragraph(err) and "lower --batch-size (now 100)" in err.replace("\n", " "), err


def test_running_out_of_cpu_memory_is_one_paragraph_too(store_dir, tmp_path, monkeypatch):
    """On a CPU torch's allocator raises a plain RuntimeError, not torch.OutOfMemoryError: in a step
    (a batch too big) and while building the model (here for real: a 2**40-wide embedding)."""
    step = T.Trainer.train_step
    fail_in_epoch_2(monkeypatch, RuntimeError(CPU_ALLOC))
    run = tmp_path / "run"
    with pytest.raises(BadInput, match=r"ran out of memory on cpu in epoch 2 \(can't allocate memory: you tried to "
                                       r"allocate 9663676416 bytes.*last\.pt holds epoch 1"):
        T.train(tiny(train__epochs=2, data__subset=0.3), info(), out=run, data_dir=store_dir, **QUIET)
    monkeypatch.setattr(T.Trainer, "train_step", step)
    with pytest.raises(BadInput, match=r"Building .* ran out of memory on cpu \(can't allocate memory.*head\.embed_dim "
                                       r"\(now 1099511627776\)"):
        T.train(tiny(head__kind="arcface", head__embed_dim=2 ** 40), info(), out=tmp_path / "big", data_dir=store_dir,
                **QUIET)
    assert not (tmp_path / "big").exists()
    monkeypatch.setattr(T.Trainer, "train_step", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other error is not called a memory error
        T.train(tiny(), info(), out=tmp_path / "other", data_dir=store_dir, **QUIET)


# ---- recipes and values a careless user writes


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "finite"), ("optim.lr=inf", "finite"), ("optim.weight_decay=nan", "finite"),
    ("train.seed=-1", "train.seed"), ("head.s=inf", "finite"),
    ("train.device=cuda:abc", "cuda:N"), ("train.device=cuda:-1", "cuda:N"),  # not a torch.device: a traceback on a GPU
    ("aug.image_size=100000", "at most 1024 px"), ("loss.scales=32,100000", "at most 1024 px"),  # DALI's bad_alloc
    ("loss.scales=32," + "9" * 30, "at most 1024 px"), ("aug.oneof=" + "x" * 5000, "unknown op"),
    ("model.name=" + "x" * 5000, "not a timm model"),  # checked before the data set is downloaded
])
def test_non_finite_and_out_of_range_values_exit_2(tmp_path, override, message):
    code, _, err = cli("train", "smoke", "--set", override, "--out", tmp_path / "run")
    assert code == 2 and one_paragraph(err) and message in err and override.split("=")[0] in err
    assert len(err) < 400  # a 500-digit value is shown cut, not whole
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body, message", [
    ("r.train.epochs = '10'", "expected an int, got a str"),
    ("r.optim.betas = 0.9", "expected 2 comma-separated"),
    ("r.train = 5", "section train was replaced"),
    ("import sys; sys.exit(3)", "sys.exit(3)"),
    ("raise GeneratorExit", "raised GeneratorExit."),  # BaseExceptions that are not Ctrl-C are the recipe's fault too
    ("raise type('Stop', (BaseException,), {})('stop')", "raised Stop: stop"),
    # the message's first line only (the line of code shown after it names the variable, not its text)
    ("advice = 'bad lr\\n\\nTraceback (most recent call last):\\n  advice'\n    raise ValueError(advice)",
     "raised ValueError: bad lr. At"),
])
def test_recipes_with_wrong_types_or_sys_exit_exit_2(tmp_path, body, message):
    (tmp_path / "bad.py").write_text(f'"""A careless recipe."""\nfrom fastcifar.config import Recipe\n\n\n'
                                     f'def recipe():\n    r = Recipe()\n    {body}\n    return r\n')
    code, _, err = cli("train", tmp_path / "bad.py", "--out", tmp_path / "run")
    assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), err
    assert not (tmp_path / "run").exists()


def test_a_recipe_exiting_at_import_exits_2(tmp_path):
    (tmp_path / "exits.py").write_text('"""Exits while loading."""\nimport sys\nsys.exit("no")\n')
    code, _, err = cli("train", tmp_path / "exits.py")
    assert code == 2 and one_paragraph(err) and "sys.exit" in err
    assert sys.modules.get("fastcifar_recipe_exits") is None


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b'"""Caf\xe9."""\n# -*- coding: latin-1 -*-\ndef recipe():\n    pass\n'), "not UTF-8 text"),
    (lambda p: p.write_bytes(b"\x7fELF\x00\x01garbage\xff"), "not UTF-8 text"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: os.mkfifo(p), "is not a regular file"),  # never opened: reading a FIFO would hang
])
def test_recipe_files_that_are_not_recipes_exit_2(tmp_path, make, message):
    make(tmp_path / "bad.py")
    code, _, err = cli("train", tmp_path / "bad.py", "--out", tmp_path / "run")
    assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), err
    assert not (tmp_path / "run").exists()


def test_an_empty_recipe_name_exits_2(tmp_path):
    code, _, err = cli("train", "", "--out", tmp_path / "run")
    assert code == 2 and one_paragraph(err) and "argument 2 (after train) is empty" in err, err
    with pytest.raises(BadInput, match="recipe name is empty"):  # from Python, where no command line checks it
        config.load("")


def test_a_cuda_index_past_the_devices_is_bad_input(run_copy, store_dir, monkeypatch):
    """On a one-GPU machine, cuda:3 would fail inside torch (set_device, .to) with a RuntimeError."""
    from fastcifar import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    with pytest.raises(BadInput, match=r"torch sees 1 CUDA device"):
        with runtime.distributed("cuda:3"):
            pass
    with pytest.raises(BadInput, match=r"--device cuda:3: torch sees 1 CUDA device"):
        T.evaluate_checkpoint(str(run_copy), data_dir=store_dir, device="cuda:3")


# ---- a damaged last.pt or checkpoint: named, nothing written


@pytest.mark.parametrize("damage, message", [
    (lambda ck: {"model": ck["model"], "recipe": ck["recipe"], "epoch": 1}, "lacks info, optimizer"),
    (lambda ck: {**ck, "recipe": [1, 2]}, "its recipe is not what"),
    (lambda ck: {**ck, "info": [1]}, "its info is not what"),
    (lambda ck: {**ck, "info": {}}, "its info is not what"),  # no recipe name
    (lambda ck: {**ck, "epoch": "3"}, "its epoch is not what"),
    (lambda ck: {**ck, "model": 5}, "its model is not what"),  # eval raised AttributeError on it
    (lambda ck: b"", "is empty (0 bytes)"),
])
def test_resume_of_a_damaged_last_pt_exits_2_and_writes_nothing(run_copy, damage, message):
    bad = damage(checkpoint.load(run_copy / "last.pt", need="resume"))
    (run_copy / "last.pt").write_bytes(bad) if isinstance(bad, bytes) else torch.save(bad, run_copy / "last.pt")
    before = snapshot(run_copy)
    code, _, err = cli("train", "--resume", run_copy, "--set", "train.epochs=3")
    assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), err
    assert snapshot(run_copy) == before


def test_eval_with_a_batch_larger_than_the_test_split(run_copy, store_dir):
    """A batch is never padded (nor a DALI buffer sized) past the images there are: a huge
    --batch-size evaluates the same images, not a 12 TB allocation."""
    args = ("eval", run_copy, "--data-dir", store_dir, "--device", "cpu")
    code, small, err = cli(*args, "--batch-size", 64)
    assert code == 0, err
    code, huge, err = cli(*args, "--batch-size", 10 ** 9)
    assert code == 0, err
    assert huge.split(": ", 1)[1] == small.split(": ", 1)[1]  # the same top-1, top-5, loss and images


# ---- --out where a run must not go


def test_out_inside_a_store_a_dangling_link_or_a_non_utf8_name(store_dir, tmp_path, monkeypatch):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    store_before = sorted(p.name for p in store_dir.iterdir())
    for out, message in [(store_dir / "runs" / "mine", "inside the data store"), (store_dir, "inside the data store"),
                         (tmp_path / "dangling", "does not exist"),
                         (tmp_path / b"run\xff".decode("utf-8", "surrogateescape"), "not UTF-8")]:
        code, _, err = cli("train", "smoke", "--data-dir", store_dir, "--out", out, "--set",
                           "data.batch_size=20")
        assert code == 2 and one_paragraph(err) and message in err.replace("\n", " "), err
    assert sorted(p.name for p in store_dir.iterdir()) == store_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]
    # the same name read in the C locale without UTF-8 mode (PYTHONUTF8=0 LC_ALL=C): the way out is named
    import types
    monkeypatch.setattr(T, "sys", types.SimpleNamespace(flags=types.SimpleNamespace(utf8_mode=0),
                                                        getfilesystemencoding=lambda: "ascii"))
    with pytest.raises(BadInput, match="set PYTHONUTF8=1"):
        T.check_out(tmp_path / b"run\xc3\xa9".decode("ascii", "surrogateescape"), resumed=False)


def test_a_run_left_inside_a_store_is_still_resumed(run_copy, tmp_path):
    """Only a new run is kept out of stores: one made there before that check is continued where it is."""
    import shutil

    other = prepare(tmp_path / "s2", synthetic=True, n_train=20, n_test=10, log=lambda *_: None)
    shutil.move(run_copy, other / "old-run")
    s = T.train(tiny(train__epochs=3), {}, resume=other / "old-run", **QUIET)
    assert s["finished"] and s["epochs_done"] == 3


# ---- one writer per run directory


def test_a_run_directory_in_use_is_refused_and_left_as_it_was(run_copy, store_dir, tmp_path):
    # another process training into, or resuming, the same directory: its lock is held meanwhile
    before = snapshot(run_copy)
    with checkpoint.claimed(run_copy, lambda: None):
        with pytest.raises(BadInput, match="in use: another fastcifar process"):
            T.train(tiny(train__epochs=3), {}, resume=run_copy, **QUIET)
        assert snapshot(run_copy) == before
        fresh = tmp_path / "fresh"
        with checkpoint.claimed(fresh, lambda: None):
            code, _, err = cli("train", "smoke", "--data-dir", store_dir, "--out", fresh)
            assert code == 2 and one_paragraph(err) and "in use" in err
            assert list(fresh.iterdir()) == []
        assert not fresh.exists()  # made by the holder, removed by it while still empty
    s = T.train(tiny(train__epochs=3), {}, resume=run_copy, **QUIET)  # released: the run continues
    assert s["epochs_done"] == 3


def test_the_out_check_is_repeated_under_the_lock_and_what_was_made_is_removed(tmp_path):
    import fcntl
    out = tmp_path / "runs" / "a" / "b"
    seen = []

    def recheck():  # the lock is held here: a second process could not take it
        fd = os.open(out, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(True)
        raise BadInput("a run finished there meanwhile")

    with pytest.raises(BadInput, match="meanwhile"):
        with checkpoint.claimed(out, recheck):
            pass
    assert seen and not (tmp_path / "runs").exists()  # the three directories it made, gone again


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    out = tmp_path / "runs" / "r"
    with pytest.raises(BadInput):
        T.train(tiny(), info(), out=out, data_dir=tmp_path / "no-store", **QUIET)
    assert not (tmp_path / "runs").exists()


def test_runs_started_in_the_same_second_get_their_own_default_directories(store_dir, tmp_path, monkeypatch):
    import contextlib
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(T.time, "strftime", lambda *a: "20260101-000000")
    taken = tmp_path / "runs" / "tiny-20260101-000000"
    other, place = contextlib.ExitStack(), T.Trainer._place

    def race(self):  # the other run takes the name after this one picked it, before it locks it
        place(self)
        other.enter_context(checkpoint.claimed(taken, lambda: None))

    monkeypatch.setattr(T.Trainer, "_place", race)
    lines = []
    with other:
        s = T.train(tiny(train__epochs=1), info(), data_dir=store_dir, log=lines.append)
        assert list(taken.iterdir()) == []  # nothing written into the other run's directory
    assert s["finished"] and "Run: runs/tiny-20260101-000000-2" in lines[-1]
    assert (tmp_path / "runs" / "tiny-20260101-000000-2" / "last.pt").exists()
    with pytest.raises(BadInput, match="in use"), checkpoint.claimed(tmp_path / "mine", lambda: None):
        T.train(tiny(train__epochs=1), info(), out=tmp_path / "mine", data_dir=store_dir, **QUIET)  # named: no other


@pytest.mark.parametrize("field, message", [("model__name", "not a timm model. Close names: resnet18"),
                                            ("distill__teacher", "Train the teacher first"),
                                            ("model__init_from", "model.init_from = 'resnt18'"),
                                            ("model__pretrained_file", "model.pretrained_file = 'resnt18' does not exist")])
def test_a_misspelt_model_or_weights_or_teacher_is_named_before_the_data_set_is_downloaded(tmp_path, monkeypatch, field, message):
    monkeypatch.chdir(tmp_path)  # no store here: train would download CIFAR-100 first
    monkeypatch.setattr(T, "prepare", lambda *a, **k: pytest.fail("downloaded before checking the recipe"))
    with pytest.raises(BadInput, match=message):
        T.train(tiny(**{field: "resnt18"}), info(), out=tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
