"""`fastcifar doctor`: does fastcifar work on this machine, and how fast, within a budget (docs/doctor.md).

The steps (STEPS: checks, targets, extras, in priority order) each run in a child process with a cap:
a crash or a hang fails that step alone. A check that did not pass makes the exit status 1; a figure
below its target is a measurement, never a failure. GPU and CPU run one code path, the CPU at toy sizes
(SCALE, Step.cap); only a GPU compiles the rows' steps and needs DALI; targets: H100/H200-class cards.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import shutil
import signal
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from fastcifar import __version__, bench, provenance, runtime
from fastcifar.errors import BadInput, why
from fastcifar.signals import Stopped

BUDGET = 180.0  # seconds of wall clock for the whole run, compiles included
TARGET_CARDS = ("H100", "H200", "H800", "GH200")  # the cards the targets are set for
# What the steps run on a GPU, and at toy sizes on a CPU. The checks' own sizes are the same on both.
SCALE = {
    "cuda": {"store": (22_000, 1_000), "pipeline_batch": 250, "pipeline_plan": (3, 5, 16),  # 20,750 images, one epoch
             "step_batch": {32: 250, 224: 250}, "step_plan": (5, 5, 10),
             "models": {"resnet18": "resnet18", "resnet50": "resnet50"}},
    "cpu": {"store": (1_200, 300), "pipeline_batch": 32, "pipeline_plan": (1, 2, 2),
            "step_batch": {32: 16, 224: 4}, "step_plan": (1, 2, 2),
            "models": {"resnet18": "test_resnet", "resnet50": "test_resnet"}},
}
TARGETS = {"dali_oneof_224": 100_000, "resnet18_224_step": 10_000, "resnet18_224_ratio": 0.95,
           "resnet18_32_ratio": 0.95, "resnet50_224_step": 4_000}
COMPILE = {"train": 350, "test": 270, "batch": 100}  # 3 steps (50 images dropped); test batches 100, 100, 70 (padded)
RESUME = {"train": 200, "test": 100, "batch": 50, "epochs": 2, "stop": 3}  # 8 steps; stop after step 3
TAIL = 15  # lines of a failed step's log shown


# kind: check | target | extra; run(ctx, emit) -> {ok, detail}, emit(row) hands over a throughput row at once;
# cap: seconds at most, need: seconds left for it to be worth starting, each (on a GPU, on a CPU)
Step = collections.namedtuple("Step", "name kind run cap need")


# ---- The checks


def check_agreement(ctx: dict, emit) -> dict:
    """DALI (on the device, and in CPU mode beside a GPU) against the torch backend, one seed."""
    from fastcifar.data import open_store
    from fastcifar.pipelines import agree
    from fastcifar.pipelines.loader import dali_available

    device = runtime.command_device(ctx["device"])
    store = open_store(ctx["store"])
    rows = agree.tf32(store, device, batch=50)
    if not dali_available():
        ok = all(r["ok"] for r in rows) and device.type != "cuda"  # a GPU's pipeline; a CPU's option
        return {"ok": ok, "detail": "DALI is not installed here (pip install nvidia-dali-cuda120; Linux x86_64 and "
                "aarch64): nothing to compare the torch backend with, and data.backend=auto runs torch"
                + ("" if ok else "; " + _failures(rows))}
    rows += agree.agreement(store, device, rows=100, batch=50)
    rows += agree.branches(store, device, {k: agree.RARE[k] for k in ("oneof", "trivialaugment", "randaugment")})
    backends = sorted({r[k] for r in rows if r["check"] == "agreement" for k in ("a", "b")})
    empty = sorted({b for r in rows if r["check"] == "branches" for b in r["empty"]})
    within = f"within {max(r['bound'] for r in rows if r['check'] == 'agreement'):g}/255"
    ok = all(r["ok"] for r in rows) and bool(empty)
    detail = (f"{' and '.join(backends)}: OneOf, TrivialAugment, RandAugment at 32 and 224 {within}; batches of 1-4 "
              f"in which branches ({len(empty)}, e.g. {', '.join(empty[:3])}) were empty; TF32 on and off alike")
    return {"ok": ok, "detail": detail if ok else _failures(rows) or "no batch left a branch empty"}


def _failures(rows: list[dict]) -> str:
    return "; ".join(f"{r['check']} {r.get('spec', '')} {r['a']} vs {r['b']} at {r['size']}: max {r['max']}/255 "
                     f"(bound {r['bound']})" for r in rows if not r["ok"])


def _recipe(ctx: dict, sizes: dict, **train):
    """r18_cifar_32, as installed, shrunk: timm's test_resnet on `sizes` images of the doctor's store."""
    from fastcifar import config

    n_train, n_test = SCALE[torch.device(ctx["device"]).type]["store"]  # the store run() made
    r, info = config.load(str(config.installed_recipes_dir() / "r18_cifar_32.py"))  # never a ./recipes look-alike
    config.apply_overrides(r, ["model.name=test_resnet", f"data.batch_size={sizes['batch']}",
                               f"data.subset={sizes['train'] / n_train!r}",
                               f"data.test_subset={sizes['test'] / n_test!r}", f"train.device={ctx['device']}",
                               "train.log_every=1", *(f"train.{k}={v}" for k, v in train.items())])
    return r, {**info, "name": "doctor"}


@contextlib.contextmanager
def recompiles():
    """The reasons dynamo gives for each recompile inside the block (its `recompiles` log)."""
    import torch._dynamo.guards as guards

    reasons, logger = [], logging.getLogger(guards.recompiles_log.name)
    handler = logging.Handler()
    handler.emit = lambda record: reasons.append(record.getMessage())
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    saved, logger.propagate = logger.propagate, False  # into `reasons`, not onto stderr
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.propagate = saved
        torch._logging.set_logs()


def shape_recompiles(reasons: list[str]) -> list[str]:
    """The recompiles not caused by switching between training and evaluation (grad mode, the
    modules' training flag): a new shape, stride or dtype reached the graph."""
    return [r for r in reasons if any(not any(m in line for m in ("grad_mode", "training"))
                                      for line in r.splitlines() if line.strip().startswith("- "))]


def check_compile(ctx: dict, emit) -> dict:
    """Two epochs of the compiled Trainer, uneven last batches: no recompile but evaluation's."""
    import fastcifar.train as T

    r, info = _recipe(ctx, COMPILE, epochs=2, compile="true")
    with recompiles() as reasons, T.Trainer(r, info, out=Path(ctx["work"]) / "compile", data_dir=ctx["store"]) as tr:
        s = tr.fit()
        compiled, backend, amp = tr.compiled, tr.train_loader.backend, tr.amp
    shape = shape_recompiles(reasons)
    steps, dropped = divmod(COMPILE["train"], COMPILE["batch"])
    detail = (f"test_resnet compiled, channels_last, {'fp32' if amp == 'none' else amp}, {backend} loader: 2 epochs "
              f"of {steps} steps of {COMPILE['batch']} ({dropped} images dropped), test batches of 100, 100 and 70 "
              f"(padded): {len(shape)} shape recompiles, {len(reasons) - len(shape)} for evaluation")
    ok = compiled and s["finished"] and not shape
    return {"ok": ok, "detail": detail + ("" if ok else ". " + " | ".join(" ".join(x.split()) for x in shape)[:600])}


def same(a, b) -> bool:
    """Whether two state dicts (nested dicts, lists, tensors) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def check_resume(ctx: dict, emit) -> dict:
    """The Trainer straight, and stopped and resumed: the same weights and optimizer, bit for bit."""
    import fastcifar.train as T
    from fastcifar import checkpoint

    r, info = _recipe(ctx, RESUME, epochs=RESUME["epochs"], compile="false", deterministic="true")
    work = Path(ctx["work"])
    T.train(r, info, out=work / "straight", data_dir=ctx["store"])
    with T.Trainer(r, info, out=work / "stopped", data_dir=ctx["store"]) as tr:
        real, count = tr.train_step, itertools.count(1)

        def train_step(*args):  # the run is asked to stop, as Ctrl-C does, after step RESUME["stop"]
            if next(count) == RESUME["stop"]:
                tr.stop.signal = signal.SIGINT  # checked after this step
            return real(*args)

        tr.train_step = train_step
        steps = len(tr.train_loader) * RESUME["epochs"]
        with contextlib.suppress(T.Interrupted):
            tr.fit()
            return {"ok": False, "detail": f"a stop requested after step {RESUME['stop']} did not stop the run"}
    T.train(r, {}, data_dir=ctx["store"], resume=work / "stopped")
    a, b = (checkpoint.load(work / run / "last.pt") for run in ("straight", "stopped"))
    differ = [k for k in ("model", "optimizer", "step") if not same(a[k], b[k])]
    detail = f"{steps} steps straight == {RESUME['stop']} steps, a stop and a resume, bit for bit"
    named = " and ".join(filter(None, [", ".join(differ[:-1]), *differ[-1:]]))
    verb = "differs" if len(differ) == 1 else "differ"
    return {"ok": not differ, "detail": detail + (f": NOT so, {named} {verb}" if differ else "")}


# ---- The throughput rows


def pipeline(ctx: dict, emit, backend: str, aug: str, size: int) -> dict:
    """A loader backend's img/s with an augmentation at a size (bench.measure)."""
    from fastcifar.data import open_store
    from fastcifar.pipelines import AugSpec, make_loader
    from fastcifar.pipelines.loader import dali_available

    if backend == "dali" and not dali_available():
        return {"ok": True, "detail": "not measured: DALI is not installed here"}
    device = runtime.command_device(ctx["device"])
    s = SCALE[device.type]
    loader = make_loader(open_store(ctx["store"]), "train", AugSpec(image_size=size, **bench.pipeline_augs()[aug]),
                         s["pipeline_batch"], backend=backend, device=device, seed=0)
    with runtime.backend_settings(deterministic=False):
        rate = bench.measure(loader, device, *s["pipeline_plan"])
    label = {"oneof": "OneOf", "trivialaugment": "TrivialAugment", "randaugment": "RandAugment"}[aug]
    emit({"name": f"{backend}_{aug}_{size}", "what": f"{loader.backend} {label}@{size} pipeline, img/s",
          "value": bench.img_s(rate), "batch_size": s["pipeline_batch"]})
    return {"ok": True, "detail": f"{loader.backend}, batch {s['pipeline_batch']}"}


def train_step(ctx: dict, emit, model: str, size: int, fed: bool = False) -> dict:
    """A model's step img/s on device tensors and, if fed, the same step fed by the auto loader."""
    from fastcifar.data import open_store
    from fastcifar.pipelines import make_loader

    device = runtime.command_device(ctx["device"])
    s = SCALE[device.type]
    name, bs, plan = s["models"][model], s["step_batch"][size], s["step_plan"]
    amp = ctx["precision"] != "none"
    compiled = device.type == "cuda"  # a CPU compile costs most of a minute a graph; the compile check compiles there
    what = f"{model}@{size}" + ("" if name == model else f" ({name}, toy size)")
    setting = f"{'compiled' if compiled else 'eager'}, channels_last, {'fp32' if not amp else ctx['precision']}"
    torch.manual_seed(0)
    with runtime.backend_settings(deterministic=False):
        step = bench.make_train_step(name, device, compiled, True, amp)
        dtype = bench._input_dtype(device, amp)
        images = torch.randn(bs, 3, size, size, device=device, dtype=dtype)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 100, (bs,), device=device)
        alone, warm = bench._time_steps(step, iter(lambda: (images, labels), None), device, *plan)
        emit({"name": f"{model}_{size}_step", "what": f"{what} train step ({setting}), img/s",
              "value": bench.img_s(alone), "batch_size": bs, "warmup_seconds": round(warm, 1)})
        if not fed:
            return {"ok": True, "detail": f"{setting}, batch {bs}, warm-up {warm:.0f} s"}
        spec = bench.end_to_end_spec(size, str(dtype).removeprefix("torch."))
        loader = make_loader(open_store(ctx["store"]), "train", spec, bs, backend="auto", device=device, seed=0)
        e2e, warm2 = bench._time_steps(step, iter(loader), device, *plan)  # the same graph: no second compile
    emit({"name": f"{model}_{size}_e2e", "what": f"{what} end_to_end ({loader.backend} loader), img/s",
          "value": bench.img_s(e2e), "batch_size": bs, "warmup_seconds": round(warm2, 1)})
    emit({"name": f"{model}_{size}_ratio", "what": f"{what} end_to_end / step", "value": round(e2e / alone, 2)})
    return {"ok": True, "detail": f"{setting}, batch {bs}, warm-up {warm:.0f} s"}


STEPS = [  # priority order: the checks, the targets, the extras; cap and need in seconds (on a GPU, on a CPU)
    Step("agreement", "check", check_agreement, cap=(90, 90), need=(20, 20)),
    Step("compile", "check", check_compile, cap=(120, 200), need=(30, 60)),
    Step("resume", "check", check_resume, cap=(60, 90), need=(10, 15)),
    Step("dali_oneof_224", "target", partial(pipeline, backend="dali", aug="oneof", size=224),
         cap=(45, 60), need=(8, 5)),
    Step("resnet18_224", "target", partial(train_step, model="resnet18", size=224, fed=True),
         cap=(120, 60), need=(40, 5)),
    Step("resnet18_32", "target", partial(train_step, model="resnet18", size=32, fed=True),
         cap=(100, 60), need=(35, 5)),
    Step("resnet50_224", "target", partial(train_step, model="resnet50", size=224), cap=(120, 60), need=(50, 5)),
    *(Step(f"{backend}_{aug}_224", "extra", partial(pipeline, backend=backend, aug=aug, size=224),
           cap=(30, 60), need=(5, 5))
      for backend, aug in (("torch", "oneof"), ("dali", "trivialaugment"), ("dali", "randaugment"))),
]


# ---- Running the steps


def _child(run, ctx: dict, conn, log_path: str) -> None:
    """A step in its own process group (a timeout also ends its compile workers), output to its log."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends this process
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    conn.send(("done", _call(run, ctx, lambda row: conn.send(("row", row)))))


def _call(run, ctx: dict, emit) -> dict:
    """run(ctx, emit); an exception is the step's failure, its traceback in the log."""
    try:
        return run(ctx, emit)
    except Exception as e:  # a step's error of any kind is its failure, reported with the others
        traceback.print_exc()
        return {"ok": False, "detail": why(e)}


def _kill(p) -> None:
    with contextlib.suppress(OSError):
        os.killpg(p.pid, signal.SIGKILL)  # the step's group: its own workers too
    p.kill()  # not yet in a group of its own
    p.join()


def run_isolated(step: Step, ctx: dict, timeout: float, log_path: Path, rows: list) -> dict | None:
    """The step's {ok, detail} from a child process (forkserver: forked from a clean process that
    imported torch once), None past `timeout` seconds; its rows go into `rows` as they arrive."""
    mp = multiprocessing.get_context("forkserver")
    recv, send = mp.Pipe(duplex=False)
    p = mp.Process(target=_child, args=(step.run, ctx, send, str(log_path)))  # not a daemon: it may have workers
    p.start()
    send.close()
    deadline, result = time.monotonic() + timeout, None
    try:
        while result is None:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(p)
                return None
            if not multiprocessing.connection.wait([recv, p.sentinel], timeout=min(left, 1.0)):
                continue
            try:
                kind, payload = recv.recv()
            except EOFError:  # the process ended without a result: it died
                break
            if kind == "row":
                rows.append(payload)
            else:
                result = payload
    except BaseException:  # Ctrl-C: the step goes with the rest
        _kill(p)
        raise
    p.join(10)
    if p.is_alive():  # done, but stuck in its teardown
        _kill(p)
    if result is None:
        code = p.exitcode
        died = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        return {"ok": False, "detail": f"its process died ({died})"}
    return result


def run_inline(step: Step, ctx: dict, log_path: Path, rows: list) -> dict:
    """The step in this process (no cap enforced): how tests plant a fault the step must catch."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return _call(step.run, ctx, rows.append)


# ---- What is printed and written


def versions_line(v: dict) -> str:
    card = (f"{v['gpu']['name']} (compute capability {v['gpu']['capability']}, {v['gpu']['memory_gib']} GiB, driver "
            f"{v['driver'] or 'unknown'})" if v["gpu"] else f"no GPU ({v['cpu']})")
    return (f"fastcifar {v['fastcifar']}, torch {v['torch']} (CUDA {v['cuda'] or 'none'}), DALI "
            f"{v['dali'] or 'not installed'}, timm {v['timm']}, Python {v['python']}; {card}; "
            f"{v['cpu_cores']} CPU cores")


def table(report: dict) -> str:
    """The markdown bench/RESULTS.md keeps: what ran on what, the checks, the throughput rows."""
    m, steps, rows = report["meta"], report["steps"], report["rows"]
    n = lambda x: f"{x:,}" if isinstance(x, int) else str(x)  # 12,345 img/s
    checks = [s for s in steps if s["kind"] == "check"]
    passed = sum(s["status"] == "pass" for s in checks)
    lines = [f"## fastcifar doctor on {m['device_name']}: {passed} of {len(checks)} checks passed, {m['seconds']:.0f} s"
             + (" (stopped by Ctrl-C)" if m.get("stopped") else ""), "", versions_line(report["versions"]) + ".",
             f"Precision: {m['precision']} ({m['precision_why']}).",
             f"Command: `{m['command']}` (budget {m['budget']:g} s).", "",
             "| check | result | seconds | what |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['detail']} |" for s in checks]
    lines += ["", f"| throughput{' (toy sizes on a CPU)' if m['toy'] else ''} | measured | target | met |",
              "|---|---|---|---|"]
    for r in rows:
        target = TARGETS.get(r["name"])
        met = "" if target is None else "n/a (not an H100/H200)" if r["met"] is None else "yes" if r["met"] else "NO"
        lines.append(f"| {r['what']} | {n(r['value'])} | {'' if target is None else '>= ' + n(target)} | {met} |")
    for s in steps:  # a step that measured nothing, or stopped part-way: why
        if s["kind"] != "check" and (s["status"] != "pass" or not any(r["step"] == s["name"] for r in rows)):
            lines.append(f"| {s['name']}: {s['status']} | {s['detail']} | | |")
    missed = [s["name"] for s in steps if s["status"] in ("skipped", "cut")]
    if missed:
        lines += ["", f"Did not fit in the budget: {', '.join(missed)}; `--budget SECONDS` gives them time "
                      f"(a second run is faster: compiled graphs come from the cache)."]
    return "\n".join(lines)


def run(device: str | None = None, budget: float = BUDGET, json_path=None, log=print, isolate: bool = True,
        steps: list[Step] | None = None, command: str = "fastcifar doctor") -> int:
    """Run the steps within the budget, print the table, write --json; returns the exit status."""
    from fastcifar.data import prepare

    start = time.monotonic()
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise BadInput(f"--budget {budget}: give the seconds doctor may take, e.g. --budget {BUDGET:g}.")
    if json_path is not None:
        json_path = Path(json_path)
        bench.check_json_path(json_path, by="doctor")
    dev = runtime.command_device(device)
    v = provenance.software(dev)
    v["driver"] = v["gpu"] and v["gpu"]["driver"]
    precision, precision_why = runtime.resolve_amp(dev, "auto")
    meta = {"device_name": v["gpu"]["name"] if v["gpu"] else "cpu", "toy": dev.type != "cuda",
            "precision": "fp32" if precision == "none" else precision,
            "precision_why": precision_why.removeprefix("auto: "), "budget": budget, "command": command,
            "targets_apply": bool(v["gpu"]) and any(c in v["gpu"]["name"] for c in TARGET_CARDS)}
    log(versions_line(v))
    log(f"precision: {meta['precision']} ({meta['precision_why']})")
    if isolate:  # the steps' processes fork from one that imported these once, while the store is made
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["fastcifar.doctor", "fastcifar.train", "torch.utils.tensorboard"])  # not DALI: it is the steps' to start
        multiprocessing.forkserver.ensure_running()
    report = {"doctor": __version__, "meta": meta, "versions": v, "steps": [], "rows": []}
    work, k = Path(tempfile.mkdtemp(prefix="fastcifar-doctor-")), 0 if dev.type == "cuda" else 1
    try:
        n_train, n_test = SCALE[dev.type]["store"]
        prepare(work / "store", synthetic=True, n_train=n_train, n_test=n_test, log=lambda *_: None, progress=False)
        ctx = {"device": str(dev), "store": str(work / "store"), "precision": precision}
        for step in steps if steps is not None else STEPS:
            left = budget - (time.monotonic() - start)
            entry = {"name": step.name, "kind": step.kind, "seconds": 0.0, "status": "interrupted",
                     "detail": "stopped by Ctrl-C or SIGTERM"}
            report["steps"].append(entry)
            if left < step.need[k]:
                entry.update(status="skipped", detail=f"did not fit: needs about {step.need[k]} s, "
                                                      f"{max(left, 0):.0f} s of the {budget:g} s budget left")
            else:
                (work / step.name).mkdir()
                rows = []
                try:
                    entry.update(_step(step, {**ctx, "work": str(work / step.name)}, min(step.cap[k], left), k,
                                       isolate, rows, log))
                finally:  # what it measured, also when it stopped part-way
                    for r in rows:
                        target = TARGETS.get(r["name"])
                        met = None if target is None or not meta["targets_apply"] else r["value"] >= target
                        report["rows"].append({**r, "step": step.name, "target": target, "met": met})
            took = "" if entry["status"] == "skipped" else f" ({entry['seconds']:.0f} s)"
            log(f"{entry['status'].upper():7} {step.name}{took}: {entry['detail']}")
            for line in entry.get("log", []):
                log(f"{'':7} | {line}")
    except KeyboardInterrupt:
        meta["stopped"] = True
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the temp dir made above, and only that
    meta["seconds"] = round(time.monotonic() - start, 1)
    log("\n" + table(report))
    if json_path is not None:  # the steps as checks and measurements
        done = report["steps"]
        bench.write_json(json_path, {**{k: v for k, v in report.items() if k != "steps"},
                                     "checks": [e for e in done if e["kind"] == "check"],
                                     "measurements": [e for e in done if e["kind"] != "check"]}, by="doctor")
        log(f"wrote {json_path}")
    if meta.get("stopped"):
        where = f"in step {report['steps'][-1]['name']}" if report["steps"] else "before the first step"
        raise Stopped(f"Stopped by Ctrl-C or SIGTERM {where}; the table above holds what was done.")
    # exit 1: a check that did not pass, or any step that failed or hung (not a figure below its
    # target, nor a measurement the budget left out)
    return int(any(e["status"] != "pass" and (e["kind"] == "check" or e["status"] in ("fail", "timeout"))
                   for e in report["steps"]))


def _step(step: Step, ctx: dict, cap: float, k: int, isolate: bool, rows: list, log) -> dict:
    """Run one step for at most cap seconds; its status, detail, seconds and a failure's log tail."""
    log(f"{'...':7} {step.name} (at most {cap:.0f} s)")
    log_path, t = Path(ctx["work"] + ".log"), time.monotonic()
    r = run_isolated(step, ctx, cap, log_path, rows) if isolate else run_inline(step, ctx, log_path, rows)
    if r is None:  # stopped at its cap, or at the budget's end
        cut = cap < step.cap[k]
        result = {"status": "cut" if cut else "timeout",
                  "detail": f"stopped after {cap:.0f} s: " + ("the budget ran out" if cut else "its cap")}
    else:
        result = {"status": "pass" if r["ok"] else "fail", "detail": r["detail"]}
    result["seconds"] = round(time.monotonic() - t, 1)
    if result["status"] not in ("pass", "cut"):  # the end of its log, where it made one
        result["log"] = log_path.read_text(errors="replace").splitlines()[-TAIL:] if log_path.exists() else []
    return result
