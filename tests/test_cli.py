"""The command line's exit codes and paths, run as a user runs them: a NaN stop exits 1 with its
message, a second Ctrl-C quits at once (130), `fastcifar eval` on good and bad input, atomic
writes that fail half-way, the README's offline main job exactly as written, and the backstop
that turns an escaped OSError into one paragraph."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcifar import checkpoint
from fastcifar.errors import BadInput
from fastcifar.pipelines.loader import dali_available
from helpers import ROOT, cli, fit, info, one_paragraph, tiny


SMALL = ["--set", "data.backend=torch", "--set", "data.subset=1", "--set", "data.test_subset=1",
         "--set", "train.device=cpu"]


def test_nan_stop_exits_1_with_its_message(store_dir, tmp_path):
    """An absurd learning rate blows the weights up on the first step: the loss of the second is NaN."""
    code, _, err = cli("train", "smoke", "--data-dir", store_dir, "--out", tmp_path / "run", *SMALL,
                       "--set", "optim.name=sgd", "--set", "optim.lr=1e30", "--set", "schedule.warmup=0")
    assert code == 1
    assert "non-finite loss" in err and "at step 2" in err and "lower optim.lr" in err.replace("\n", " ")
    assert "Traceback" not in err


def test_second_ctrl_c_quits_at_once(store_dir, tmp_path):
    """The first Ctrl-C asks for a save after the step; a second one, before that step ends, quits
    there and then: no step finishes, nothing is saved."""
    def twice(epoch, i, images):
        if (epoch, i) == (0, 3):  # raise_signal: each handled before it returns, in this (the main) thread;
            signal.raise_signal(signal.SIGINT)  # two os.kill calls may be taken as one when another thread
            signal.raise_signal(signal.SIGINT)  # receives the first

    with pytest.raises(KeyboardInterrupt):
        fit(tiny(), info(), out=tmp_path / "run", data_dir=store_dir, train_fn=twice)
    assert not (tmp_path / "run" / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put its handler back


def test_ctrl_c_anywhere_in_the_cli_exits_130(tmp_path):
    """A Ctrl-C that is not the training loop's to handle (here: while a recipe loads) still ends
    in exit 130 and one line, not a traceback."""
    (tmp_path / "slow.py").write_text('"""Interrupted while loading."""\ndef recipe():\n    raise KeyboardInterrupt\n')
    code, _, err = cli("train", tmp_path / "slow.py")
    assert code == 130 and err.strip() == "Interrupted." and not (tmp_path / "runs").exists()


def test_eval_through_the_cli(store_dir, trained_run):
    run, s = trained_run, json.loads((trained_run / "summary.json").read_text())
    code, out, _ = cli("eval", run, "--data-dir", store_dir, "--device", "cpu", "--batch-size", 64)
    assert code == 0
    top1 = float(re.search(r"test top-1 ([\d.]+)%", out).group(1))
    assert top1 == pytest.approx(s["best_acc"], abs=0.01) and "on 300 images" in out and "SYNTHETIC" in out


@pytest.mark.parametrize("args, message", [
    (("{tmp}/nothing_here",), "does not exist"),
    (("{tmp}/not_a_checkpoint.pt",), "not a readable checkpoint"),
    (("{tmp}/notes.pt",), "not a readable checkpoint: not a file torch.save wrote"),  # was "(KeyError: 101)"
    (("{tmp}",), "holds no checkpoint"),
    (("{run}", "--device", "tpu"), "--device 'tpu'"),
    (("{run}", "--batch-size", "0"), "--batch-size 0"),
    (("{run}", "--backend", "nope"), "backend 'nope'"),
    (("{run}", "--data-dir", "{tmp}/no_store"), "No prepared CIFAR-100 store"),
])
def test_eval_bad_input_exits_2_with_one_paragraph(store_dir, trained_run, tmp_path, args, message):
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"not a zip file")
    (tmp_path / "notes.pt").write_text("hello text\n")
    run = trained_run
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(store_dir)]
    code, _, err = cli("eval", *args)
    assert code == 2 and one_paragraph(err), err
    assert message in err.replace("\n", " ")


# ---- atomic writes: a writer that fails half-way leaves the old file and no temp file


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


@pytest.mark.parametrize("kind", ["checkpoint", "json", "raw"])
def test_a_write_that_fails_half_way_keeps_the_old_file(tmp_path, kind):
    path = tmp_path / ("last.pt" if kind == "checkpoint" else "summary.json")
    checkpoint.write_json(path, {"old": True}) if kind == "json" else path.write_bytes(b"old complete file")
    before = path.read_bytes()

    def half(f):
        f.write(b"half of a new fi")
        raise OSError(28, "No space left on device")

    with pytest.raises((RuntimeError, TypeError, OSError)):
        if kind == "checkpoint":  # the tensor goes out first, then the bad object stops torch.save
            checkpoint.save(path, {"model": {"w": torch.zeros(1000)}, "bad": Unpicklable()})
        elif kind == "json":
            checkpoint.write_json(path, {"fine": 1, "bad": object()})
        else:
            checkpoint.atomic_write(path, half)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind


def test_atomic_writes_are_readable_as_the_umask_allows(tmp_path):
    """mkstemp makes its temp file 0600; the file fastcifar renames into place gets 0666 less the
    umask (0644 under 022), as any file the user writes (others read a shared run's files)."""
    old = os.umask(0o022)
    try:
        checkpoint.write_json(tmp_path / "summary.json", {"a": 1})
        checkpoint.save(tmp_path / "last.pt", {"model": {}})
    finally:
        os.umask(old)
    for name in ("summary.json", "last.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_resolve_takes_a_file_a_run_dir_by_preference_or_the_newest_run_of_a_recipe(tmp_path):
    runs = tmp_path / "runs"
    old, new, empty = runs / "r18-20240101-120000", runs / "r18-20240101-120000-2", runs / "r18-20240101-130000"
    for i, d in enumerate((old, new, empty)):
        d.mkdir(parents=True)
        if d != empty:
            (d / "last.pt").write_bytes(b"x")
        os.utime(d, (1_000_000 + i, 1_000_000 + i))
    (old / "best.pt").write_bytes(b"x")
    os.utime(old, (1_000_000, 1_000_000))
    assert checkpoint.resolve(old) == old / "best.pt"  # a run directory: best.pt by default
    assert checkpoint.resolve(old, prefer="last.pt") == old / "last.pt"  # resuming / init_from: last.pt first
    assert checkpoint.resolve(new) == new / "last.pt"  # no best.pt: last.pt
    assert checkpoint.resolve(old / "last.pt") == old / "last.pt"
    assert checkpoint.resolve("r18", runs_dir=runs) == new / "last.pt"  # the newest run holding a checkpoint
    with pytest.raises(BadInput, match="holds no checkpoint"):
        checkpoint.resolve(empty)
    with pytest.raises(BadInput, match="neither a checkpoint file, a run directory, nor the name of a recipe"):
        checkpoint.resolve("r50", runs_dir=runs)


def test_a_checkpoint_with_a_negative_epoch_is_damaged(tmp_path):
    torch.save({"model": {}, "recipe": {}, "epoch": -1}, tmp_path / "neg.pt")
    with pytest.raises(BadInput, match="its epoch is not what"):
        checkpoint.load(tmp_path / "neg.pt")
    torch.save({"model": {}, "recipe": {}, "epoch": 0}, tmp_path / "zero.pt")
    assert checkpoint.load(tmp_path / "zero.pt")["epoch"] == 0


# ---- the README's offline main job, exactly as written


def test_readme_offline_main_job_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    offline = re.findall(r"```bash\n(.*?)```", readme, re.S)[1].strip()
    job = offline.split("pip install -e . && ", 1)[1]  # the part after installing: what a user runs
    assert job == "fastcifar prepare --synthetic && fastcifar train smoke"
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "fastcifar").is_file(), "the install puts a `fastcifar` command beside python"
    env = {k: v for k, v in os.environ.items() if k != "FASTCIFAR_DATA"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["bash", "-c", job], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = list((tmp_path / "runs").glob("smoke-*/summary.json"))
    assert len(runs) == 1
    s = json.loads(runs[0].read_text())
    assert s["finished"] and s["epochs_done"] == 4 and s["synthetic"]
    assert s["backend"] == ("dali-cpu" if dali_available() else "torch")  # the default backend
    assert s["best_acc"] > 50  # chance is 1%; the README quotes about 90%
    assert (tmp_path / "data" / "cifar100" / "meta.json").is_file()


def test_help_shows_every_word_of_every_command_and_option(monkeypatch):
    """`--help` prints each command's docstring and each option's help whole: a `[default: ...]` or
    `<recipe>` in a help text once vanished as markup ("Loader backend ." with the default eaten)."""
    import typer.main

    from fastcifar.cli import app

    monkeypatch.setenv("COLUMNS", "250")  # wide enough that no word is split by the boxes
    # a list item's "- " is a bullet, or (older typer, which runs the items into one line) a bare "-"
    words = lambda text: [w for w in re.sub(r"[│╭╮╰╯─•]", " ", text.replace("`", "")).split() if w != "-"]
    group = typer.main.get_command(app)
    assert len(group.commands) >= 9
    for name, command in group.commands.items():
        code, out, _ = cli(name, "--help")
        assert code == 0, name
        shown = " ".join(words(out))
        texts = [command.help] + [p.help for p in command.params if getattr(p, "help", None)]
        for text in texts:
            assert " ".join(words(text)) in shown, (name, text)


# ---- the backstop: an OSError that escapes a command is a paragraph and exit 2


def test_cli_oserror_backstop_is_one_paragraph_exit_2(monkeypatch):
    from fastcifar import config

    def disk_full():
        raise OSError(28, "No space left on device", "/data/runs/x/last.pt")
    monkeypatch.setattr(config, "recipe_sources", disk_full)
    code, _, err = cli("recipes")
    assert code == 2
    assert err.startswith("error: `fastcifar recipes` stopped: No space left on device (/data/runs/x/last.pt).")
    assert one_paragraph(err), err
