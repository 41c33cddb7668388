"""What surrounds a fastcifar process: torchrun's environment variables, standard streams that are closed or whose reader went away, hang-ups and signals, and the command
line itself (--help, --version, python -m fastcifar)."""

import json
import os
import signal
import subprocess
import sys

import pytest

import fastcifar.data as D
import fastcifar.train as T
from fastcifar import checkpoint, owned
from fastcifar import dist as fdist
from helpers import ROOT, cli, fit, info, one_paragraph, tiny

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

LAUNCH = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_variables_of_one_process_or_a_full_launch_are_read(monkeypatch):
    for k in LAUNCH:
        monkeypatch.delenv(k, raising=False)
    assert fdist.launch() == (0, 1, 0)
    for k, v in {**LAUNCH, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert fdist.launch() == (1, 2, 1)


def test_a_run_outlives_a_closed_stderr_and_a_stdout_nobody_reads(store_dir, tmp_path):
    """`fastcifar train ... 2>&- | head -1`: with stderr closed the progress bar had nowhere to go,
    and once the reader of stdout left, the next line killed the run (exit 1, no last.pt, no
    summary). The output is dropped now, and the run finishes."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastcifar", "train", "smoke", "--data-dir", str(store_dir), "--out",
                             str(run), "--set", "data.backend=torch", "--set", "train.epochs=1"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    proc.stdout.close()  # the reader has gone before the first line
    assert proc.wait(timeout=120) == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["finished"] and (run / "last.pt").is_file()


def test_a_listing_into_a_closed_pipe_exits_0_without_noise(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fastcifar", "recipes"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_a_hangup_saves_like_ctrl_c_unless_nohup_ignores_it(store_dir, tmp_path, tripwire):
    """Closing the terminal (SIGHUP) killed a run outright, mid-epoch, with no summary; it now
    stops it as Ctrl-C does. Under nohup (SIGHUP ignored) the run goes on."""
    def hang_up(epoch, i, images):
        if (epoch, i) == (0, 1):
            os.kill(os.getpid(), signal.SIGHUP)

    recipe = dict(train__epochs=1, data__subset=0.2, data__test_subset=0.2)
    tripwire(signal.SIGHUP)
    with pytest.raises(T.Interrupted):
        fit(tiny(**recipe), info(), out=tmp_path / "run", data_dir=store_dir, train_fn=hang_up)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["stop_reason"] == "interrupted" and checkpoint.load(tmp_path / "run" / "last.pt")["step_in_epoch"] == 2

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        s = fit(tiny(**recipe), info(), out=tmp_path / "nohup", data_dir=store_dir, train_fn=hang_up)
    finally:
        signal.signal(signal.SIGHUP, old)
    assert s["finished"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_a_hangup_during_prepare_exits_130_leaving_no_temporary_store(monkeypatch, tmp_path, sig,
                                                                                  tripwire):
    """prepare died at once on SIGTERM (exit 143), leaving its half-built .NAME.tmp-* directory (and, once
    that was fixed, the empty parent directories it had made)."""
    save = D._save_chunks

    def killed(*a, **k):
        save(*a, **k)
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(D, "_save_chunks", killed)
    before = tripwire(sig)
    code, _, err = cli("prepare", "--synthetic", "--train", "50", "--test", "10", "--data-dir",
                       tmp_path / "new" / "data")
    assert code == 130
    assert err.strip().endswith("Interrupted.")  # said, as train says it, not typer's silent exit
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(sig) is before  # the command put the handler back


@pytest.mark.parametrize("sig, error, reason", [
    (signal.SIGINT, KeyboardInterrupt, "quit at once (a second Ctrl-C, SIGTERM or SIGHUP)"),
    (None, RuntimeError, "stopped by RuntimeError: the loader died"),
], ids=["second-ctrl-c", "error"])
def test_a_run_that_ends_at_once_says_why_in_its_summary(store_dir, tmp_path, sig, error, reason):
    """A second Ctrl-C (or an error) in epoch 2 left summary.json saying "running" from epoch 1."""
    def end(epoch, i, images):
        if (epoch, i) == (1, 0):
            if sig is None:
                raise RuntimeError("the loader died")
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)

    with pytest.raises(error):
        fit(tiny(train__epochs=2, data__subset=0.1, data__test_subset=0.2), info(), out=tmp_path / "run",
            data_dir=store_dir, train_fn=end)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["finished"], s["stop_reason"], s["epochs_done"]) == (False, reason, 1)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["epoch"] == 1  # what --resume continues


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}],
                         ids=["PYTHONIOENCODING=ascii", "LC_ALL=C"])
def test_help_on_an_ascii_terminal_escapes_what_it_cannot_show(tmp_path, env):
    """reproduce's help says 'mean ± std': on an ASCII stdout that was a UnicodeEncodeError traceback."""
    code, out, err = cli("reproduce", "--help", spawn=True, cwd=tmp_path, env={**ENV, **env})
    assert code == 0 and err == "", err
    assert "mean \\xb1 std" in out


def test_an_unusable_cache_directory_from_the_environment_is_named(monkeypatch, tmp_path):
    """TORCHINDUCTOR_CACHE_DIR under a file (train.compile): the backstop said 'choose another path'
    of a path the user never typed; it names the variable now."""
    import fastcifar.config

    cache = tmp_path / "a-file" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))

    def compile_cache(*a, **k):
        raise NotADirectoryError(20, "Not a directory", str(cache / "fxgraph"))

    monkeypatch.setattr(fastcifar.config, "load", compile_cache)
    code, _, err = cli("train", "smoke")
    assert code == 2 and one_paragraph(err)
    assert f"set TORCHINDUCTOR_CACHE_DIR (now {cache}) to a directory you can write" in err.replace("\n", " ")


def test_no_progress_bar_spams_a_log_file(store_dir, tmp_path, capfd):
    """Without a terminal (a log file, a pipe) the progress bar's carriage-return updates went to the
    log every second; the epoch lines say what it said."""
    T.train(tiny(train__epochs=1, data__subset=0.1, data__test_subset=0.2), info(), out=tmp_path / "run",
            data_dir=store_dir, log=print)
    out, err = capfd.readouterr()
    assert "epoch 1/1" in out and "\r" not in out + err and "img/s]" not in err


def test_a_tilde_no_shell_expanded_means_home_not_a_directory_named_tilde(monkeypatch, tmp_path):
    """bash leaves the ~ of --data-dir=~/x alone, as a Dockerfile's ENV FASTCIFAR_DATA=~/x does:
    prepare made ./~/x (and a later `rm -rf ~` of it would remove the user's home)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    code, _, _ = cli("prepare", "--synthetic", "--train", "20", "--test", "10",
                     "--data-dir=~/store")
    assert code == 0 and (home / "store" / "meta.json").is_file()
    monkeypatch.setenv("FASTCIFAR_DATA", "~/env-store")
    assert D.default_data_dir() == home / "env-store"
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("args, named", [
    (["train", "smoke", "--out", ""], "--out '' is empty"),
    (["prepare", "--synthetic", "--data-dir="], "--data-dir '' is empty"),
    (["report", ""], "argument 2 (after report) is empty"),
], ids=["out", "data-dir=", "positional"])
def test_an_empty_argument_is_refused_not_taken_for_the_current_directory(monkeypatch, tmp_path, args, named):
    """`--out "$OUT"` with OUT unset: typer's Path('') is '.', so an empty current directory became the run
    directory (a store, a report's input) and a full one got a puzzling '--out . is not empty'."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*args)
    assert code == 2 and one_paragraph(err) and named in err and "unset shell variable" in err
    assert os.listdir(tmp_path) == []


def test_a_second_ctrl_c_during_the_save_keeps_the_last_whole_checkpoint(store_dir, tmp_path, monkeypatch):
    """Ctrl-C in epoch 2, and again while that stop's last.pt is being written: the half-written file
    is removed, last.pt stays epoch 1's, and resume continues from it to the end."""
    run = tmp_path / "run"
    recipe = tiny(train__epochs=2, data__subset=0.1, data__test_subset=0.2)
    save = checkpoint.save

    def interrupted_save(path, state, *a, **k):
        if state["step_in_epoch"]:  # the stop's mid-epoch save
            torch_save = checkpoint.torch.save

            def half_then_ctrl_c(obj, f, **kw):
                f.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGINT)

            monkeypatch.setattr(checkpoint.torch, "save", half_then_ctrl_c)
            try:
                return save(path, state, *a, **k)
            finally:
                monkeypatch.setattr(checkpoint.torch, "save", torch_save)
        return save(path, state, *a, **k)

    monkeypatch.setattr(checkpoint, "save", interrupted_save)

    def ctrl_c(epoch, i, images):
        if (epoch, i) == (1, 0):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fit(recipe, info(), out=run, data_dir=store_dir, train_fn=ctrl_c)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("events")) == [
        owned.MANIFEST, "best.pt", "last.pt", "metrics.jsonl", "recipe.json", "recipe.py", "summary.json", "train.log"]
    ck = checkpoint.load(run / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 0)
    assert json.loads((run / "summary.json").read_text())["stop_reason"].startswith("quit at once")
    monkeypatch.setattr(checkpoint, "save", save)
    s = T.train(recipe, {}, resume=run, log=lambda *a, **k: None)
    assert s["finished"] and s["epochs_done"] == 2


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_output_dash_is_refused_not_a_file_named_dash(monkeypatch, tmp_path, option):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("bench", "--quick", "--stage", "pipeline", "--device", "cpu", option, "-")
    assert code == 2 and one_paragraph(err) and "give a path such as bench." in err.replace("\n", " ")
    assert os.listdir(tmp_path) == []
