"""What the tests share: a tiny recipe and ways to run it, the command line as one runner, the check
of fastcifar's error paragraph, and the pipeline tests' backends and conversions. Fixtures live in
conftest.py."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcifar.train as T
from fastcifar import checkpoint, owned
from fastcifar.config import Recipe, derive, to_dict
from fastcifar.pipelines.loader import dali_available

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda *a, **k: None)  # train / Trainer / prepare keyword: print nothing

# ---- a tiny run

SMOKE = derive("smoke")  # read once, before any test changes the working directory (a ./recipes/smoke.py there)


def tiny(**fields) -> Recipe:
    """A seconds-long deterministic CPU run of timm's test_resnet (0.4M parameters): the smoke recipe
    on all of a small test store; fields are section__name=value (`tiny(train__epochs=1)`)."""
    r = copy.deepcopy(SMOKE)
    r.data.batch_size = 50
    r.data.subset = r.data.test_subset = 1.0  # the tests' stores are small: all of them
    r.data.backend = "torch"
    r.schedule.final_lr = 0.05  # ends above 0, so that a finished run may be resumed for more epochs
    r.train.epochs = 3
    r.train.device = "cpu"
    r.train.deterministic = True
    r.train.log_every = 4
    for key, value in fields.items():
        section, name = key.split("__")
        setattr(getattr(r, section), name, value)
    return r


# two recipe files as a user writes them: a teacher (tiny() for two epochs, written out as data) and
# its distilled student
TEACHER = f'''"""A tiny teacher: tutorial 12.5% (a made-up figure)."""
from fastcifar.config import from_dict


def recipe():  # tiny() for two epochs, written out as data
    return from_dict({to_dict(tiny(train__epochs=2, train__log_every=2))!r})
'''
STUDENT = '''"""A tiny student distilled from tiny_teacher."""
from fastcifar.config import derive


def recipe():
    r = derive("tiny_teacher")
    r.distill.teacher = "tiny_teacher"
    return r
'''


MIXED = dict(aug__mixup_alpha=0.4, aug__cutmix_alpha=1.0, aug__mix_p=0.8)  # MixUp or CutMix on most batches
# ... and an EMA updated every 3rd step (a stop at step 24 falls on an update), selection on it
MIXED_EMA = dict(**MIXED, train__ema_decay=0.9, train__ema_every=3, train__select_on="ema")

# recipe fields that a run written by an earlier fastcifar lacks in its recipe.json and checkpoints
NEWER_FIELDS = {"data": ["dataset"], "model": ["drop_path", "sync_bn"],
                "train": ["ema_decay", "ema_every", "ema_warmup", "select_on", "tta"]}


def without_newer_fields(recipe: dict) -> dict:
    """A recipe dict as an earlier fastcifar wrote it: without NEWER_FIELDS."""
    return {s: ({k: v for k, v in fields.items() if k not in NEWER_FIELDS.get(s, [])} if isinstance(fields, dict)
                else fields) for s, fields in recipe.items()}


def info(name="tiny") -> dict:
    """The run info (name, description, source) that the CLI passes to train() with a recipe."""
    return {"name": name, "description": f"{name}: a test run", "source": '"""a test run"""\n'}


class LoaderSpy:
    """A loader that passes batches through and calls fn(epoch, batch_index, images, labels) before
    yielding each one (to record what a training loop consumed, or to act mid-epoch)."""

    def __init__(self, loader, fn):
        self.loader, self.fn, self.epoch, self.start = loader, fn, 0, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch
        self.loader.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        for i, (images, labels) in enumerate(self.loader, start=self.start):
            self.fn(self.epoch, i, images, labels)
            yield images, labels


def fit(recipe, run_info, train_fn=None, test_fn=None, setup=None, **kw) -> dict:
    """T.train through the Trainer's seams: train_fn / test_fn(epoch, batch index, images) run as each
    training / test batch is consumed; setup(trainer) may replace other parts before fit()."""
    with T.Trainer(recipe, run_info, **QUIET, **kw) as trainer:
        if train_fn:
            trainer.train_loader = LoaderSpy(trainer.train_loader, lambda e, i, x, y: train_fn(e, i, x))
        if test_fn:
            trainer.test_loader = LoaderSpy(trainer.test_loader, lambda e, i, x, y: test_fn(e, i, x))
        if setup:
            setup(trainer)
        return trainer.fit()


def fixed_scores(val: list[float], test: list[float]):
    """A fit() setup that makes evaluation return val[e] / test[e] at epoch e (0-based)."""
    def setup(trainer):
        seen = {"val": 0, "test": 0}

        def evaluate(loader):
            kind = "test" if loader is trainer.test_loader else "val"
            assert kind == "test" or loader is trainer.val_loader
            acc = (test if kind == "test" else val)[seen[kind]]
            seen[kind] += 1
            return {"acc": acc, "top5": min(100.0, acc + 10), "loss": 5 - acc / 100, "images": loader.num_samples}

        trainer.evaluate = evaluate

    return setup


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl of a run, one dict per epoch."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


TIMING = {"images_per_sec", "epoch_seconds", "wall_seconds", "train_seconds", "data_wait_seconds", "data_wait_fraction",
          "warmup_seconds"}


def untimed(ms: list[dict]) -> list[dict]:
    """Epoch metrics without the figures that depend on how fast the machine was."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in ms]


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of run src at dst that counts as fastcifar's own, as if the run had been written there
    (a plain copy does not: resume refuses to replace its files, owned.py)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(owned.MANIFEST))
    owned.record([p for p in dst.iterdir()], "train")
    return dst


def interrupt_at(recipe, out, store_dir, epoch: int, batch: int) -> None:
    """Run recipe into out and stop it with a real Ctrl-C (through the loop's handler) as batch
    `batch` of epoch `epoch` (both from 0) is consumed: the run saves last.pt and raises Interrupted."""
    def ctrl_c(e, i, images):
        if (e, i) == (epoch, batch):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(T.Interrupted):
        fit(recipe, info(), out=out, data_dir=store_dir, train_fn=ctrl_c)


def resume_matches_straight(recipe, store_dir, tmp_path, batch: int) -> dict:
    """Train recipe straight through, and again stopped by Ctrl-C at batch `batch` of its first
    epoch and resumed: assert the two runs log the same metrics and end with the same weights;
    return the resumed run's summary."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    T.train(recipe, info(), out=straight, data_dir=store_dir, **QUIET)
    interrupt_at(recipe, run, store_dir, epoch=0, batch=batch)
    assert checkpoint.load(run / "last.pt")["step_in_epoch"] == batch + 1
    s = T.train(recipe, {}, data_dir=store_dir, resume=run, **QUIET)
    assert s["finished"] and untimed(metrics(run)) == untimed(metrics(straight))
    a, b = checkpoint.load(run / "last.pt")["model"], checkpoint.load(straight / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    return s


def make_run(root: Path, name: str, accs: list[float], synthetic=False, val=None, summary=True, description="what it does",
             **extra) -> Path:
    """A run directory as `fastcifar train` writes it, with the given test accuracy per epoch (no weights)."""
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
        s.update(extra)
        (d / "summary.json").write_text(json.dumps(s))
    return d


def contents(root: Path) -> dict:
    """Every file and directory under root (root itself included), with file contents: what
    "nothing written, replaced or made" compares."""
    tree = {".": "dir" if root.is_dir() else root.read_bytes()}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            tree[str(p.relative_to(root))] = "dir" if p.is_dir() else p.read_bytes()
    return tree


def backend_flags() -> dict:
    """The process-wide backend flags a run sets (and must put back)."""
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


# torch's message when a CPU allocation fails (a plain RuntimeError, not torch.OutOfMemoryError)
CPU_ALLOC = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
             "to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")

TUTORIAL = {  # recipe: the tutorial's figure its docstring must quote
    "r18_baseline": "44.26%", "r18_augment": "36.48%", "r18_wd01": "40.12%", "r18_lbsmooth": "44.81%",
    "r18_pretrained": "56.70%", "r18_arcface": "57.92%", "r18_arcface_224": "79.57%",
    "r50_arcface": "61.76%", "r50_arcface_224": "81.21%", "r18_arcface_kd": "57.37%", "r18_cosface": "57.92%",
    "r18_arcface_mst": "no result published",  # its multi-scale experiment: code, no figure
}


# ---- the command line


def cli(*args, spawn: bool = False, env: dict | None = None, cwd=None, timeout: float = 600) -> tuple[int, str, str]:
    """Run `fastcifar ARGS` and return (exit code, stdout, stderr).

    In this process by default (fast; the test's monkeypatches apply). spawn=True runs
    `python -m fastcifar ARGS` in a new process as a shell does, with env added to this one's
    environment and cwd as its directory: for signals, environment variables, or what a fresh
    interpreter imports."""
    args = [str(a) for a in args]
    if spawn:
        r = subprocess.run([sys.executable, "-m", "fastcifar", *args], capture_output=True, text=True, cwd=cwd,
                           env={**os.environ, **env} if env is not None else None, timeout=timeout)
        return r.returncode, r.stdout, r.stderr
    assert env is None and cwd is None, "env and cwd are for spawn=True (monkeypatch them in this process)"
    from fastcifar.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["fastcifar", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def one_paragraph(err: str, *names) -> bool:
    """err is fastcifar's message for bad input: one paragraph starting "error: ", no traceback, and
    naming each of names (compared without whitespace: the paragraph is wrapped at 100 columns,
    long paths included)."""
    flat = "".join(err.split())
    return (err.startswith("error: ") and "Traceback" not in err and "\n\n" not in err.strip()
            and all("".join(str(n).split()) in flat for n in names))


# ---- the pipelines: a small store's sizes, the backends to run, conversions

N_TRAIN, N_TEST = 500, 200  # the `store` fixture's images
# DALI tests skip where DALI does not import (or FASTCIFAR_HIDE_DALI=1 hides it, see conftest.py)
needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI does not import here")
# Every backend runs on the CPU here; DALI in its CPU mode (device_id=None).
BATCHED = ["torch", pytest.param("dali", marks=needs_dali)]  # the backends that apply pipelines.draw's draws
BACKENDS = [*BATCHED, "tutorial"]


def stored(store, split: str, rows) -> np.ndarray:
    """The stored images of `rows` as the loaders emit them with normalize='none': NCHW float x/255."""
    return np.array(store.images(split)[np.asarray(rows)]).transpose(0, 3, 1, 2).astype(np.float32) / 255


def as_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """A loader batch made with normalize='none' back to uint8 NHWC (exact: it was uint8 / 255)."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ArrayStore:
    """What the loaders read of a store, over in-memory uint8 NHWC images (labels all 0)."""

    def __init__(self, images, where):
        self.x, self.y, self.dir = images, np.zeros(len(images), np.int64), where

    def images(self, split):
        return self.x

    def labels(self, split):
        return self.y


# aten ops that multiply matrices (affine_grid_generator is a bmm inside)
MATMUL_OPS = re.compile(r"(^|_)(mm|bmm|addmm|baddbmm|addbmm|mv|dot|vdot|matmul|einsum|linear|tensordot|"
                        r"affine_grid_generator)$|conv")


class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched while active (names like 'bmm', 'grid_sampler_2d')."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ---- the package as a user installs it

# What a checkout holds that the build reads; anything else (data, runs, caches) stays out.
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "fastcifar", "pipelines", "recipes"]


def run_ok(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    """Run a command that must succeed (else the assertion shows its output's tails)."""
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def clean_env(extra_path=None, **extra) -> dict:
    """This environment without anything that would let the checkout in (PYTHONPATH) or move the data."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "FASTCIFAR_DATA")}
    if extra_path:
        env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def dependency_floors() -> list[str]:
    """pyproject.toml's runtime dependency lines, as the wheel's metadata will carry them."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)[1]
    return re.findall(r'^\s*"([^"]+)",', block, re.M)
