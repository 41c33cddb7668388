"""The CIFAR-100 and CIFAR-10 stores: `prepare` turns the official pickles (or a synthetic set)
into memory-mapped uint8 arrays once; `open_store` hands them to the pipelines.

The store's files (FORMAT_VERSION 1), what prepare may replace and how a killed prepare is undone
are in docs/data.md: a new store is built in `.NAME.tmp-*` beside the data dir and swapped in with
renames under a lock on the parent; the next prepare or open_store puts back an old store moved
aside (`.NAME.old-*`) and deletes temp dirs whose builder is dead (no process holds their lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import secrets
import shutil
import tarfile
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import numpy.lib.format as npformat

from fastcifar import jsonio, owned
from fastcifar.errors import BadInput, why
from fastcifar.owned import make_dirs, remove_empty

FORMAT_VERSION = 1
SPLITS = ("train", "test")
NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TARBALL_NAME = "cifar-100-python.tar.gz"
TARBALL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
              "meta": "7973b15100ade9c7d40fb424638fde48"}  # the three files inside cifar-100-python/
CREATOR = "fastcifar"  # meta.json's "creator": this directory is a store fastcifar may replace
META_BYTES = 1 << 20  # a store's meta.json is ~5 KB (class names, checksums); a larger one is not one
# The official train pickle is 155 MB, test 31 MB, meta 1.5 KB. A member far bigger is not CIFAR
# (the wrong file, or a small gzip that inflates to gigabytes): refused before it is read.
MAX_MEMBER_BYTES = {"train": 512 << 20, "test": 512 << 20, "meta": 1 << 20}

# Synthetic images per split: 40x CIFAR-100's train split, 6 GB on disk; generated in chunks
# straight to disk, so memory stays flat at any size.
SYNTHETIC_MAX = 2_000_000

URL10 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TARBALL10_NAME = "cifar-10-python.tar.gz"
TARBALL10_MD5 = "c58f30108f718f92721af3b95e74349a"
MEMBER10_MD5 = {  # the seven files inside cifar-10-batches-py/ (each batch 31 MB, batches.meta 158 B)
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}

# What a store of each data set holds. `labels`: the pickles' label key; `names`: meta.json's (and
# the meta pickle's) class-name key; coarse: CIFAR-100's 20 superclasses, which CIFAR-10 lacks.
DATASETS = {
    "cifar100": {"title": "CIFAR-100", "classes": NUM_CLASSES, "labels": "fine_labels", "names": "fine_label_names",
                 "coarse": 20},
    "cifar10": {"title": "CIFAR-10", "classes": 10, "labels": "labels", "names": "label_names", "coarse": 0},
}
# The synthetic CIFAR-10's classes among the 100 synthetic ones: each differs from every other in
# shape, texture or colour (class id = shape * 20 + texture * 5 + colour)
SYNTHETIC10 = (0, 11, 22, 33, 44, 55, 66, 77, 88, 99)


def official(dataset: str) -> dict:
    """The official download of a data set: where, its checksums, and which members make each split."""
    if dataset == "cifar10":
        return {"url": URL10, "tarball": TARBALL10_NAME, "md5": TARBALL10_MD5, "folder": "cifar-10-batches-py",
                "members": MEMBER10_MD5, "meta": "batches.meta",
                "splits": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}}
    return {"url": URL, "tarball": TARBALL_NAME, "md5": TARBALL_MD5, "folder": "cifar-100-python",
            "members": MEMBER_MD5, "meta": "meta", "splits": {"train": ["train"], "test": ["test"]}}


def array_files(dataset: str = "cifar100") -> tuple[str, ...]:
    """The .npy files of a data set's store."""
    kinds = ("images", "labels", "coarse") if DATASETS[dataset]["coarse"] else ("images", "labels")
    return tuple(f"{split}_{kind}.npy" for split in SPLITS for kind in kinds)


def default_data_dir(dataset: str = "cifar100") -> Path:
    """A data set's store directory. CIFAR-100's is $FASTCIFAR_DATA, else ./data/cifar100; the others
    live beside it, named after the data set: ./data/cifar10, or cifar10 next to $FASTCIFAR_DATA."""
    # expanduser: a ~ no shell expanded (a Dockerfile's ENV, a .env file) would make a directory named ~
    cifar100 = Path(os.environ.get("FASTCIFAR_DATA") or "data/cifar100").expanduser()
    return cifar100 if dataset == "cifar100" else cifar100.parent / dataset


# ----------------------------------------------------------------------------------------------
# Opening a store


@dataclasses.dataclass(frozen=True)
class Store:
    """A prepared store: memory-mapped arrays (read-only) and its meta.json."""

    dir: Path
    meta: dict
    arrays: dict  # "train_images" -> np.memmap, ...

    def images(self, split: str) -> np.ndarray:
        return self.arrays[f"{split}_images"]

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[f"{split}_labels"]

    def coarse(self, split: str) -> np.ndarray | None:
        """CIFAR-100's coarse labels; None for CIFAR-10, which has none."""
        return self.arrays.get(f"{split}_coarse")

    @property
    def dataset(self) -> str:
        return self.meta["dataset"]  # cifar100 | cifar10

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic"))

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel (RGB) mean of the train images, in units of 0..1."""
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel (RGB) standard deviation of the train images, in units of 0..1."""
        return tuple(self.meta["std"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta[DATASETS[self.dataset]["names"]])

    @property
    def recorded_sha256(self) -> dict:
        """{array file: sha256} that prepare recorded in meta.json (what the store claims to hold)."""
        return self.meta["checksums"]["outputs_sha256"]

    def sha256(self) -> dict:
        """{array file: sha256} of the arrays as they are on disk now (reads every byte once)."""
        return {name: _digest(self.dir / name, "sha256") for name in array_files(self.dataset)}


def open_store(data_dir: str | os.PathLike | None = None, dataset: str | None = None) -> Store:
    """Open a prepared store read-only (memory-mapped), checking its meta.json, shapes and labels, after
    undoing what a killed prepare left. dataset: what it must hold (None: any; its default dir)."""
    d = Path(data_dir) if data_dir is not None else default_data_dir(dataset or "cifar100")
    title = DATASETS[dataset or "cifar100"]["title"]
    flag = f" --dataset {dataset}" if dataset not in (None, "cifar100") else ""
    _recover(_real(d))
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        if d.is_dir() and any(d.iterdir()):
            raise BadInput(f"{d} is not a prepared {title} store (it has no meta.json) and holds other files, "
                           f"which fastcifar never replaces. Point --data-dir (or $FASTCIFAR_DATA) at a new or empty "
                           f"directory and run `fastcifar prepare{flag} --data-dir DIR` there.")
        raise BadInput(f"No prepared {title} store at {d}. Run `fastcifar prepare{flag} --data-dir {d}` to download "
                       f"and convert the official data set, `fastcifar prepare{flag} --from PATH` for a tarball you "
                       f"have, or `fastcifar prepare{flag} --synthetic --data-dir {d}` on a machine without internet.")
    try:
        meta = jsonio.load(meta_path, META_BYTES)
    except BadInput as e:
        raise BadInput(f"The store at {d} has an unreadable meta.json ({str(e).rstrip('.')}); {_rebuild_hint(d)}")
    bad = _meta_problem(meta)
    if bad:
        raise BadInput(f"The store at {d} has a malformed meta.json ({bad}); {_rebuild_hint(d)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise BadInput(f"The store at {d} has format version {meta['format_version']}, but this fastcifar reads "
                       f"version {FORMAT_VERSION}; {_rebuild_hint(d)}")
    held = meta["dataset"]
    if dataset is not None and held != dataset:
        raise BadInput(f"The store at {d} holds {DATASETS[held]['title']}, but the run is for {title} "
                       f"(data.dataset = {dataset}). Point --data-dir at a {title} store (its default is "
                       f"{default_data_dir(dataset)}; `fastcifar prepare{flag}` makes one), or set data.dataset={held}.")
    spec = DATASETS[held]
    arrays = {}
    for name in array_files(held):
        try:
            arrays[name[:-4]] = _open_array(d / name)
        except (OSError, ValueError) as e:
            raise BadInput(f"The store at {d} is incomplete or damaged ({name}: {e}); {_rebuild_hint(d)}")
    for split in SPLITS:
        n = meta["counts"][split]
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        coarse = arrays.get(f"{split}_coarse", lab)  # CIFAR-10: no coarse labels, the labels checked twice
        if img.shape != (n, *IMAGE_SHAPE) or img.dtype != np.uint8 or lab.shape != (n,) or coarse.shape != (n,) \
                or lab.dtype != np.int64 or coarse.dtype != np.int64:
            raise BadInput(f"The store at {d} does not match its meta.json ({split}: images {img.shape} {img.dtype}, "
                           f"labels {lab.shape} {lab.dtype}, expected {n} images of 32x32x3 uint8 and int64 labels); "
                           f"{_rebuild_hint(d)}")
        # 8 bytes a label: reading them all costs well under a millisecond per 10000 images
        for what, x, hi in (("labels", lab, spec["classes"]), ("coarse labels", coarse, spec["coarse"] or spec["classes"])):
            lo_, hi_ = int(x.min()), int(x.max())
            if lo_ < 0 or hi_ >= hi:
                raise BadInput(f"The store at {d} holds {split} {what} from {lo_} to {hi_}, outside 0..{hi - 1}: it "
                               f"is damaged; {_rebuild_hint(d)}")
    return Store(dir=d, meta=meta, arrays=arrays)


def _open_array(path: Path) -> np.memmap:
    """A store's .npy memory-mapped read-only; ValueError unless its size is what its header describes."""
    with open(path, "rb") as f:
        version = npformat.read_magic(f)
        read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
        shape, _, dtype = read(f)
        want = f.tell() + math.prod(shape) * dtype.itemsize
        size = os.fstat(f.fileno()).st_size
    if size != want:
        raise ValueError(f"{size:,} bytes where its header describes {want:,}: "
                         + ("cut short" if size < want else "bytes added at its end"))
    return np.load(path, mmap_mode="r")


def _meta_problem(meta) -> str | None:
    """What is wrong with a store's meta.json (keys and types open_store and the pipelines rely on), or None."""
    if not isinstance(meta, dict):
        return f"it holds a {type(meta).__name__}, not an object"
    if "format_version" not in meta:
        return "no format_version"
    counts = meta.get("counts")
    if not (isinstance(counts, dict) and all(type(counts.get(s)) is int and counts[s] >= 1 for s in SPLITS)):
        return f"counts must give at least 1 image per split as integers, got {counts!r}"[:300]
    for key in ("mean", "std"):
        v = meta.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in v)):
            return f"{key} must be 3 numbers, got {v!r}"[:300]
    dataset = meta.get("dataset")
    if dataset not in DATASETS:
        return f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}"[:300]
    spec = DATASETS[dataset]
    names = [(spec["names"], spec["classes"])] + ([("coarse_label_names", spec["coarse"])] if spec["coarse"] else [])
    for key, count in names:
        v = meta.get(key)
        if not (isinstance(v, list) and len(v) == count and all(isinstance(x, str) for x in v)):
            return f"{key} must be {count} strings"
    if not isinstance(meta.get("source"), dict):
        return "source must be an object"
    sums = meta.get("checksums")
    if not (isinstance(sums, dict) and isinstance(sums.get("outputs_sha256"), dict)):
        return "checksums must be an object, its outputs_sha256 an object of file names and sha256s"
    return None


def _rebuild_hint(d: Path) -> str:
    """How to get a good store at d: prepare --force where prepare may replace it, else move it away."""
    try:
        check_replaceable(d)
        return f"rebuild it with `fastcifar prepare --force --data-dir {d}`."
    except BadInput:
        return (f"prepare cannot prove it wrote all of it (a copy, files of yours, or files changed since), so it will "
                f"not replace it: move {d} away (or point --data-dir elsewhere) and run `fastcifar prepare` again.")



# ----------------------------------------------------------------------------------------------
# What prepare may replace, and recovering from a killed prepare


def _real(d: Path) -> Path:
    """d with its links followed: a symlinked data dir keeps its link, its store goes beside the target."""
    return Path(os.path.realpath(d))


def _is_store(d: Path) -> bool:
    """Whether d's meta.json says it is a store ("creator": "fastcifar"); not if prepare may replace it."""
    try:
        meta = jsonio.load(d / "meta.json", META_BYTES)
    except BadInput:
        return False
    return isinstance(meta, dict) and meta.get("creator") == CREATOR


def check_outside_stores(out: Path, option: str = "--out") -> None:
    """BadInput when out is a store or lies inside one: a store holds only what prepare writes, and
    anything else there stops `prepare --force` from ever rebuilding it."""
    real = _real(Path(out))
    for d in (real, *real.parents):
        if _is_store(d):
            raise BadInput(f"{option} {out} is inside the data store {d}, which holds only what `fastcifar prepare` "
                           f"writes (files of yours there keep prepare from rebuilding it). Choose an {option} "
                           f"outside the store.")


def check_replaceable(dest: Path, source: Path | None = None, from_env: bool = False) -> None:
    """BadInput unless dest is missing, an empty directory, or a store prepare built there holding
    only the files it wrote (owned.py): prepare never replaces what fastcifar did not create."""
    real = _real(dest)
    where = f"{dest}" + (" (from $FASTCIFAR_DATA)" if from_env else "")
    if Path(os.path.abspath(dest)) != real:
        where += f", which is {real}"
    if source is not None:
        src = _real(Path(source))
        if src == real or real in src.parents:
            raise BadInput(f"The data dir {where} holds the --from source {source}: preparing there would replace "
                           f"the source. Choose a --data-dir outside it (the default is ./data/cifar100).")
    if real.is_symlink():  # realpath stops at a link it cannot follow: a loop
        raise BadInput(f"The data dir {where} is a symlink that cannot be followed (a loop); fix or remove the "
                       f"link, or choose another --data-dir.")
    if not real.exists():
        return
    if not real.is_dir():
        raise BadInput(f"The data dir {where} is a file, not a store; fastcifar never replaces what it did not "
                       f"create. Choose another --data-dir (or $FASTCIFAR_DATA), e.g. a new directory.")
    try:
        entries = sorted(os.listdir(real))
    except OSError as e:
        raise BadInput(f"Cannot read the data dir {where} ({e.strerror or e}); choose a readable --data-dir.")
    if not entries:
        return
    listed = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    if not owned.is_ours(real, "prepare") and _is_store(real):
        raise BadInput(f"The data dir {where} holds a store that `fastcifar prepare` did not build there (a copy, a "
                       f"restored backup); prepare would delete it, and fastcifar "
                       f"never replaces what it did not create. Move it away or delete it yourself, then run "
                       f"prepare again; or point --data-dir (or $FASTCIFAR_DATA) at a new or empty directory.")
    if not owned.is_ours(real, "prepare"):
        raise BadInput(f"The data dir {where} is a directory that is not a fastcifar store (it holds {listed}); "
                       f"prepare would delete it, and fastcifar never replaces what it did not create. Point "
                       f"--data-dir (or $FASTCIFAR_DATA) at a new or empty directory, e.g. {real / 'cifar100'}.")
    foreign = [e for e in entries if not owned.is_ours(real / e, "prepare")]
    if foreign:
        raise BadInput(f"The store at {where} also holds files fastcifar did not write there, or that changed since "
                       f"({', '.join(foreign[:5])}); replacing the store would delete them. Move them out of {real} "
                       f"and run prepare again.")


def _flock(fd: int, flags: int = fcntl.LOCK_EX) -> bool:
    """flock(fd, flags) (the kernel drops it when the holder dies, kill -9 included); False where it
    fails: held by a live process (LOCK_NB), or no locks on this file system (some network ones)."""
    try:
        fcntl.flock(fd, flags)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _dir_lock(d: Path, flags: int = fcntl.LOCK_EX):
    """Hold a lock on d (a directory, a .part file); yields False where it cannot (then delete nothing)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        yield _flock(fd, flags)
    finally:
        os.close(fd)


def _abandoned(path: Path) -> bool:
    """Whether no live process holds path's lock: a builder locks its temp dir (and a download its
    .part file) until it finishes, and dies holding it. Unsure means no."""
    with _dir_lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB) as free:
        return free


def _leftovers(real: Path) -> tuple[list[Path], list[Path]]:
    """(temp dirs, moved-aside old stores): the .NAME.tmp-*, .NAME.old-* beside real that prepare made."""
    found = {"tmp": [], "old": []}
    with contextlib.suppress(OSError), os.scandir(real.parent) as it:
        for e in it:
            for kind, paths in found.items():
                if e.name.startswith(f".{real.name}.{kind}-") and e.is_dir(follow_symlinks=False) and \
                        owned.is_ours(e.path, "prepare"):
                    paths.append(Path(e.path))
    return sorted(found["tmp"]), sorted(found["old"])


def _recover(real: Path, log=lambda *_: None) -> None:
    """Undo a killed prepare: put back the old store if the new one never went in, delete old stores
    already replaced and the temp dirs of builders that are no longer running."""
    tmps, olds = _leftovers(real)
    if not (tmps or olds):
        return
    with _dir_lock(real.parent) as held:
        if not held:
            return
        tmps, olds = _leftovers(real)  # again, under the lock: a swap may have finished meanwhile
        if olds and (not real.exists() or real.is_dir() and not any(real.iterdir())):
            old = next((o for o in olds if owned.is_ours(o / "meta.json", "prepare")), None)
            if old is not None:
                with contextlib.suppress(OSError):
                    os.replace(old, real)
                    olds.remove(old)
                    log(f"Put back the store at {real} that a killed prepare had moved aside.")
        if real.exists():  # olds are replaced stores, half-deleted ones included
            for old in olds:
                with contextlib.suppress(OSError):
                    owned.remove_tree(old, "prepare")
        for tmp in tmps:
            with contextlib.suppress(OSError):
                if _abandoned(tmp) and owned.remove_tree(tmp, "prepare"):
                    log(f"Deleted {tmp}, left by a prepare that was killed.")


# ----------------------------------------------------------------------------------------------
# Reading the official Python 2 pickles


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR pickle holds (dicts, lists, strings, arrays): crafted files run no code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        if module.startswith("numpy.core"):  # Python 2 / NumPy 1 name of the same module
            module = "numpy._core" + module[len("numpy.core"):] if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _str(x) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def _load_pickle(raw: bytes, what: str) -> dict:
    """A CIFAR pickle as a dict with str keys, whether written by Python 2 (bytes keys) or 3."""
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except MemoryError:
        raise  # not garbage: prepare says what ran out
    except Exception as e:  # pickle raises many types on garbage: report them all as bad input
        raise BadInput(f"{what} is not a readable CIFAR pickle ({why(e)}).")
    if not isinstance(obj, dict):
        raise BadInput(f"{what} holds a {type(obj).__name__}, but a CIFAR pickle holds a dict.")
    return {_str(k): v for k, v in obj.items()}


def _labels(d: dict, key: str, n: int, hi: int, what: str, title: str = "CIFAR-100") -> np.ndarray:
    if key not in d:
        raise BadInput(f"{what} has no '{key}' entry (it has: {', '.join(sorted(d))}); is it a {title} file?")
    try:
        lab = np.asarray(d[key])
    except (ValueError, TypeError) as e:  # ragged nesting, objects numpy cannot hold
        raise BadInput(f"{what}: '{key}' must be a flat list of integers ({e}).")
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise BadInput(f"{what}: '{key}' must be a flat list of integers, got shape {lab.shape} of {lab.dtype}.")
    if len(lab) != n:
        raise BadInput(f"{what}: '{key}' has {len(lab)} labels but 'data' has {n} images; they must match.")
    if n and (lab.min() < 0 or lab.max() >= hi):
        raise BadInput(f"{what}: '{key}' holds labels from {lab.min()} to {lab.max()}, outside 0..{hi - 1}.")
    return lab.astype(np.int64)


def _split_arrays(d: dict, what: str, dataset: str = "cifar100") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One split's (or CIFAR-10 batch's) dict, validated: (images HWC uint8, labels, coarse or None)."""
    spec = DATASETS[dataset]
    title = spec["title"]
    if "data" not in d:
        raise BadInput(f"{what} has no 'data' entry (it has: {', '.join(sorted(d))}); is it a {title} file?")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BadInput(f"{what}: 'data' must be a uint8 array of shape (N, 3072) (3 planes of 32x32), got {desc}.")
    n = data.shape[0]
    if n == 0:
        raise BadInput(f"{what} holds no images ('data' has 0 rows); a {title} split is never empty.")
    fine = _labels(d, spec["labels"], n, spec["classes"], what, title)
    coarse = _labels(d, "coarse_labels", n, spec["coarse"], what, title) if spec["coarse"] else None
    if "filenames" in d:
        names = d["filenames"]
        if not isinstance(names, (list, tuple)):
            raise BadInput(f"{what}: 'filenames' must be a list of names, got a {type(names).__name__}.")
        if len(names) != n:
            raise BadInput(f"{what}: 'filenames' has {len(names)} entries but 'data' has {n} images.")
    # (N, 3072) planar RGB -> (N, 32, 32, 3) HWC; ascontiguousarray makes the one copy.
    images = np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, fine, coarse


def _names(meta: dict, key: str, count: int, what: str, title: str = "CIFAR-100") -> list[str]:
    if key not in meta:
        raise BadInput(f"{what} has no '{key}' entry (it has: {', '.join(sorted(meta))}).")
    raw = meta[key]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(x, (str, bytes)) for x in raw):
        got = type(raw).__name__ if not isinstance(raw, (list, tuple)) else "a list holding non-strings"
        raise BadInput(f"{what}: '{key}' must be a list of {count} class names (strings), got {got}.")
    names = [_str(x) for x in raw]
    if len(names) != count:
        raise BadInput(f"{what}: '{key}' lists {len(names)} names, {title} has {count}.")
    return names


def _digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read 1 MiB at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_size(size: int, name: str, what: str, o: dict, title: str) -> None:
    """BadInput for a member far bigger than its kind's (train, test or meta), before it is read."""
    limit = MAX_MEMBER_BYTES[next((split for split, files in o["splits"].items() if name in files), "meta")]
    if size > limit:
        raise BadInput(f"{what} is {size / 2**20:,.0f} MiB, far more than {title}'s '{name}' file (at most "
                       f"{limit / 2**20:,.0f} MiB is accepted); it is not {title} data.")


def _read_members(source: Path, verify: bool, dataset: str = "cifar100") -> tuple[dict, dict]:
    """Raw bytes of every member from a tarball or an extracted directory, plus source info."""
    o, title = official(dataset), DATASETS[dataset]["title"]
    folder, expected = o["folder"], o["members"]
    if source.is_dir():
        d = source / folder if (source / folder).is_dir() else source
        raw, md5s = {}, {}
        for name in expected:
            p = d / name
            if not p.is_file():
                raise BadInput(f"{d} has no '{name}' file; a {title} directory holds {', '.join(expected)}.")
            _check_size(p.stat().st_size, name, str(p), o, title)
            raw[name] = p.read_bytes()
            md5s[name] = hashlib.md5(raw[name]).hexdigest()
            if verify and md5s[name] != expected[name]:
                raise BadInput(f"{p} has md5 {md5s[name]}, not the official {expected[name]}: it is damaged or not "
                               f"the official {title}. Pass --no-verify to accept other data in the same format.")
        return raw, {"kind": "directory", "path": str(d.resolve()), "md5": md5s}

    md5 = _digest(source)  # a file: _prepare checked it exists and is a file or a directory
    if verify and md5 != o["md5"]:
        raise BadInput(f"{source} has md5 {md5}, not the official {o['md5']}: the download is damaged or it is not "
                       f"the official {title} tarball. Download it again, or pass --no-verify to accept other data "
                       f"in the official format.")
    raw = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {}
            for m in tar:  # sizes checked at each header, before any member's data is read
                name = Path(m.name).name
                if m.isfile() and Path(m.name).parent.name == folder and name in expected:
                    _check_size(m.size, name, f"{source}: member {m.name}", o, title)
                    members[name] = m
            for name in expected:
                if name not in members:
                    raise BadInput(f"{source} has no member {folder}/{name}; it is not a complete {title} tarball.")
                raw[name] = tar.extractfile(members[name]).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise BadInput(f"{source} is truncated or not a valid tar.gz ({why(e)}); download it again.")
    return raw, {"kind": "tarball", "path": str(source.resolve()), "md5": {o["tarball"]: md5}}


def _read_official(source: Path, verify: bool, dataset: str = "cifar100") -> tuple[dict, dict, dict]:
    """(splits, names, source info), validated in full; a split of several members is their concatenation."""
    raw, info = _read_members(source, verify, dataset)
    o, spec = official(dataset), DATASETS[dataset]
    splits = {}
    for split in SPLITS:
        parts = []
        for name in o["splits"][split]:
            what = f"{source}: '{name}'"
            parts.append(_split_arrays(_load_pickle(raw.pop(name), what), what, dataset))  # no pickle dict kept
        splits[split] = parts[0] if len(parts) == 1 else tuple(
            None if arrays[0] is None else np.concatenate(arrays) for arrays in zip(*parts))
    what = f"{source}: '{o['meta']}'"
    meta = _load_pickle(raw.pop(o["meta"]), what)
    names = {spec["names"]: _names(meta, spec["names"], spec["classes"], what, spec["title"])}
    if spec["coarse"]:
        names["coarse_label_names"] = _names(meta, "coarse_label_names", spec["coarse"], what, spec["title"])
    info["verified"] = verify
    return splits, names, info


# ----------------------------------------------------------------------------------------------
# Download


def download(url: str, dest: Path, md5: str | None, progress: bool = True) -> Path:
    """Download url to dest (a progress bar, md5 checked); a failure leaves nothing, not its new folders."""
    from tqdm import tqdm

    made = make_dirs(dest.parent)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    # held until the download ends: a later prepare deletes the .part of a killed one
    _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    h = hashlib.md5()
    try:
        owned.record([tmp], "prepare", grows=True)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                      disable=None if progress else True) as bar:  # None: on a terminal only
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if md5 is not None and h.hexdigest() != md5:
            raise BadInput(f"The download from {url} has md5 {h.hexdigest()}, expected {md5}; try again later.")
        os.replace(tmp, dest)
        owned.record([tmp], "prepare")  # renamed away: struck off
    except OSError as e:  # URLError, timeouts, a full disk
        raise BadInput(f"Could not download {url} ({e}). On a machine without internet, copy the tarball here and "
                       f"run `fastcifar prepare --from {dest.name}`, or use `fastcifar prepare --synthetic`.")
    finally:
        if os.path.exists(tmp):  # made by mkstemp above, in this process
            with contextlib.suppress(OSError):
                owned.remove(tmp, "prepare")  # with its entry
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        remove_empty(made)  # none left empty once dest is there
    return dest


# ----------------------------------------------------------------------------------------------
# A synthetic, learnable CIFAR-100 stand-in

SYN_SHAPES = ("circle", "square", "triangle", "cross", "ring")
SYN_TEXTURES = ("solid", "hstriped", "vstriped", "checked")
SYN_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230),
               "yellow": (230, 210, 40), "purple": (170, 50, 200)}


def synthetic_chunks(n: int, seed: int, chunk: int = 4096, classes: tuple[int, ...] | None = None):
    """(labels, generator of n images `chunk` at a time): balanced, shuffled classes told apart by shape,
    texture and colour; a few hundred MB at any n. classes: each label's synthetic class (SYNTHETIC10)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % (NUM_CLASSES if classes is None else len(classes))).astype(np.int64)
    return labels, _synthetic_images(labels if classes is None else np.asarray(classes)[labels], rng, chunk)


def _synthetic_images(fine: np.ndarray, rng, chunk: int):
    palette = np.array(list(SYN_COLOURS.values()), np.float32)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    for lo in range(0, len(fine), chunk):
        c = fine[lo:lo + chunk]
        m = len(c)
        shape, texture, colour = c // 20, (c // 5) % 4, c % 5
        cx, cy = (rng.uniform(11, 21, (2, m, 1, 1))).astype(np.float32)
        r = rng.uniform(8, 12, (m, 1, 1)).astype(np.float32)
        dx, dy = xx - cx, yy - cy
        ax, ay, d = np.abs(dx), np.abs(dy), np.sqrt(dx * dx + dy * dy)
        masks = np.stack([
            d <= r,                                                        # circle
            np.maximum(ax, ay) <= 0.8 * r,                                 # square
            (dy <= 0.8 * r) & (dy >= -0.8 * r) & (ax <= 0.55 * (dy + 0.8 * r)),  # triangle
            ((ax <= 0.3 * r) & (ay <= r)) | ((ay <= 0.3 * r) & (ax <= r)),  # cross
            (d <= r) & (d >= 0.55 * r),                                    # ring
        ])[shape, np.arange(m)]
        px, py = (xx // 2) % 2, (yy // 2) % 2                              # 2-px stripes
        patterns = np.stack([np.ones_like(xx), py, px, (px + py) % 2])[texture]  # (m, 32, 32)
        fg = palette[colour][:, None, None, :] + rng.normal(0, 12, (m, 1, 1, 3))  # colour jitter
        fg = fg * (0.45 + 0.55 * patterns[..., None])
        bg = rng.uniform(60, 160, (m, 1, 1, 1)) + rng.normal(0, 15, (m, 1, 1, 3))  # greyish backdrop
        img = np.where(masks[..., None], fg, bg) + rng.normal(0, 10, (m, 32, 32, 3))
        yield np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing a store


def _channel_stats(path: Path, chunk: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (units of 0..1) of an (N, 32, 32, 3) uint8 .npy from exact histograms,
    read a chunk at a time (not memory-mapped: mapped pages would count as this process's memory)."""
    header = np.load(path, mmap_mode="r")
    n, offset = len(header), header.offset
    del header
    counts = np.zeros((3, 256), np.int64)  # counts[c, v]: pixels of channel c with value v
    with open(path, "rb") as f:
        f.seek(offset)
        for lo in range(0, n, chunk):
            x = np.frombuffer(f.read(min(chunk, n - lo) * 3072), np.uint8).reshape(-1, 3)
            for c in range(3):
                counts[c] += np.bincount(x[:, c], minlength=256)
    v = np.arange(256.0)
    pixels = max(n * 32 * 32, 1)
    mean = counts @ v / pixels
    std = np.sqrt(np.maximum(counts @ (v * v) / pixels - mean * mean, 0))
    return [round(float(m) / 255, 6) for m in mean], [round(float(s) / 255, 6) for s in std]


def _save_chunks(path: Path, shape: tuple, chunks, done=lambda n: None) -> None:
    """A uint8 .npy of `shape` (as np.save writes it) written a chunk at a time; done(rows) after each."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for block in chunks:
            f.write(block.tobytes())
            done(len(block))


def _write_store(dest: Path, fill, names: dict, source: dict, synthetic: bool, dataset: str = "cifar100") -> None:
    """Build the store in a temp sibling (fill(tmp) writes its arrays), swap it in (module docstring); the
    temp dir and its files are recorded as prepare's first: a later prepare can prove they are its own."""
    real = _real(dest)
    parent, tmp, lock_fd, made = real.parent, None, None, []
    files = [*array_files(dataset), "meta.json"]
    try:
        made = make_dirs(parent)
        with _dir_lock(parent):  # a cleaner holding this lock never sees our temp dir unlocked or unrecorded
            tmp = parent / f".{real.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
            tmp.mkdir()  # as readable as any directory (mkdtemp's would be 0700)
            lock_fd = os.open(tmp, os.O_RDONLY)
            _flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # without locks here: it stays, never deleted
            owned.record([tmp], "prepare")
        for name in files:  # fill writes into these same inodes (open "wb" truncates)
            (tmp / name).touch()
        owned.record([tmp / name for name in files], "prepare", grows=True)
    except OSError as e:
        if lock_fd is not None:
            os.close(lock_fd)
        if tmp is not None:
            with contextlib.suppress(OSError):  # else made a moment ago and still empty: no manifest was written
                owned.remove_tree(tmp, "prepare") or os.rmdir(tmp)
        remove_empty(made)
        raise BadInput(f"Cannot write the store to {dest} ({e.strerror or e}); choose a writable --data-dir.")
    old = None
    try:
        fill(tmp)
        outputs = {name: _digest(tmp / name, "sha256") for name in array_files(dataset)}
        mean, std = _channel_stats(tmp / "train_images.npy")
        meta = {
            "creator": CREATOR,
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "synthetic": synthetic,
            "source": source,
            "counts": {split: int(np.load(tmp / f"{split}_labels.npy", mmap_mode="r").shape[0]) for split in SPLITS},
            **names,
            "mean": mean,
            "std": std,
            "checksums": {"source_md5": source.get("md5", {}), "outputs_sha256": outputs},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        owned.record([tmp / name for name in files], "prepare")  # now as written: size and mtime too
        with _dir_lock(parent):  # one swap at a time, and no _recover in the middle of one
            check_replaceable(dest)  # again: something may have appeared there while we built
            if real.is_dir() and any(real.iterdir()):
                old = parent / f".{real.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
                os.replace(real, old)
            os.replace(tmp, real)  # onto a missing path or an empty directory: one atomic rename
    except OSError as e:
        raise BadInput(f"Cannot write the store to {dest} ({e.strerror or e}); choose a writable --data-dir "
                       f"(or free space).")
    finally:
        os.close(lock_fd)
        with contextlib.suppress(OSError):
            if tmp.exists():
                owned.remove_tree(tmp, "prepare")
        remove_empty(made)  # a build that failed or was interrupted leaves no empty parents behind
    if old is not None:
        # meta.json first: a half-deleted old store is never put back by _recover
        with contextlib.suppress(OSError):
            owned.remove(old / "meta.json", "prepare")
            owned.remove_tree(old, "prepare")


def _check_disk(real: Path, need: int) -> None:
    """BadInput now, not after minutes of work, when the file system holding real lacks `need` bytes."""
    d = real
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        return  # cannot tell: the write itself reports a full disk
    if need > free:
        raise BadInput(f"The store at {real} needs {_bytes(need)} but its file system has {_bytes(free)} free; "
                       f"free space, choose another --data-dir, or ask for fewer images.")


def _bytes(n: int) -> str:
    """A size as people read it: GB from 0.1 GB up, MB below (a small store's 15 MB is not '0.02 GB')."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _source_stat(source: Path, dataset: str = "cifar100") -> dict:
    """{file: [size, mtime_ns]} of a local source: identifies it without re-hashing a 161 MB tarball."""
    if source.is_file():
        files = [source]
    else:
        o = official(dataset)
        d = source / o["folder"] if (source / o["folder"]).is_dir() else source
        files = [d / name for name in o["members"] if (d / name).is_file()]
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def prepare(data_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
            synthetic: bool = False, n_train: int = 50000, n_test: int = 10000, seed: int = 0,
            verify: bool = True, force: bool = False, progress: bool = True, log=print,
            dataset: str = "cifar100") -> Path:
    """Build the `dataset` store at data_dir from the official download, a local source or a synthetic set."""
    dataset = dataset.lower() if isinstance(dataset, str) else dataset  # --dataset CIFAR10, as --format ONNX
    if dataset not in DATASETS:
        raise BadInput(f"--dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
    title = DATASETS[dataset]["title"]
    dest = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    if synthetic and not (1 <= n_train <= SYNTHETIC_MAX and 1 <= n_test <= SYNTHETIC_MAX):
        raise BadInput(f"--train and --test must be at least 1 and at most {SYNTHETIC_MAX:,} synthetic images "
                       f"(got {n_train:,} and {n_test:,}); {title} has 50,000 and 10,000.")
    if synthetic and seed < 0:  # numpy's generators take seeds of 0 and up (of any size)
        raise BadInput(f"--seed {seed}: a synthetic data seed is a whole number of 0 or more.")
    check_replaceable(dest, None if synthetic or source is None else Path(source),
                       from_env=data_dir is None and bool(os.environ.get("FASTCIFAR_DATA")))
    _recover(_real(dest), log)
    try:  # a complete, readable store there now (headers and labels read: fast)
        current = open_store(dest).meta
    except BadInput:
        current = None
    held = current["dataset"] if current else dataset
    if held != dataset and not force:
        raise BadInput(f"{dest} holds a {DATASETS[held]['title']} store; preparing {title} there would replace it. "
                       f"Prepare {title} in its own directory (without --data-dir: {default_data_dir(dataset)}), or "
                       f"pass --force to replace the {DATASETS[held]['title']} store.")
    existing = None if force else current
    try:
        return _prepare(dest, existing, source, synthetic, n_train, n_test, seed, verify, progress, log, dataset)
    except MemoryError:
        raise BadInput(f"Ran out of memory preparing {dest} from {source or 'the synthetic generator'}; "
                       f"{title} itself needs under 1 GB. The source is not {title} sized, or this "
                       f"machine needs more free memory.")


def _prepare(dest, existing, source, synthetic, n_train, n_test, seed, verify, progress, log, dataset) -> Path:
    spec, o = DATASETS[dataset], official(dataset)
    coarse = spec["coarse"] > 0
    if synthetic:
        info = {"kind": "synthetic", "train": n_train, "test": n_test, "seed": seed}
        if existing and existing["source"] == info:
            log(f"{dest}: complete synthetic store ({n_train} train / {n_test} test) already there; --force rebuilds it.")
            return dest
        _check_disk(_real(dest), (n_train + n_test) * (3072 + 16) + (1 << 20))  # images + 2 label arrays
        # fine 'red_solid_circle' (class = shape*20 + texture*5 + colour), coarse 'solid_circles'
        # (coarse = class // 5: the colour is what the fine label adds)
        fine_names = [f"{c}_{t}_{s}" for s in SYN_SHAPES for t in SYN_TEXTURES for c in SYN_COLOURS]
        coarse_names = [f"{t}_{s}s" for s in SYN_SHAPES for t in SYN_TEXTURES]
        classes = None if coarse else SYNTHETIC10
        log(f"Generating a synthetic {spec['title']} stand-in: {n_train} train / {n_test} test images (seed {seed}).")

        def fill(tmp: Path):
            from tqdm import tqdm

            for split, n, split_seed in (("train", n_train, seed), ("test", n_test, seed + 1)):
                labels, chunks = synthetic_chunks(n, split_seed, classes=classes)
                with tqdm(total=n, unit="img", desc=f"synthetic {split}",
                          disable=None if progress and n >= 100_000 else True) as bar:
                    _save_chunks(tmp / f"{split}_images.npy", (n, *IMAGE_SHAPE), chunks, bar.update)
                np.save(tmp / f"{split}_labels.npy", labels)
                if coarse:
                    np.save(tmp / f"{split}_coarse.npy", labels // 5)

        names = ({"fine_label_names": fine_names, "coarse_label_names": coarse_names} if coarse
                 else {spec["names"]: [fine_names[c] for c in SYNTHETIC10]})
        _write_store(dest, fill, names, info, synthetic=True, dataset=dataset)
        log(f"Wrote the synthetic store to {dest}.")
        return dest

    if source is None:  # the official download, cached beside the store
        if existing and existing["source"].get("md5", {}).get(o["tarball"]) == o["md5"]:
            log(f"{dest}: complete {spec['title']} store already there; --force rebuilds it.")
            return dest
        tarball = dest.parent / o["tarball"]
        _clean_downloads(tarball)
        if os.path.lexists(tarball) and not (tarball.is_file() and _digest(tarball) == o["md5"]):
            raise BadInput(f"{tarball} is in the way: it is not the official {spec['title']} tarball (its md5 differs), "
                           f"and fastcifar never replaces what it did not create. Move it away, or pass it with "
                           f"--from {tarball} --no-verify if it is {spec['title']} data in the official format.")
        if not tarball.is_file():
            log(f"Downloading {o['url']} to {tarball}.")
            download(o["url"], tarball, o["md5"], progress=progress)
        source, verify = tarball, True

    source = Path(source)
    if not source.exists():
        what = "is a link that leads nowhere (dangling, or a loop)" if os.path.lexists(source) else "does not exist"
        raise BadInput(f"{source} {what}; --from takes a {o['tarball']} or its extracted directory.")
    if not (source.is_file() or source.is_dir()):  # a FIFO or a device: reading it could block or never end
        raise BadInput(f"{source} is neither a file nor a directory (a FIFO, socket or device); --from takes a "
                       f"{o['tarball']} or its extracted directory.")
    stat = _source_stat(source, dataset)
    if existing:
        old = existing["source"]
        if (old.get("path"), old.get("stat"), old.get("verified")) == (str(source.resolve()), stat, verify):
            log(f"{dest}: complete store from {source} already there; --force rebuilds it.")
            return dest

    log(f"Reading {source}{'' if verify else ' (checksums not verified)'}.")
    splits, names, info = _read_official(source, verify, dataset)
    info["stat"] = stat

    def fill(tmp: Path):
        for split in SPLITS:
            for kind, arr in zip(("images", "labels", "coarse"), splits[split]):
                if arr is not None:
                    np.save(tmp / f"{split}_{kind}.npy", arr)

    _write_store(dest, fill, names, info, synthetic=False, dataset=dataset)
    log(f"Wrote {' / '.join(f'{len(splits[s][1])} {s}' for s in SPLITS)} images to {dest}.")
    return dest


def _clean_downloads(tarball: Path) -> None:
    """Delete the .part files of killed downloads (no live process holds their lock) recorded as prepare's."""
    with contextlib.suppress(OSError), os.scandir(tarball.parent) as it:
        for e in it:
            if e.name.startswith(tarball.name + ".") and e.name.endswith(".part") and e.is_file(follow_symlinks=False) \
                    and _abandoned(Path(e.path)):
                owned.remove(e.path, "prepare")
