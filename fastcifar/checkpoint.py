"""Checkpoints and run files, written atomically (temp file + rename): a crash mid-write leaves
the previous complete file, never a torn one."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path

import torch

from fastcifar import owned
from fastcifar.signals import signals_held
from fastcifar import dist as fdist
from fastcifar.errors import BadInput, why


def atomic_write(path: Path, write, by: str | None = None) -> None:
    """write(binary file) to a temp file beside path, fsync, rename it to path. by: the command writing
    it; path is then replaced only if fastcifar wrote it as `by` (owned.py), and recorded as written."""
    path = Path(path)
    if by is not None:
        owned.check([path], by, "Move {it} away, or choose another path.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a run's files are as readable as any
        with signals_held():  # in place and in its manifest, or neither: a Ctrl-C between the two would
            os.replace(tmp, path)  # leave a file fastcifar wrote but may no longer replace
            if by is not None:
                owned.record([path], by)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: Path, state: dict, by: str | None = None) -> None:
    """torch.save(state) to path atomically (by: as atomic_write)."""
    def write(f):
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as this
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise

    atomic_write(path, write, by)


def write_json(path: Path, obj, by: str | None = None) -> None:
    """JSON to path atomically (by: as atomic_write)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), by)


def torch_load(path: Path, what: str = "checkpoint"):
    """torch.load onto the CPU, weights_only: a shared file cannot run code; any failure is bad input."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInput(f"The {what} {path} does not exist.")
    except IsADirectoryError:
        raise BadInput(f"The {what} {path} is a directory, not a file.")
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: never pass that on
        if "Unsupported global" in str(e):
            raise BadInput(f"{path} holds objects other than tensors and plain data; fastcifar refuses to load it, "
                           f"since unpickling them could run code. Is it a {what} written by fastcifar (or "
                           f"torch.save of a state dict)?")
        raise BadInput(f"{path} is not a readable {what} (not a torch file of tensors and plain data).")
    except Exception as e:
        with contextlib.suppress(OSError):
            if os.stat(path).st_size == 0:
                raise BadInput(f"The {what} {path} is empty (0 bytes): a write that never finished, or not a {what}.")
        if not zipfile.is_zipfile(path):  # torch.save writes a zip; unpickling anything else fails with noise
            raise BadInput(f"{path} is not a readable {what}: not a file torch.save wrote (that is a zip archive).")
        raise BadInput(f"{path} is not a readable {what} ({why(e)}).")


# What each use of a checkpoint needs; a file without them is bad input, not a KeyError later
NEEDS = {
    "weights": ("model", "recipe"),  # model.init_from: the weights alone
    "eval": ("model", "recipe", "epoch"),
    "resume": ("model", "recipe", "info", "optimizer", "scheduler", "scaler", "rng", "mix_rng", "epoch", "amp",
               "schedule_epochs", "store", "step_in_epoch", "step", "best", "history", "partial", "partial_time",
               "wall_seconds", "provenance"),
}


def check_writable_parent(out: Path, option: str = "--out") -> None:
    """BadInput unless the nearest existing folder at or above out is a directory we can create files in."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{option} {out}: {parent} is not a writable directory. Choose another {option}.")


def load(path: Path, need: str = "eval") -> dict:
    """A fastcifar checkpoint (a dict of tensors and plain data, on the CPU) holding what `need` uses."""
    ck = torch_load(path)
    if not isinstance(ck, dict) or "model" not in ck or "recipe" not in ck:
        raise BadInput(f"{path} is not a fastcifar checkpoint (it has no model and recipe).")
    missing = [k for k in NEEDS[need] if k not in ck]
    if missing:
        raise BadInput(f"The checkpoint {path} lacks {', '.join(missing)}, which {need} needs; it is damaged or "
                       f"was not written by `fastcifar train`" + (" (best.pt and last.pt both hold them)." if need ==
                                                                  "resume" else "."))
    # what a run writes there: its recipe as a mapping, its info with the recipe's name, whole epochs,
    # its input as a mapping (export and predict read it), its store's dir and checksums (resume)
    wrong = [k for k, ok in (("model", lambda v: isinstance(v, dict)), ("recipe", lambda v: isinstance(v, dict)),
                             ("info", lambda v: isinstance(v, dict) and isinstance(v.get("name"), str)),
                             ("epoch", lambda v: type(v) is int and v >= 0),
                             ("preprocess", lambda v: isinstance(v, dict)),
                             ("store", lambda v: isinstance(v, dict) and isinstance(v.get("dir"), str)
                              and isinstance(v.get("sha256"), (dict, type(None))))) if k in ck and not ok(ck[k])]
    if wrong:
        raise BadInput(f"The checkpoint {path} is damaged: its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} "
                       f"not what `fastcifar train` writes. Use another checkpoint of the run (best.pt, last.pt).")
    return ck


# What follows a recipe's name in the run directories `fastcifar train` makes (train.new_run_dir):
# -YYYYmmdd-HHMMSS, and -2, -3, ... for runs started in the same second
RUN_SUFFIX = r"-\d{8}-\d{6}(?:-\d+)?"


def runs_of(name: str, runs_dir: Path = Path("runs")) -> list[Path]:
    """The run directories <name><RUN_SUFFIX> under runs_dir: a name is never a pattern ('a*') or a prefix."""
    pattern = re.compile(re.escape(name) + RUN_SUFFIX)
    try:
        with os.scandir(runs_dir) as it:
            return sorted(Path(e.path) for e in it if pattern.fullmatch(e.name) and e.is_dir())
    except OSError:  # no runs_dir, or one this user cannot list
        return []


def resolve(ref: str | os.PathLike, prefer: str = "best.pt", runs_dir: Path = Path("runs")) -> Path:
    """A checkpoint from a file, a run directory (best.pt, else last.pt) or a recipe name (its newest run)."""
    if "\0" in str(ref):  # the OS takes no such path; pathlib would raise ValueError
        raise BadInput(f"{ref!r} holds a NUL character; give a checkpoint file, a run directory or a recipe name.")
    p = Path(ref)
    if p.is_file():
        return p
    order = [prefer] + [n for n in ("best.pt", "last.pt") if n != prefer]
    if p.is_dir():
        for n in order:
            if (p / n).is_file():
                return p / n
        raise BadInput(f"Run directory {p} holds no checkpoint (best.pt or last.pt).")
    if len(p.parts) != 1 or p.is_absolute():
        raise BadInput(f"{ref} does not exist; give a checkpoint file, a run directory or a recipe name.")
    runs = [d for d in runs_of(str(ref), runs_dir) if any((d / n).is_file() for n in order)]
    if runs:
        return resolve(max(runs, key=lambda d: d.stat().st_mtime), prefer, runs_dir)
    raise BadInput(f"{ref} is neither a checkpoint file, a run directory, nor the name of a recipe with a "
                   f"finished run under {runs_dir}/ (a directory {runs_dir}/{ref}-YYYYmmdd-HHMMSS holding best.pt "
                   f"or last.pt).")


def rng_state(device: torch.device | None = None) -> dict:
    """{"ranks": [...]}: each rank's Python, torch and CUDA RNG states (all ranks call it)."""
    own = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        own["cuda_device"] = torch.cuda.get_rng_state(device)
    return {"ranks": fdist.all_gather_object(own)}


def set_rng_state(state: dict, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
    """Restore rng_state()'s states: this rank's own (rank 0's when the run had another number of
    ranks: the data is sharded otherwise, so nothing continues exactly anyway)."""
    ranks = state["ranks"]
    own = ranks[rank] if len(ranks) == world else ranks[0]
    random.setstate(_tuples(own["python"]))
    torch.set_rng_state(own["torch"])
    if device is not None and device.type == "cuda" and "cuda_device" in own:
        torch.cuda.set_rng_state(own["cuda_device"], device)


def _tuples(x):
    """random.setstate needs tuples where a round trip may have left lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@contextlib.contextmanager
def claimed(path: Path, recheck):
    """Make run directory `path` and lock it while the run lives (one writer); recheck() runs again under
    the lock (another run may have filled it meanwhile); directories made here go on exit while empty."""
    with owned.hold(path, f"{path} is in use: another fastcifar process is writing that run. Wait for it to end, or "
                          f"stop it (Ctrl-C saves last.pt) and continue it with `fastcifar train --resume {path}`; "
                          f"to start a new run, choose another --out."):
        recheck()
        yield


# What a resume rewrites (or appends to) in its run directory: only while fastcifar wrote each of them there
REWRITTEN = ("recipe.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json", "train.log")


def check_own_run(path: Path, hint: str) -> None:
    """BadInput (ending in hint) unless each file a resume rewrites in run dir path is missing or its own."""
    owned.check([Path(path) / n for n in REWRITTEN], "train", hint)


class RunDir:
    """A run's directory (DESIGN.md's contract), written by rank 0 alone: recipe.json, recipe.py, events,
    metrics.jsonl, train.log (what the run printed, why it stopped), last.pt / best.pt, summary.json (from
    `summary(finished, reason)`: each epoch, stop(), finish(), and any other end: the context's exit)."""

    def __init__(self, path: str | os.PathLike, summary, writes: bool = True):
        self.path, self.summary, self.writes = Path(path), summary, writes
        self._tb = self._metrics = self._log = None
        self._ended = False  # summary.json says why the run ended

    def open(self, recipe_json: dict, source: str | None, history: list[dict], said: list[str] = ()) -> "RunDir":
        """Create the directory and its files: metrics.jsonl restarts from `history` (as last.pt has it),
        train.log grows by the lines `said` so far; each recorded as the run's (owned.py) for a resume."""
        if not self.writes:
            return self
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "recipe.json", recipe_json, by="train")
            if source and not (self.path / "recipe.py").exists():
                atomic_write(self.path / "recipe.py", lambda f: f.write(source.encode()), by="train")
            atomic_write(self.path / "metrics.jsonl", lambda f: f.writelines((json.dumps(m) + "\n").encode()
                                                                              for m in history), by="train")
            owned.record([self.path / "metrics.jsonl"], "train", grows=True)  # appended to from here on
            self._metrics = open(self.path / "metrics.jsonl", "a")
            self._log = open(self.path / "train.log", "a")  # a resumed run's lines follow the earlier ones'
            owned.record([self.path / "train.log"], "train", grows=True)
            for line in said:
                self.note(line)
        except OSError as e:
            raise BadInput(f"Cannot write the run directory {self.path} ({e.strerror or e}); choose another --out.")
        from torch.utils.tensorboard import SummaryWriter

        before = set(self.path.glob("events.out.tfevents.*"))
        self._tb = SummaryWriter(str(self.path))
        self._guard("the TensorBoard events", lambda: owned.record(sorted(set(self.path.glob("events.out.tfevents.*"))
                                                                          - before), "train", grows=True))
        return self

    def _guard(self, what: str, write, undo=lambda: None) -> None:
        """write(); a failed write (a full disk) stops the run as bad input, after undo() (the run's
        state back to what its files hold) and summary.json saying why, if that can be written."""
        try:
            write()
        except OSError as e:
            why = e.strerror or str(e)
            undo()
            with contextlib.suppress(OSError, BadInput):
                if self.path.is_dir():
                    s = self.summary(False, f"could not write {what}: {why}")
                    write_json(self.path / "summary.json", s, by="train")
                    self._ended = True
            raise BadInput(f"Could not write {what} in {self.path} ({why}): is the disk full or the directory "
                           f"read-only? The run stopped; last.pt, if there is one, holds the last complete epoch. "
                           f"Free some space and continue with `fastcifar train --resume {self.path}`.")

    @property
    def logging(self) -> bool:
        """Whether note() writes to train.log now."""
        return self._log is not None

    def note(self, line: str) -> None:
        """A line the run printed, appended to train.log."""
        if self._log is not None:
            self._guard("train.log", lambda: (self._log.write(line.rstrip("\n") + "\n"), self._log.flush()))

    def scalars(self, step: int, values: dict) -> None:
        """TensorBoard scalars {tag: value} at a step."""
        if self._tb is not None:
            for tag, v in values.items():
                self._tb.add_scalar(tag, v, step)

    def image(self, tag: str, image: torch.Tensor) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image, 0)

    def checkpoint(self, state: dict, best: bool, undo=lambda: None) -> None:
        """best.pt when this is the selected epoch so far, then last.pt; if either cannot be written,
        undo() first, so summary.json never names an epoch whose checkpoint is not on disk."""
        if self.writes:
            if best:
                self._guard("best.pt", lambda: save(self.path / "best.pt", state, by="train"), undo)
            self._guard("last.pt", lambda: save(self.path / "last.pt", state, by="train"), undo)

    def epoch(self, m: dict) -> None:
        """An epoch's metrics: a metrics.jsonl line, TensorBoard, and summary.json (still running).
        Call after checkpoint(): the log never names an epoch that has no checkpoint."""
        if not self.writes:
            return

        def log():
            self._metrics.write(json.dumps(m) + "\n")
            self._metrics.flush()

        self._guard("metrics.jsonl", log)
        self.scalars(m["epoch"], {f"epoch/{k}": v for k, v in m.items() if k != "epoch" and v is not None})
        self._tb.flush()
        self.stop("running")

    def finish(self, reason: str = "completed") -> dict:
        """The run ends finished: all its epochs, or train.stop_at_target (reason says which)."""
        return self.stop(reason, finished=True)

    def stop(self, reason: str, finished: bool = False) -> dict:
        """summary.json says why the run ended (interrupted, diverged, ...), or that it is "running"."""
        s = self.summary(finished, reason)
        self._ended = reason != "running"
        if self.writes:
            self._guard("summary.json", lambda: write_json(self.path / "summary.json", s, by="train"))
        return s

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not self._ended and self._metrics is not None:
            # the run ends on something that did not say why in summary.json (a second Ctrl-C, an error)
            why = ("quit at once (a second Ctrl-C, SIGTERM or SIGHUP)" if exc_type is KeyboardInterrupt
                   else f"stopped by {exc_type.__name__}: {str(exc)[:200]}")
            with contextlib.suppress(BadInput):  # the error in flight says more than a failed write would
                self.stop(why)
        if exc_type is not None and self._log is not None:  # why it stopped, as the CLI says it on stderr
            with contextlib.suppress(BadInput):
                self.note(str(exc) if issubclass(exc_type, Exception) and str(exc) else exc_type.__name__)
        for f in (self._tb, self._metrics, self._log):
            if f is not None:
                f.close()
        self._tb = self._metrics = self._log = None
        return False
