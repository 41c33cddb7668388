"""Many runs at once (fastcifar/runs.py): `reproduce --jobs 2` and `sweep` give the numbers the same
runs give one at a time; a real SIGINT stops every run (each saves its last.pt) and the same command
continues without training anything twice; a diverged run's students are skipped; one scheduler per
DIR; hostile --grid values are exit 2; --ray without Ray says how to install it; and a real local
Ray cluster gives the table the local pool gives."""

import contextlib
import fcntl
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastcifar import owned
from fastcifar.errors import BadInput
from fastcifar.config import to_dict
from fastcifar.data import prepare
from fastcifar.reproduce import reproduce
from fastcifar.runs import Job, LocalPool, state, train_args
from fastcifar.sweep import plan as plan_sweep
from helpers import QUIET, STUDENT, TEACHER, cli, one_paragraph

EPOCHS = "train.epochs=3"  # three short epochs: a SIGINT after the first still finds every run training
# what an epoch learned, as metrics.jsonl has it (its timings differ from run to run)
LEARNED = ("epoch", "train_loss", "train_acc", "test_acc", "test_top5", "test_loss", "lr")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """./recipes/tiny_teacher.py and tiny_student.py (test_reproduce's), a table listing the student
    first, a synthetic store; and `ref`: that table, 2 seeds, run one at a time (--jobs 1)."""
    root = tmp_path_factory.mktemp("many")
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny_teacher.py").write_text(TEACHER)
    (root / "recipes" / "tiny_student.py").write_text(STUDENT)
    (root / "table.txt").write_text("tiny_student\ntiny_teacher\n")
    (root / "teachers.txt").write_text("tiny_teacher\n")
    prepare(root / "store", synthetic=True, n_train=300, n_test=60, log=lambda *_: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the runs find ./recipes from here, as a user's would
        reproduce("table.txt", seeds=2, out=root / "ref", overrides=[EPOCHS], data_dir=root / "store", jobs=1,
                  threads=1, **QUIET)
    return root


def learned(run: Path) -> list[dict]:
    return [{k: m[k] for k in LEARNED} for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def same_runs(out: Path, ref: Path, names) -> None:
    """Each run in out learned, epoch by epoch, exactly what the same run in ref did (bit for bit)."""
    for name in names:
        assert learned(out / name) == learned(ref / name), name


def free(run: Path) -> bool:
    """Whether no process holds the run directory (a training run locks its directory while it lives)."""
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


RUNS = [f"tiny_{who}-seed{k}" for who in ("teacher", "student") for k in (0, 1)]


def test_runs_at_once_stopped_by_sigint_continue_to_the_table_of_one_at_a_time(project, monkeypatch, capsys):
    """--jobs 3: both teachers train at once, and the students wait for them although a slot is
    free. A SIGINT to the scheduler stops both teachers (each saves its last.pt, a mid-epoch one
    included); the printed command continues, each run resumes exactly, and every run ends with
    what it learned one at a time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fastcifar", "reproduce", "table.txt", "--seeds", "2", "--out", "out", "--data-dir",
           "store", "--set", EPOCHS, "--jobs", "3", "--threads", "1"]
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = project / "out"
    teachers = [out / "tiny_teacher-seed0", out / "tiny_teacher-seed1"]
    deadline = time.time() + 300
    # once one teacher has an epoch and the other is training too (its recipe.json is written), Ctrl-C
    while not (any((t / "metrics.jsonl").is_file() and (t / "metrics.jsonl").read_text() for t in teachers)
               and all((t / "recipe.json").is_file() for t in teachers)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + err
    assert "Traceback" not in err and "Stopping 2 running runs" in stdout
    for t in teachers:  # both stopped and saved, and no process holds them any more
        s = json.loads((t / "summary.json").read_text())
        assert s["stop_reason"] == "interrupted" and not s["finished"] and (t / "last.pt").is_file(), t
        assert free(t)
    assert not (out / "tiny_student-seed0").exists()  # the students wait for their teachers
    again = err.split("Continue with: ", 1)[1].strip()
    assert "--jobs 3" in again and "--threads 1" in again
    monkeypatch.chdir(project)

    code, stdout, err = cli(*shlex.split(again)[1:])  # the printed command, in this process
    assert code is None or code == 0, stdout[-3000:] + err[-3000:]
    lines = stdout.splitlines()
    assert sum("tiny_teacher seed" in line and "resuming from its last.pt" in line for line in lines) == 2
    for k in (0, 1):  # dependency order: a student starts after its own teacher finished
        assert (lines.index(next(l for l in lines if l.startswith(f"[{k + 1}/4] tiny_teacher seed {k}: finished")))
                < lines.index(next(l for l in lines if l.startswith(f"[{k + 3}/4] tiny_student seed {k}: starting"))))
    same_runs(out, project / "ref", RUNS)  # every epoch once, and each as one at a time
    assert "Resuming" in (teachers[0] / "train.log").read_text()  # each run's own lines, in its directory
    for name in RUNS:
        rj = json.loads((out / name / "recipe.json").read_text())
        assert rj["train"]["seed"] == int(name[-1]) and rj["train"]["epochs"] == 3  # --set reached every run
        if "student" in name:  # seed k learns from the teacher run of seed k that this table trained
            assert rj["distill"]["teacher"] == str(out.resolve() / f"tiny_teacher-seed{name[-1]}")
    assert "earlier" in json.loads((teachers[1] / "summary.json").read_text())["provenance"]  # two processes
    res, ref = (json.loads((d / "results.json").read_text()) for d in (out, project / "ref"))
    assert [(x["recipe"], x["n"], x["best_acc"]) for x in res["recipes"]] == \
           [(x["recipe"], x["n"], x["best_acc"]) for x in ref["recipes"]]  # in the table's order
    assert [x["recipe"] for x in res["recipes"]] == ["tiny_student", "tiny_teacher"]
    teacher = res["recipes"][1]
    assert teacher["published"] == 12.5 and teacher["difference"] == pytest.approx(teacher["best_acc"]["mean"] - 12.5)
    md = (out / "results.md").read_text()
    assert "| tiny_teacher | 2 |" in md and " ± " in md and "12.50%" in md and "SYNTHETIC" in md


def test_a_sweep_of_a_2x2_grid_ranks_its_settings_as_the_runs_give_them_one_at_a_time(project, monkeypatch, capsys):
    """2 x 2 settings, one seed, two at once (the mean and std over seeds are reproduce's, tested in
    test_reproduce.py). Its setting lr=0.003,label_smoothing=0 is tiny_teacher as it is: that run
    learns exactly what the table's teacher run of seed 0 learned one at a time."""
    monkeypatch.chdir(project)
    code, stdout, err = cli("sweep", "tiny_teacher", "--grid", "optim.lr=0.003,0.01", "--grid",
                            "loss.label_smoothing=0,0.1", "--seeds", "1", "--set", EPOCHS, "--out", "sw",
                            "--data-dir", "store", "--jobs", "2", "--threads", "1")
    assert code is None or code == 0, stdout + err
    sw = project / "sw"
    res = json.loads((sw / "results.json").read_text())
    names = ["lr=0.003,label_smoothing=0", "lr=0.003,label_smoothing=0.1", "lr=0.01,label_smoothing=0",
             "lr=0.01,label_smoothing=0.1"]
    assert sorted(x["setting"] for x in res["settings"]) == names and res["ranked_on"] == "test"
    means = [x["best_acc"]["mean"] for x in res["settings"]]
    assert means == sorted(means, reverse=True) and [x["rank"] for x in res["settings"]] == [1, 2, 3, 4]
    for x in res["settings"]:
        acc = json.loads((sw / f"{x['setting']}-seed0" / "summary.json").read_text())["best_acc"]
        assert x["n"] == 1 and x["best_acc"]["values"] == [acc] and x["best_acc"]["mean"] == pytest.approx(acc)
    md = (sw / "results.md").read_text()
    assert "| rank | lr | label_smoothing | n |" in md and f"| 1 | {res['settings'][0]['values']['optim.lr']} |" in md
    assert learned(sw / "lr=0.003,label_smoothing=0-seed0") == learned(project / "ref" / "tiny_teacher-seed0")

    code, stdout, err = cli("report", "sw", "--out", "rep")
    assert code is None or code == 0, err
    assert (project / "rep" / "sweep.png").stat().st_size > 1000 and "sweep.png" in stdout


def test_a_diverged_run_is_recorded_and_its_student_skipped(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    args = ["reproduce", "table.txt", "--out", tmp_path / "out", "--data-dir", "store", "--set", "optim.name=sgd",
            "--set", "optim.lr=1e30", "--set", "schedule.warmup=0", "--set", "train.epochs=1", "--threads", "1"]
    code, stdout, err = cli(*args)
    assert code == 1 and one_paragraph(err), err
    assert "tiny_teacher seed 0: diverged: non-finite loss" in stdout
    assert "tiny_student seed 0: skipped, its teacher tiny_teacher seed 0 did not finish" in stdout
    assert not (tmp_path / "out" / "tiny_student-seed0").exists()
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [x["n"] for x in res["recipes"]] == [0, 0]
    code, stdout, err = cli(*args)  # again: recorded, not retrained
    assert code == 1 and "diverged earlier, skipped" in stdout and "starting" not in stdout, stdout


def test_a_runs_bad_input_is_its_paragraph_and_exit_2(project, tmp_path, monkeypatch, capsys):
    """A run that refuses its input (here a missing model.init_from) ends with exit 2; the sweep
    shows that run's own paragraph, and exits 2 too."""
    monkeypatch.chdir(project)
    code, stdout, err = cli("sweep", "tiny_teacher", "--grid", "train.epochs=1", "--set",
                            "model.init_from=nope.pt", "--out", tmp_path / "out", "--data-dir", "store")
    assert code == 2 and one_paragraph(err), err
    assert "epochs=1 seed 0: model.init_from = 'nope.pt': nope.pt is neither" in stdout, stdout  # the run's own words


def test_a_second_scheduler_on_the_same_dir_is_refused_before_touching_anything(project, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.chdir(project)
    out = tmp_path / "sw"
    (out / "lr=0.1-seed0").mkdir(parents=True)  # a run of it that died at once (an empty directory)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a first sweep of that DIR holds it
        code, _, err = cli("sweep", "tiny_teacher", "--grid", "optim.lr=0.1", "--out", out,
                           "--jobs", "2")
    finally:
        os.close(fd)
    assert code == 2 and one_paragraph(err) and f"--out {out} is in use" in err.replace("\n", " "), err
    assert [p.name for p in out.iterdir()] == ["lr=0.1-seed0"] and not any((out / "lr=0.1-seed0").iterdir())


@pytest.mark.parametrize("grid, sets, match", [
    (["optim.lr=0.1,,0.2"], [], "empty value"),
    (["optim.lr="], [], "empty value"),
    (["optim.lr=0.1,0.10"], [], "lists the value 0.1 twice"),
    (["optim.lr=0.1", "optim.lr=0.2"], [], "optim.lr is given twice"),
    (["optim.lr=0.1,0.2"], ["optim.lr=0.3"], "--grid optim.lr and --set optim.lr"),
    (["train.seed=0,1"], [], "use --seeds|the seeds are --seeds"),
    ([], ["train.seed=1"], "Give at least one --grid"),
    (["optim.lr=0.1"], ["train.seed=1"], "a sweep sets each run's seed"),
    (["optim.rl=0.1"], [], "Unknown key optim.rl"),
    (["optim.lr=fast"], [], "optim.lr expects a float"),
    (["lr=0.1"], [], "write SECTION.FIELD=V1,V2"),
    ([f"optim.lr={','.join(str(k / 1000) for k in range(1, 40))}", "optim.weight_decay=0,0.1,0.2,0.3,0.4,0.5,0.6"],
     [], r"39 x 7 settings x 4 seeds = 1,092 runs; a sweep runs at most 1,000"),
    (["model.init_from=a/b.pt,a_b.pt"], [], "would both be named 'init_from=a_b.pt'"),
    (["model.init_from=" + "x" * 250], [], "250 characters|at most 200"),
    (["optim.lr=0.1", "train.epochs=0,1"], [], "Setting lr=0.1,epochs=0: train.epochs = 0"),
])
def test_hostile_grids_are_refused_before_anything_runs(tmp_path, grid, sets, match):
    with pytest.raises(BadInput, match=match):
        plan_sweep("r18_baseline", grid, 4, tmp_path / "out", sets)
    assert not (tmp_path / "out").exists()


def test_grid_values_are_typed_split_outside_brackets_and_named_safely(tmp_path):
    name, grid, settings, jobs, out = plan_sweep("r18_baseline", ["optim.betas=(0.9,0.999),(0.9, 0.99)",
                                                 "schedule.kind=cosine,onecycle", "head.kind=linear"], 1, tmp_path / "o")
    assert grid["optim.betas"] == ["(0.9,0.999)", "(0.9, 0.99)"] and len(jobs) == 4
    # field names where unambiguous, section.field where two fields share a name; no '(', ')' or ' '
    assert [j.dir.name for j in jobs] == [f"betas={b},schedule.kind={k},head.kind=linear-seed0"
                                          for b in ("0.9_0.999", "0.9__0.99") for k in ("cosine", "onecycle")]
    assert jobs[2].recipe.optim.betas == (0.9, 0.99) and jobs[2].recipe.schedule.kind == "cosine"
    assert jobs[0].info["overrides"][-1] == "train.seed=0" and name == "r18_baseline" and out == tmp_path / "o"


def test_a_finished_run_is_done_whatever_its_target_and_a_resume_carries_what_changed(tmp_path):
    """A finished run is never altered, whatever train.target_acc now says (results have no target column);
    an unfinished one resumes with the plan's value of each field that may change on resume."""
    from fastcifar.config import load

    r, info = load("r18_baseline")
    job = Job("r18_baseline", 0, r, {**info, "overrides": []}, tmp_path / "r18_baseline-seed0")
    job.dir.mkdir()
    for name, body in (("recipe.json", json.dumps(to_dict(r))), ("summary.json", '{"finished": true}'), ("last.pt", "")):
        (job.dir / name).write_text(body)
    owned.record(list(job.dir.iterdir()), "train")
    job.recipe.train.target_acc = 40.0
    job.recipe.train.log_every = 7
    assert state(job) == "done"
    (job.dir / "summary.json").write_text('{"finished": false, "stop_reason": "interrupted"}')
    owned.record([job.dir / "summary.json"], "train")
    assert state(job) == "resume"
    assert train_args(job, True) == ["train", "--resume", str(job.dir), "--set", "train.log_every=7", "--set",
                                     "train.target_acc=40.0"]


def test_a_finished_table_is_not_trained_again_for_a_new_target_or_log_interval(project, tmp_path, monkeypatch,
                                                                                capsys):
    """The teachers' table (its runs copied from the table run one at a time), continued with another
    train.target_acc and train.log_every (fields that do not change what a run trains): every run is
    done and skipped, nothing starts, and not one of their files changes."""
    monkeypatch.chdir(project)
    out = tmp_path / "ref"
    teachers = RUNS[:2]
    for name in teachers:  # the finished runs, without reproduce's results (they would not be its own here)
        shutil.copytree(project / "ref" / name, out / name, ignore=shutil.ignore_patterns(owned.MANIFEST))
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code, stdout, err = cli("reproduce", "teachers.txt", "--seeds", "2", "--out", out,
                            "--data-dir", "store", "--set", EPOCHS, "--set", "train.target_acc=50", "--set",
                            "train.log_every=1")
    assert code is None or code == 0, stdout + err
    assert stdout.count(": done, skipped") == 2 and "starting" not in stdout and "resuming" not in stdout, stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.parent != out or p.name in teachers} == files
    assert [x["n"] for x in json.loads((out / "results.json").read_text())["recipes"]] == [2]


def test_local_pool_options_are_checked(monkeypatch):
    import fastcifar.runs as runs

    monkeypatch.setattr(runs, "visible_gpus", lambda: [])
    with pytest.raises(BadInput, match="--per-gpu 2: torch sees no GPU"):
        LocalPool(per_gpu=2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))
    assert (LocalPool(jobs=2).threads, LocalPool(jobs=3).threads, LocalPool(jobs=2, threads=1).threads) == (4, 2, 1)
    monkeypatch.setattr(runs, "visible_gpus", lambda: ["3", "5"])  # CUDA_VISIBLE_DEVICES=3,5
    pool = LocalPool(per_gpu=2)
    assert pool.slots == 4 and pool.threads == 2
    with pytest.raises(BadInput, match="--jobs 5: this machine has 2 GPUs and --per-gpu 2"):
        LocalPool(jobs=5, per_gpu=2)
    for flag, bad in (("--jobs", 0), ("--threads", 0), ("--per-gpu", 65)):
        with pytest.raises(BadInput, match=f"{flag} {bad}: give 1 to"):
            runs.make_pool(**{flag.strip("-").replace("-", "_"): bad})


def test_ray_without_ray_installed_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.txt").write_text("smoke\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    code, _, err = cli("reproduce", "table.txt", "--out", tmp_path / "out", "--ray", "auto")
    assert code == 2 and one_paragraph(err) and 'pip install "fastcifar[cluster]"' in err, err
    assert not (tmp_path / "out").exists()


# ---- A real Ray cluster on this machine (127.0.0.1 only)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_cluster():
    """`ray start --head` bound to 127.0.0.1 with 2 CPUs and a temp dir of its own; its processes (its
    process group, and any that names that dir) are ended afterwards. Yields the environment a
    driver connects with."""
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port, client, agent, dash, m1, m2 = free_ports(6)
    # 127.0.0.1 stays the node's address (Ray swaps a loopback address for the host's otherwise), so
    # every Ray server listens on loopback only
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AUTOSCALER_METRIC_PORT": str(m1), "DASHBOARD_METRIC_PORT": str(m2)}
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-port", str(dash), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false",
         "--temp-dir", str(tmp), "--object-store-memory", str(100 << 20), "--disable-usage-stats"],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp / "head.log").read_text():
            assert head.poll() is None and time.time() < deadline, (tmp / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        with contextlib.suppress(ProcessLookupError):  # a throw-away cluster: no graceful stop (it takes 10 s)
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:  # a process of it that left the group
            try:
                if str(tmp) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


# skipped (before the table is made) only where Ray is not installed; an installed Ray that fails to import fails
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is the optional cluster extra (pip install "
                    "'fastcifar[cluster]'); the dev extra installs it")
def test_a_real_ray_cluster_gives_the_local_table(project, ray_cluster):
    """The teacher's two seeds through a local Ray cluster (--ray auto), two tasks at once: the probe
    task finds DIR shared, and each run learns what it learned one at a time on this machine."""
    r = subprocess.run([sys.executable, "-m", "fastcifar", "reproduce", "teachers.txt", "--seeds", "2", "--out",
                        "rayout", "--data-dir", "store", "--set", EPOCHS, "--ray", "auto", "--threads", "1"],
                       cwd=project, env={**os.environ, **ray_cluster}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 at once on the Ray cluster at auto (1 nodes, 2 CPUs, no GPU), 1 CPU each" in r.stdout
    same_runs(project / "rayout", project / "ref", ["tiny_teacher-seed0", "tiny_teacher-seed1"])
    assert sorted(p.name for p in (project / "rayout").iterdir() if p.name != owned.MANIFEST) == [
        "results.json", "results.md", "tiny_teacher-seed0", "tiny_teacher-seed1"]  # the probe's file is gone


# ---- The packing bench (fastcifar bench --stage packing)


def test_the_packing_bench_runs_k_at_once_through_the_scheduler(tmp_path, monkeypatch):
    """bench --stage packing with K = 1, 2 (the quick CPU run, of tiny_teacher's test_resnet instead of
    a ResNet-18, on a tiny store): each row's K runs go through the scheduler K at once and finish,
    each with its summary; the first row is the one-at-a-time baseline of vs_one. (Speed is the
    bench's to measure, not this test's.)"""
    from fastcifar import bench, jsonio, runs

    prepare(tmp_path / "store", synthetic=True, n_train=300, n_test=60, log=lambda *_: None)
    (tmp_path / "tiny.py").write_text(TEACHER)
    monkeypatch.setattr(bench, "PACKING", (1, 2))
    monkeypatch.setattr(bench, "PACKING_RECIPE", str(tmp_path / "tiny.py"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per run, K = 1 included: no time lost to oversubscription
    seen, real = [], runs.run

    def spy(jobs, pool, *args, **kwargs):  # the runs' directories, read before the bench deletes them
        failed = real(jobs, pool, *args, **kwargs)
        seen.append((pool.slots, [jsonio.load(j.dir / "summary.json") for j in jobs],
                     [jsonio.load(j.dir / "recipe.json") for j in jobs]))
        return failed

    monkeypatch.setattr(runs, "run", spy)
    rows = bench.run(stages=["packing"], quick=True, device="cpu", data_dir=tmp_path / "store", log=lambda *_: None)
    assert [r["runs_at_once"] for r in rows] == [1, 2] and rows[0]["vs_one"] == 1.0
    assert [r["threads_per_run"] for r in rows] == [1, 1]  # what OMP_NUM_THREADS asks, whatever K
    assert rows[1]["vs_one"] == pytest.approx(rows[1]["runs_per_hour"] / rows[0]["runs_per_hour"], abs=0.01)
    assert [slots for slots, _, _ in seen] == [1, 2]
    for (k, summaries, recipes), row in zip(seen, rows):
        assert len(summaries) == k and all(s["finished"] and s["epochs_done"] == 1 for s in summaries)
        assert [r["train"]["seed"] for r in recipes] == list(range(k))  # K different runs, not one K times
        assert all(r["model"]["name"] == row["model"] == "test_resnet" and r["data"]["subset"] < 1 for r in recipes)
        assert row["images_per_sec"] == pytest.approx(sum(s["train_images_per_sec"] for s in summaries), rel=0.01)


def test_packing_runs_only_when_named(tmp_path, monkeypatch):
    """A plain `fastcifar bench` measures the three throughput stages, not minutes of packed runs."""
    from fastcifar import bench

    prepare(tmp_path / "store", synthetic=True, n_train=20, n_test=10, log=lambda *_: None)
    ran = []
    monkeypatch.setattr(bench, "STAGES", {name: (lambda name: lambda **_: ran.append(name) or iter(()))(name)
                                          for name in bench.STAGES})
    bench.run(data_dir=tmp_path / "store", device="cpu", log=lambda *_: None)
    assert ran == ["pipeline", "train_step", "end_to_end"]
    bench.run(stages=["packing"], data_dir=tmp_path / "store", device="cpu", log=lambda *_: None)
    assert ran[-1] == "packing"
