"""Many runs at once: the one scheduler behind `fastcifar reproduce` and `fastcifar sweep`.

    pool = make_pool(jobs=2, per_gpu=None, threads=None, ray=None)
    failed = run(jobs, pool, "reproduce", write_results, again)  # {job key: (kind, why)} not finished

- A Job is one run (a recipe, its --set overrides, one seed) in DIR/<name>-seed<k>, maybe after its teacher
  (same seed); state() reads from its directory what is left: new, resume, restart, done or failed.
- Every run is a plain `fastcifar train ... --out RUN_DIR` (or `--resume RUN_DIR`) process of its own, so a
  crash in one never takes the others down; its lines go to RUN_DIR/train.log, its stderr's tail says
  why it failed.
- LocalPool runs them here (on GPUs pinned with CUDA_VISIBLE_DEVICES, K per GPU; on a CPU N at once),
  RayPool as Ray tasks (num_gpus = 1/K): slots, running, start(), poll(), interrupt(), kill(), close().
- Ctrl-C, SIGTERM or SIGHUP: each run gets a SIGINT, saves its last.pt and exits 130; again: at once.
- A run's CPU threads follow --threads (else OMP_NUM_THREADS, else cores / --jobs), never how many run at
  once: on a CPU a run's numbers depend on its thread count (float sums in another order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastcifar import config, jsonio, owned
from fastcifar.errors import BadInput, why
from fastcifar.signals import sigterm_as_ctrl_c
from fastcifar.checkpoint import check_own_run
from fastcifar.report import duration

# Recipe fields that say how or where a run executes, or what its summary times, not what it trains:
# a run that differs from the plan only in these is the same experiment (a finished one is done; an
# unfinished one resumes with the plan's values, which `train --resume` accepts)
HOW = ("train.log_every", "train.device", "train.compile", "data.backend", "train.target_acc")
LIMITS = {"--jobs": 1024, "--per-gpu": 64, "--threads": 1024}  # what the options take, from 1
STATUS_EVERY = 300.0  # seconds between summary lines when no run starts or ends (not on a terminal)
STOP_GRACE = 10.0  # seconds a run may take to quit after the second Ctrl-C before it is killed
TAIL_LINES = 6  # lines of a failed run's stderr shown


class Stopped(Exception):
    """Ctrl-C or SIGTERM stopped the runs (each saved its last.pt); the message says how to continue."""


@dataclasses.dataclass
class Job:
    """One run: a recipe (with its --set overrides, info["overrides"]) at one seed, in its own directory."""
    name: str                   # the recipe (reproduce) or the setting (sweep)
    seed: int
    recipe: config.Recipe       # as planned: what the directory must hold
    info: dict                  # config.load's, plus "overrides": the run's --set list
    dir: Path
    teacher: str | None = None  # the job (same seed) it distills from: it starts once that one finished

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.seed

    def __str__(self) -> str:
        return f"{self.name} seed {self.seed}"


def check_options(jobs: int | None, per_gpu: int | None, threads: int | None) -> None:
    """BadInput for a count out of range."""
    for flag, value in (("--jobs", jobs), ("--per-gpu", per_gpu), ("--threads", threads)):
        if value is not None and not 1 <= value <= LIMITS[flag]:
            raise BadInput(f"{flag} {value}: give 1 to {LIMITS[flag]:,}.")


# ---- What a run directory asks for


def read_object(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or damaged."""
    try:
        obj = jsonio.load(path)
    except BadInput:
        return None
    return obj if isinstance(obj, dict) else None


def _changes(job: Job) -> tuple[dict, dict, list[tuple[str, str]]]:
    """(recorded recipe, planned recipe, the (section, field)s where they differ) of a run directory."""
    d = job.dir
    recorded = read_object(d / "recipe.json")
    if recorded is None:
        raise BadInput(f"{d / 'recipe.json'} is missing or damaged; remove {d} to run {job} again.")
    try:
        was = config.to_dict(config.from_dict(recorded))
    except BadInput as e:
        raise BadInput(f"{d / 'recipe.json'}: {e} Remove {d} to run {job} again.")
    now = config.to_dict(job.recipe)
    return was, now, [(s, k) for s, fields in now.items() for k, v in fields.items() if v != was[s][k]]


def state(job: Job, by: str = "reproduce") -> str:
    """What the job's directory asks for: new, done (finished, with or without its .pt files, whatever
    train.target_acc now says), resume, failed (diverged) or restart (died before its first checkpoint,
    holding only files that run wrote). BadInput for a run of other settings, or for files fastcifar did
    not write that `fastcifar by` would have to replace or delete."""
    d = job.dir
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return "new"
    if not d.is_dir():
        raise BadInput(f"{d} is a file where {by} keeps the run {job}; move it away.")
    checkpointed = (d / "last.pt").is_file()
    if checkpointed:  # without last.pt, a finished run whose checkpoints were deleted (to free disk) is done
        was, now, changed = _changes(job)
        what = ", ".join(f"{s}.{k} ({was[s][k]!r} -> {now[s][k]!r})" for s, k in changed
                         if f"{s}.{k}" not in HOW)
        if what:
            raise BadInput(f"{d} holds a run of {job} made with other settings: {what}. Continue with the same "
                           f"--set as before, or choose another --out for these settings.")
    summary = read_object(d / "summary.json") or {}
    if summary.get("finished"):
        return "done"  # reported, never retrained
    if str(summary.get("stop_reason", "")).startswith("non-finite loss"):
        return "failed"  # recorded, not run again
    if not checkpointed:  # restarted, its files deleted, if that run wrote them all
        theirs = [p for p in sorted(d.iterdir()) if not owned.is_ours(p, "train")]
        if not theirs:
            return "restart"
        owned.refuse(theirs, f"{by} keeps the run {job} in {d}, and restarting it there would delete {{it}}. "
                     f"Move {{it}} away, or choose another --out.", "train")
    check_own_run(d, f"Resuming {job} would replace {{it}}. Continue a copied run elsewhere (`fastcifar train "
                     f"--resume {d} --out NEW_DIR`) and move {d} away, or choose another --out.")
    return "resume"


def restart(job: Job, by: str = "reproduce") -> None:
    """Delete the files of a run state() found restartable, under the run's lock (a resume may have begun)."""
    busy = (f"{job.dir} is in use: another fastcifar process is writing that run. Wait for it to end, then run "
            f"this command again.")
    with owned.hold(job.dir, busy):
        for p in sorted(job.dir.iterdir()):
            if p.name != owned.MANIFEST and not owned.remove(p, "train"):
                owned.refuse([p], f"{by} keeps the run {job} in {job.dir}, and restarting it there would delete "
                             f"{{it}}. Move {{it}} away, or choose another --out.", "train")


def _set_text(value) -> str:
    """A recipe value as --set writes it."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def train_args(job: Job, resume: bool, data_dir=None) -> list[str]:
    """`fastcifar train`'s arguments: a new run of the recipe file with its overrides, or the resume of
    its directory with the plan's values of the HOW fields that differ."""
    if resume:
        _, now, changed = _changes(job)
        sets = [f"{s}.{k}={_set_text(now[s][k])}" for s, k in changed]
        args = ["train", "--resume", str(job.dir)]
    else:
        sets = job.info.get("overrides", [])
        args = ["train", str(Path(job.info["path"]).resolve()), "--out", str(job.dir)]
    args += [a for s in sets for a in ("--set", s)]
    if data_dir is not None:
        args += ["--data-dir", str(Path(data_dir).resolve())]
    return args


# ---- A run's process, wherever it runs


def spawn(args: list[str], env: dict, stderr, cwd=None) -> subprocess.Popen:
    """`python -m fastcifar ARGS`, silent, in its own session: a terminal's Ctrl-C reaches the scheduler."""
    env = {**os.environ, **env, "FASTCIFAR_PARENT_PID": str(os.getpid())}
    return subprocess.Popen([sys.executable, "-m", "fastcifar", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=cwd, start_new_session=True)


def stop_with_parent() -> None:
    """In a run a scheduler started: SIGINT (save, exit) when the scheduler dies, even by kill -9 (Linux)."""
    parent = os.environ.pop("FASTCIFAR_PARENT_PID", None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != parent:  # it died before that took hold
        os.kill(os.getpid(), signal.SIGINT)


def tail(f) -> str:
    """The last lines of a run's stderr file."""
    f.seek(0)
    lines = f.read()[-20000:].decode("utf-8", "replace").splitlines()
    return "\n".join(line for line in lines[-TAIL_LINES:] if line.strip())


def thread_env(threads: int) -> dict:
    """The environment that gives a run `threads` CPU threads (torch reads OMP_NUM_THREADS at start)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def default_threads(slots: int) -> int:
    """A run's CPU threads without --threads: OMP_NUM_THREADS, else its share of the cores among `slots`."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, len(os.sched_getaffinity(0)) // slots)


def visible_gpus() -> list[str]:
    """The GPUs runs may be pinned to, named as CUDA_VISIBLE_DEVICES names them ([] without CUDA)."""
    import torch

    n = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in listed.split(",") if x.strip()] if listed is not None else [str(i) for i in range(n)]
    return names[:n]


@dataclasses.dataclass
class Child:
    job: Job
    proc: subprocess.Popen
    stderr: object  # the temporary file holding its stderr
    gpu: str | None


class LocalPool:
    """Runs as processes here: on GPUs pinned to one (CUDA_VISIBLE_DEVICES), K per GPU; on a CPU N at once."""

    def __init__(self, jobs: int | None = None, per_gpu: int | None = None, threads: int | None = None, gpus=None):
        self.gpus = visible_gpus() if gpus is None else list(gpus)  # gpus: these only (the packing bench)
        k = per_gpu or 1
        most = len(self.gpus) * k  # 0 on a CPU
        if self.gpus and jobs is not None and jobs > most:
            gpus = f"{len(self.gpus)} GPU{'s' * (len(self.gpus) > 1)}"
            raise BadInput(f"--jobs {jobs}: this machine has {gpus} and --per-gpu {k} puts {k} run{'s' * (k > 1)} "
                           f"on each, {most} at most; raise --per-gpu to pack more runs onto each GPU.")
        if not self.gpus and per_gpu is not None:
            raise BadInput(f"--per-gpu {per_gpu}: torch sees no GPU here; on a CPU, --jobs N runs N at once, "
                           f"splitting the cores.")
        self.slots = jobs or most or 1
        self.threads = threads or default_threads(self.slots)
        self.running: dict[tuple, Child] = {}

    def describe(self) -> str:
        at_once = f"{self.slots} at once"
        if self.gpus:
            return (f"{at_once} on {len(self.gpus)} GPU{'s' * (len(self.gpus) > 1)} (CUDA_VISIBLE_DEVICES "
                    f"{','.join(self.gpus)}; up to {-(-self.slots // len(self.gpus))} per GPU), {self.threads} CPU "
                    f"thread{'s' * (self.threads > 1)} each")
        return f"{at_once} on this CPU, {self.threads} thread{'s' * (self.threads > 1)} each"

    def start(self, job: Job, args: list[str]) -> str:
        """Start the run; returns where it runs ("GPU 3", or "")."""
        busy = [c.gpu for c in self.running.values()]
        gpu = min(self.gpus, key=busy.count) if self.gpus else None  # the GPU with the fewest runs
        env = thread_env(self.threads) | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})
        err = tempfile.TemporaryFile()
        try:
            proc = spawn(args, env, err)
        except BaseException:
            err.close()
            raise
        self.running[job.key] = Child(job, proc, err, gpu)
        return f"GPU {gpu}" if gpu is not None else ""

    def poll(self, timeout: float) -> list[tuple[Job, int | None, str]]:
        """(job, exit code, stderr tail) of the runs that ended, waiting up to timeout seconds for one."""
        end = time.monotonic() + timeout
        while not (ended := [c for c in self.running.values() if c.proc.poll() is not None]):
            if time.monotonic() >= end:
                break
            time.sleep(0.1)
        out = []
        for c in ended:
            del self.running[c.job.key]
            out.append((c.job, c.proc.returncode, tail(c.stderr)))
            c.stderr.close()
        return out

    def interrupt(self) -> None:
        """SIGINT to each run: it saves its last.pt after its current step and exits 130."""
        for c in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGINT)

    def kill(self) -> None:
        """A second SIGINT (a run quits mid-step), then SIGKILL to what is left after STOP_GRACE seconds."""
        self.interrupt()
        end = time.monotonic() + STOP_GRACE
        while time.monotonic() < end and any(c.proc.poll() is None for c in self.running.values()):
            time.sleep(0.1)
        for c in self.running.values():
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        pass


# ---- Ray


def run_child(args: list[str], env: dict, cwd: str | None) -> tuple[int, str]:
    """A Ray task: `fastcifar train ARGS` on this node; (exit code, stderr's tail). A cancel (a
    KeyboardInterrupt here) is passed on as SIGINT: the run saves its last.pt and exits 130."""
    with tempfile.TemporaryFile() as err:
        proc = spawn(args, env, err, cwd if cwd and os.path.isdir(cwd) else None)
        while proc.poll() is None:
            try:
                time.sleep(0.2)  # Ray's KeyboardInterrupt lands between sleeps, never inside a blocking wait
            except KeyboardInterrupt:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        return proc.returncode, tail(err)


def probe(folder: str, token: str, need: list[str]) -> dict:
    """A Ray task on one node: write folder/.fastcifar-probe.<token>.tmp holding the token (the
    driver reads it back: the folder is shared) and say which of the paths `need` this node lacks."""
    path = os.path.join(folder, f".fastcifar-probe.{token}.tmp")
    error = None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    except OSError as e:
        error = e.strerror or str(e)
    return {"host": socket.gethostname(), "error": error, "missing": [p for p in need if not os.path.exists(p)]}


class RayPool:
    """Runs as Ray tasks: each the same `fastcifar train` process on a node, 1/K GPU and `threads` CPUs."""

    def __init__(self, address: str, jobs: int | None = None, per_gpu: int | None = None, threads: int | None = None):
        try:
            import ray
        except ImportError:
            raise BadInput('--ray needs Ray, which fastcifar installs as an option: pip install "fastcifar[cluster]" '
                           '(or pip install "ray[default]"). Without --ray the runs go to this machine (--jobs, '
                           '--per-gpu).')
        self.ray = ray
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except Exception as e:  # ConnectionError, a version mismatch, a bad address: Ray's own exceptions
            raise BadInput(f"--ray {address}: cannot connect to a Ray cluster there ({why(e)}). Start one with `ray "
                           f"start --head` (then --ray auto on that machine), or give its address HOST:PORT.")
        res = ray.cluster_resources()
        self.gpus, self.cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        self.threads = threads or 1
        self.share = 1 / (per_gpu or 1) if self.gpus else 0  # of a GPU, per run
        most = int(self.gpus * (per_gpu or 1)) if self.gpus else int(self.cpus // self.threads)
        if most < 1:
            raise BadInput(f"--ray {address}: the cluster has {self.cpus:g} CPUs and no GPU, fewer than the "
                           f"{self.threads} CPU threads a run asks for (--threads).")
        self.slots = min(jobs or most, most)
        self.address = address
        self.running: dict[tuple, tuple[Job, object]] = {}
        self._task = ray.remote(run_child)

    def describe(self) -> str:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        what = f"{self.gpus:g} GPUs, {self.cpus:g} CPUs" if self.gpus else f"{self.cpus:g} CPUs, no GPU"
        each = (f"{self.share:.3g} GPU and " if self.share else "") + f"{self.threads} CPU{'s' * (self.threads > 1)}"
        return f"{self.slots} at once on the Ray cluster at {self.address} ({len(nodes)} nodes, {what}), {each} each"

    def check_shared(self, folder: Path, need: list[Path]) -> None:
        """BadInput unless every node can write `folder` and sees there what this machine sees (one
        probe task per node), and has each path of `need` (the store, the recipe files)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        token = secrets.token_hex(16)
        task = self.ray.remote(probe)
        refs = {n["NodeManagerAddress"]: task.options(num_cpus=0, max_retries=0, scheduling_strategy=
                                                      NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                                      ).remote(str(folder), f"{token}{k}", [str(p) for p in need])
                for k, n in enumerate(nodes)}
        problems = []
        for k, (ip, ref) in enumerate(refs.items()):
            got = self.ray.get(ref)
            node = f"{got['host']} ({ip})"
            path = folder / f".fastcifar-probe.{token}{k}.tmp"
            seen = False
            with contextlib.suppress(OSError):
                seen = path.read_text() == f"{token}{k}"
            if seen:
                path.unlink()  # written by the probe a moment ago under a name nobody else can guess
            if got["error"]:
                problems.append(f"node {node} cannot write {folder} ({got['error']})")
            elif not seen:
                problems.append(f"node {node} wrote into {folder}, but this machine does not see the file there: "
                                f"{folder} is not shared with it")
            if got["missing"]:
                problems.append(f"node {node} lacks {', '.join(got['missing'])}")
        if problems:
            raise BadInput(f"Every node of the Ray cluster runs some of these runs, so each must reach the run "
                           f"directories, the store and the recipes at the same paths as this machine (a shared file "
                           f"system, e.g. NFS): {'; '.join(problems)}.")

    def start(self, job: Job, args: list[str]) -> str:
        env = thread_env(self.threads) | {k: os.environ[k] for k in ("FASTCIFAR_DATA",) if k in os.environ}
        ref = self._task.options(num_cpus=self.threads, num_gpus=self.share, max_retries=0,
                                 name=f"fastcifar {job}").remote(args, env, os.getcwd())
        self.running[job.key] = (job, ref)
        return ""

    def poll(self, timeout: float) -> list[tuple[Job, int | None, str]]:
        refs = {ref: job for job, ref in self.running.values()}
        if not refs:
            return []
        ready, _ = self.ray.wait(list(refs), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            job = refs[ref]
            del self.running[job.key]
            try:
                code, text = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # the worker or its node died
                code, text = None, f"the Ray task ended: {why(e)}"
            out.append((job, code, text))
        return out

    def interrupt(self) -> None:
        """ray.cancel each task: its run gets SIGINT, saves its last.pt and exits 130."""
        for _, ref in self.running.values():
            self.ray.cancel(ref)

    def kill(self) -> None:
        """A second cancel (the run quits at once), then, after STOP_GRACE seconds, the worker killed."""
        self.interrupt()
        refs = [ref for _, ref in self.running.values()]
        _, left = self.ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE)
        for ref in left:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()


def make_pool(jobs=None, per_gpu=None, threads=None, ray: str | None = None):
    """The pool the options ask for: a Ray cluster (--ray ADDRESS) or this machine."""
    check_options(jobs, per_gpu, threads)
    if ray is not None:
        if not ray.strip():
            raise BadInput("--ray '': give the cluster's address HOST:PORT, or auto (RAY_ADDRESS, else the cluster "
                           "started on this machine).")
        return RayPool(ray, jobs, per_gpu, threads)
    return LocalPool(jobs, per_gpu, threads)


# ---- The scheduler


def outcome(job: Job, code: int | None, err: str) -> tuple[str, str]:
    """(kind, what to say) of an ended run: finished, stopped (saved last.pt), diverged, bad input, failed."""
    s = read_object(job.dir / "summary.json") or {}
    if code == 0 and s.get("finished"):
        best = s.get("best_acc")
        return "finished", (f"finished, best {best:.2f}% (epoch {s.get('best_epoch')})" if isinstance(best, float)
                            else "finished") + f", {duration(s.get('wall_seconds'))}"
    if code in (130, -signal.SIGINT, -signal.SIGTERM):
        n = s.get("epochs_done") or 0
        return "stopped", f"stopped with {n} epoch{'s' * (n != 1)} done; it resumes from its last.pt"
    if str(s.get("stop_reason", "")).startswith("non-finite loss"):
        return "diverged", f"diverged: {s['stop_reason']}"
    if code == 2:
        return "bad input", " ".join(err.replace("error: ", "", 1).split()) or "bad input (exit 2)"
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
    return "failed", f"failed ({how})" + (":\n    " + err.replace("\n", "\n    ") if err else "")


def estimate(jobs: list[Job], left: list[Job], running: list[Job], slots: int) -> float | None:
    """Seconds until the last run ends: the epochs still to train, at each recipe's (setting's)
    seconds per epoch so far (any recipe's mean where one has none yet), over the runs at once."""
    per_epoch, mine = {}, {}
    for j in jobs:
        s = read_object(j.dir / "summary.json") or {}
        n, wall = s.get("epochs_done"), s.get("wall_seconds")
        if isinstance(n, int) and n > 0 and isinstance(wall, (int, float)):
            mine[j.key] = (n, wall / n)
            per_epoch.setdefault(j.name, []).append(wall / n)
    if not per_epoch:
        return None
    mean = {name: sum(v) / len(v) for name, v in per_epoch.items()}
    overall = sum(mean.values()) / len(mean)
    work = 0.0
    for j in running + left:
        done, rate = mine.get(j.key, (0, mean.get(j.name, overall)))
        work += max(0, j.recipe.train.epochs - done) * rate
    return work / max(1, min(slots, len(running) + len(left)))


def run(jobs: list[Job], pool, by: str, results, again: str, data_dir=None, log=print) -> dict[tuple, tuple]:
    """Train every job not done, each after its teacher, pool.slots at once, calling results() as each ends.
    Returns {job key: (kind, why)} of the runs not finished (diverged, failed, bad input, stopped,
    skipped); raises Stopped on Ctrl-C or SIGTERM, with `again`, the command that continues."""
    try:
        with sigterm_as_ctrl_c():
            table = Scheduler(jobs, pool, by, results, data_dir, log)
            try:
                while table.left or pool.running:
                    table.step()
            except BaseException as e:  # Ctrl-C, or the scheduler's own error: its runs stop (and save) first
                table.stop()
                if isinstance(e, KeyboardInterrupt):
                    raise Stopped(f"Stopped with {len(table.done)} of {len(jobs)} runs finished; finished "
                                  f"runs are kept and the stopped ones resume from their last.pt. Continue "
                                  f"with: {again}")
                raise
            return table.failed
    finally:
        pool.close()


class Scheduler:
    """The runs of one table or sweep (done, running in the pool, waiting, not finishing) and what the user
    sees: a line per run as it starts and ends, and the summary (running, done, left, ETA), on a terminal
    kept up to date, elsewhere after each start or end and every STATUS_EVERY seconds. log None: silent."""

    def __init__(self, jobs: list[Job], pool, by: str, results, data_dir, log):
        self.jobs, self.pool, self.by, self.results, self.data_dir = jobs, pool, by, results, data_dir
        self.log, self.live = log or (lambda *a, **k: None), log is not None and sys.stdout.isatty()
        self.shown, self.last = False, float("-inf")
        states = {j.key: state(j, by) for j in jobs}  # every run directory checked before anything trains
        self.number = {j.key: k for k, j in enumerate(jobs, 1)}
        self.done, self.failed, self.left = set(), {}, []
        for j in jobs:
            if states[j.key] == "done":
                self.say(j, f"done, skipped ({j.dir})")
                self.done.add(j.key)
            elif states[j.key] == "failed":
                self.failed[j.key] = ("diverged", "diverged (a NaN/inf loss) in an earlier attempt")
                self.say(j, f"diverged earlier, skipped; remove {j.dir} to run it again")
            else:
                self.left.append(j)
        if self.left:
            prepare_stores([j for j in self.left if states[j.key] != "resume"], pool, data_dir, jobs[0].dir.parent)

    def say(self, job: Job | None, what: str) -> None:
        """A line of its own (about job), under which the live summary is drawn again."""
        if self.shown:
            sys.stdout.write("\r\033[K")
            self.shown = False
        self.log(what if job is None else f"[{self.number[job.key]}/{len(self.jobs)}] {job}: {what}")

    def status(self, event: bool) -> None:
        """Show the summary (made only when shown: it reads every run's summary.json)."""
        now = time.monotonic()
        if self.live and (event or now - self.last > 2):
            sys.stdout.write("\r\033[K" + self.summary()[:200])
            sys.stdout.flush()
            self.shown, self.last = True, now
        elif not self.live and (event or now - self.last > STATUS_EVERY):
            self.log("  " + self.summary())
            self.last = now

    def step(self) -> None:
        """Skip runs whose teacher did not finish, start what may, take those that ended (waiting <= 1 s)."""
        for j in [j for j in self.left if j.teacher and (j.teacher, j.seed) in self.failed]:
            self.left.remove(j)
            self.failed[j.key] = ("skipped", f"its teacher {j.teacher} seed {j.seed} did not finish")
            self.say(j, f"skipped, {self.failed[j.key][1]}")
        started = False
        for j in [j for j in self.left if not j.teacher or (j.teacher, j.seed) in self.done]:
            if len(self.pool.running) >= self.pool.slots:
                break
            s = state(j, self.by)
            if s == "restart":  # died before its first checkpoint: only files it wrote are there
                restart(j, self.by)
            where = self.pool.start(j, train_args(j, s == "resume", self.data_dir))
            self.left.remove(j)
            started = True
            self.say(j, ("resuming from its last.pt" if s == "resume" else "starting") + (f" on {where}" if where else "")
                     + f" -> {j.dir}")
        ends = self.pool.poll(1.0)
        for job, code, err in ends:
            self.ended(job, code, err)
        self.status(event=bool(ends) or started)

    def ended(self, job: Job, code, err: str) -> None:
        kind, text = outcome(job, code, err)
        self.say(job, text)
        if kind == "finished":
            self.done.add(job.key)
        else:
            self.failed[job.key] = (kind, text)
        with contextlib.suppress(OSError, BadInput):  # the next run that ends writes them again
            self.results()

    def summary(self) -> str:
        running = [j for j in self.jobs if j.key in self.pool.running]
        eta = estimate(self.jobs, self.left, running, self.pool.slots)
        return (f"{len(running)} running, {len(self.done)} done, {len(self.failed)} not finished, "
                f"{len(self.left)} waiting, of {len(self.jobs)}; ETA "
                + (duration(eta) if eta is not None else "after a first epoch"))

    def stop(self) -> None:
        """Stop every run, waiting while each saves its last.pt; a second Ctrl-C (or SIGTERM): at once."""
        n, hurried = len(self.pool.running), False
        if n:
            self.say(None, f"Stopping {n} running run{'s' * (n > 1)}: each saves its last.pt after its "
                           f"current step (Ctrl-C again to stop at once).")
            self.pool.interrupt()
        while self.pool.running:
            try:
                for job, code, err in self.pool.poll(1.0):
                    self.ended(job, code, err)
            except KeyboardInterrupt:
                if not hurried:
                    hurried = True
                    self.say(None, "Stopping at once.")
                    self.pool.kill()


def prepare_stores(jobs: list[Job], pool, data_dir, out: Path) -> None:
    """Before the first run, here: prepare once each store the new runs `jobs` need (not in N runs at once);
    on a Ray cluster: check that every node shares `out` and has those stores and recipes."""
    from fastcifar.data import default_data_dir

    datasets = sorted({j.recipe.data.dataset for j in jobs})
    if isinstance(pool, RayPool):
        stores = [(Path(data_dir) if data_dir is not None else default_data_dir(ds)).resolve() / "meta.json"
                  for ds in datasets]
        recipes = sorted({Path(j.info["path"]).resolve() for j in jobs})
        pool.check_shared(out, stores + recipes)
        return
    from fastcifar.train import open_or_prepare

    for ds in datasets:
        open_or_prepare(data_dir, True, ds)
