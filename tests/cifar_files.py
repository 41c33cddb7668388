"""Small CIFAR-100 and CIFAR-10 data in the official formats, written the way Python 2's cPickle wrote it."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


class Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: every str/bytes as a BINSTRING (Python 2's `str`) and
    NumPy's reconstructor under its Python 2 name `numpy.core.multiarray`. Python 3 reads such
    files only with `encoding="bytes"` (bytes keys) or `encoding="latin1"` (str keys)."""

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf).dump(obj)
    return buf.getvalue()


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def make_split(n: int, seed: int, style: str = "py2", dataset: str = "cifar100") -> dict:
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if style == "py2" else (lambda k: k)
    if dataset == "cifar10":  # a batch: labels 0..9, no coarse labels
        return {
            key("batch_label"): key(f"training batch {seed} of 5"),
            key("labels"): [int(v) for v in rng.integers(0, 10, n)],
            key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key("filenames"): [key(f"img_{seed}_{i}.png") for i in range(n)],
        }
    return {
        key("filenames"): [key(f"img_{seed}_{i}.png") for i in range(n)],
        key("batch_label"): key(f"batch {seed}"),
        key("fine_labels"): [int(v) for v in rng.integers(0, 100, n)],
        key("coarse_labels"): [int(v) for v in rng.integers(0, 20, n)],
        key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def make_meta(style: str = "py2", dataset: str = "cifar100") -> dict:
    key = (lambda k: k.encode()) if style == "py2" else (lambda k: k)
    if dataset == "cifar10":
        return {key("num_cases_per_batch"): 10000, key("num_vis"): 3072,
                key("label_names"): [key(f"class{i}") for i in range(10)]}
    return {key("fine_label_names"): [key(f"fine{i}") for i in range(100)],
            key("coarse_label_names"): [key(f"coarse{i}") for i in range(20)]}


def write_official(root: Path, n_train: int = 300, n_test: int = 100, style: str = "py2",
                   members: dict | None = None, tar: bool = True, dataset: str = "cifar100") -> tuple[Path, dict]:
    """Write cifar-100-python/{train,test,meta} (dataset cifar10: cifar-10-batches-py/{data_batch_1..5,
    test_batch,batches.meta}, n_train split over the five batches) and a .tar.gz of it when tar, under
    root. `members` replaces a member's object (or its raw bytes; None leaves it out) to make bad input.
    Returns (tarball or directory, {name: object pickled}) ."""
    if dataset == "cifar10":
        objs = {name: make_split(n_train // 5, i + 1, style, dataset) for i, name in enumerate(CIFAR10_TRAIN)}
        objs.update({"test_batch": make_split(n_test, 6, style, dataset), "batches.meta": make_meta(style, dataset)})
        folder, tarball = "cifar-10-batches-py", root / "cifar-10-python.tar.gz"
    else:
        objs = {"train": make_split(n_train, 1, style), "test": make_split(n_test, 2, style), "meta": make_meta(style)}
        folder, tarball = "cifar-100-python", root / "cifar-100-python.tar.gz"
    objs.update(members or {})
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in objs.items():
        if obj is None:
            continue
        raw = obj if isinstance(obj, bytes) else py2_dumps(obj) if style == "py2" else pickle.dumps(obj, 4)
        (d / name).write_bytes(raw)
    if not tar:
        return d, objs
    with tarfile.open(tarball, "w:gz", compresslevel=1) as t:
        t.add(d, arcname=folder)
    return tarball, objs


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def expected_images(split: dict) -> np.ndarray:
    data = split[b"data"] if b"data" in split else split["data"]
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def field(split: dict, name: str):
    """A split's entry whatever the pickle style (bytes keys from Python 2, str keys from 3)."""
    return split[name.encode()] if name.encode() in split else split[name]
