"""The CIFAR-100 store: `prepare` turns the official pickles (or a synthetic set) into
memory-mapped uint8 arrays once; `open_store` hands them to the pipelines.

Store layout (FORMAT_VERSION 1), in one directory:
    train_images.npy  uint8 (N, 32, 32, 3), HWC, C-contiguous: row i of the pickle's `data`
                      reshaped to (3, 32, 32) and transposed, so pixel-exact with the source
    train_labels.npy  int64 (N,) fine labels 0..99, in the source's order
    train_coarse.npy  int64 (N,) coarse labels 0..19
    test_*.npy        the same for the test split
    meta.json         class names, counts, source, checksums, train mean/std, format version
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from fastcifar import BadInput

FORMAT_VERSION = 1
SPLITS = ("train", "test")
NUM_CLASSES = 100
NUM_COARSE = 20
IMAGE_SHAPE = (32, 32, 3)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TARBALL_NAME = "cifar-100-python.tar.gz"
TARBALL_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_MD5 = {  # the three files inside cifar-100-python/
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
ARRAY_FILES = tuple(f"{split}_{kind}.npy" for split in SPLITS for kind in ("images", "labels", "coarse"))


def default_data_dir() -> Path:
    """The store directory: $FASTCIFAR_DATA, else ./data/cifar100."""
    return Path(os.environ.get("FASTCIFAR_DATA") or "data/cifar100")


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

    def coarse(self, split: str) -> np.ndarray:
        return self.arrays[f"{split}_coarse"]

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
        return list(self.meta["fine_label_names"])


def open_store(data_dir: str | os.PathLike | None = None) -> Store:
    """Open a prepared store read-only (memory-mapped), checking its format version and shapes."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise BadInput(
            f"No prepared CIFAR-100 store at {d}. Run `fastcifar prepare --data-dir {d}` to download "
            f"and convert the official data set, `fastcifar prepare --from PATH` for a tarball you "
            f"already have, or `fastcifar prepare --synthetic --data-dir {d}` on a machine without internet."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"The store's {meta_path} cannot be read ({e}); rebuild it with `fastcifar prepare --force`.")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BadInput(
            f"The store at {d} has format version {version}, but this fastcifar reads version "
            f"{FORMAT_VERSION}; rebuild it with `fastcifar prepare --force --data-dir {d}`."
        )
    arrays = {}
    for name in ARRAY_FILES:
        try:
            arrays[name[:-4]] = np.load(d / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise BadInput(f"The store at {d} is incomplete or damaged ({name}: {e}); rebuild it with `fastcifar prepare --force`.")
    for split in SPLITS:
        n = meta["counts"][split]
        img, lab, coarse = arrays[f"{split}_images"], arrays[f"{split}_labels"], arrays[f"{split}_coarse"]
        if img.shape != (n, *IMAGE_SHAPE) or img.dtype != np.uint8 or lab.shape != (n,) or coarse.shape != (n,) \
                or lab.dtype != np.int64 or coarse.dtype != np.int64:
            raise BadInput(
                f"The store at {d} does not match its meta.json ({split}: images {img.shape} {img.dtype}, "
                f"labels {lab.shape} {lab.dtype}, expected {n} images of 32x32x3 uint8 and int64 labels); "
                f"rebuild it with `fastcifar prepare --force`."
            )
    return Store(dir=d, meta=meta, arrays=arrays)


def _store_is_complete(d: Path) -> dict | None:
    """meta.json of a complete, readable store at d, else None. Reads headers only (fast)."""
    try:
        return open_store(d).meta
    except (BadInput, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------
# Reading the official Python 2 pickles


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR pickle holds (dicts, lists, strings, numpy arrays), so a
    crafted file cannot run code."""

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
    except Exception as e:  # pickle raises many types on garbage: report them all as bad input
        raise BadInput(f"{what} is not a readable CIFAR pickle ({type(e).__name__}: {e}).")
    if not isinstance(obj, dict):
        raise BadInput(f"{what} holds a {type(obj).__name__}, but a CIFAR pickle holds a dict.")
    return {_str(k): v for k, v in obj.items()}


def _labels(d: dict, key: str, n: int, hi: int, what: str) -> np.ndarray:
    try:
        lab = np.asarray(d[key])
    except KeyError:
        raise BadInput(f"{what} has no '{key}' entry (it has: {', '.join(sorted(d))}); is it a CIFAR-100 file?")
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise BadInput(f"{what}: '{key}' must be a flat list of integers, got shape {lab.shape} of {lab.dtype}.")
    if len(lab) != n:
        raise BadInput(f"{what}: '{key}' has {len(lab)} labels but 'data' has {n} images; they must match.")
    if n and (lab.min() < 0 or lab.max() >= hi):
        raise BadInput(f"{what}: '{key}' holds labels from {lab.min()} to {lab.max()}, outside 0..{hi - 1}.")
    return lab.astype(np.int64)


def _split_arrays(d: dict, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one split's dict and return (images HWC uint8, fine int64, coarse int64)."""
    if "data" not in d:
        raise BadInput(f"{what} has no 'data' entry (it has: {', '.join(sorted(d))}); is it a CIFAR-100 file?")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BadInput(f"{what}: 'data' must be a uint8 array of shape (N, 3072) (3 planes of 32x32), got {desc}.")
    n = data.shape[0]
    fine = _labels(d, "fine_labels", n, NUM_CLASSES, what)
    coarse = _labels(d, "coarse_labels", n, NUM_COARSE, what)
    if "filenames" in d and len(d["filenames"]) != n:
        raise BadInput(f"{what}: 'filenames' has {len(d['filenames'])} entries but 'data' has {n} images.")
    # (N, 3072) planar RGB -> (N, 32, 32, 3) HWC; ascontiguousarray makes the one copy.
    images = np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, fine, coarse


def _names(meta: dict, key: str, count: int, what: str) -> list[str]:
    if key not in meta:
        raise BadInput(f"{what} has no '{key}' entry (it has: {', '.join(sorted(meta))}).")
    names = [_str(x) for x in meta[key]]
    if len(names) != count:
        raise BadInput(f"{what}: '{key}' lists {len(names)} names, CIFAR-100 has {count}.")
    return names


def _digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read 1 MiB at a time."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_members(source: Path, verify: bool) -> tuple[dict, dict]:
    """Raw bytes of train/test/meta from a tarball or an extracted directory, plus source info."""
    if source.is_dir():
        d = source / "cifar-100-python" if (source / "cifar-100-python").is_dir() else source
        raw, md5s = {}, {}
        for name in MEMBER_MD5:
            p = d / name
            if not p.is_file():
                raise BadInput(f"{d} has no '{name}' file; a CIFAR-100 directory holds train, test and meta.")
            raw[name] = p.read_bytes()
            md5s[name] = hashlib.md5(raw[name]).hexdigest()
            if verify and md5s[name] != MEMBER_MD5[name]:
                raise BadInput(
                    f"{p} has md5 {md5s[name]}, not the official {MEMBER_MD5[name]}: it is damaged or "
                    f"not the official CIFAR-100. Pass --no-verify to accept other data in the same format."
                )
        return raw, {"kind": "directory", "path": str(d.resolve()), "md5": md5s}

    if not source.is_file():
        raise BadInput(f"{source} does not exist; --from takes a cifar-100-python.tar.gz or its extracted directory.")
    md5 = _digest(source)
    if verify and md5 != TARBALL_MD5:
        raise BadInput(
            f"{source} has md5 {md5}, not the official {TARBALL_MD5}: the download is damaged or it is "
            f"not the official CIFAR-100 tarball. Delete it and download again, or pass --no-verify to "
            f"accept other data in the official format."
        )
    raw = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parent.name == "cifar-100-python"}
            for name in MEMBER_MD5:
                if name not in members:
                    raise BadInput(f"{source} has no member cifar-100-python/{name}; it is not a complete CIFAR-100 tarball.")
                raw[name] = tar.extractfile(members[name]).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise BadInput(f"{source} is truncated or not a valid tar.gz ({type(e).__name__}: {e}); download it again.")
    return raw, {"kind": "tarball", "path": str(source.resolve()), "md5": {TARBALL_NAME: md5}}


def _read_official(source: Path, verify: bool) -> tuple[dict, dict, dict]:
    """(splits, names, source info) from official-format data, validated in full."""
    raw, info = _read_members(source, verify)
    splits = {}
    for split in SPLITS:
        d = _load_pickle(raw.pop(split), f"{source}: '{split}'")
        splits[split] = _split_arrays(d, f"{source}: '{split}'")
        del d
    meta = _load_pickle(raw.pop("meta"), f"{source}: 'meta'")
    names = {
        "fine_label_names": _names(meta, "fine_label_names", NUM_CLASSES, f"{source}: 'meta'"),
        "coarse_label_names": _names(meta, "coarse_label_names", NUM_COARSE, f"{source}: 'meta'"),
    }
    info["verified"] = verify
    return splits, names, info


# ----------------------------------------------------------------------------------------------
# Download


def download(url: str, dest: Path, md5: str | None, progress: bool = True) -> Path:
    """Download url to dest with a progress bar, verifying md5; a failure leaves nothing behind."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", disable=not progress) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if md5 is not None and h.hexdigest() != md5:
            raise BadInput(f"The download from {url} has md5 {h.hexdigest()}, expected {md5}; try again later.")
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts, a full disk
        raise BadInput(
            f"Could not download {url} ({e}). On a machine without internet, copy the tarball here and run "
            f"`fastcifar prepare --from cifar-100-python.tar.gz`, or use `fastcifar prepare --synthetic`."
        )
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


# ----------------------------------------------------------------------------------------------
# A synthetic, learnable CIFAR-100 stand-in

SYN_SHAPES = ("circle", "square", "triangle", "cross", "ring")
SYN_TEXTURES = ("solid", "hstriped", "vstriped", "checked")
SYN_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 230),
               "yellow": (230, 210, 40), "purple": (170, 50, 200)}


def synthetic_class_names() -> tuple[list[str], list[str]]:
    """Fine names 'red_solid_circle' (class = shape*20 + texture*5 + colour) and coarse names
    'solid_circles' (coarse = class // 5: the colour is what the fine label adds)."""
    fine = [f"{c}_{t}_{s}" for s in SYN_SHAPES for t in SYN_TEXTURES for c in SYN_COLOURS]
    coarse = [f"{t}_{s}s" for s in SYN_SHAPES for t in SYN_TEXTURES]
    return fine, coarse


def synthetic_split(n: int, seed: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images whose class is told apart by shape, texture and colour, drawn at a random position
    and size over a random background with pixel noise. Classes are balanced and shuffled."""
    rng = np.random.default_rng(seed)
    fine = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    palette = np.array(list(SYN_COLOURS.values()), np.float32)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    for lo in range(0, n, chunk):
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
        images[lo:lo + m] = np.clip(img, 0, 255).astype(np.uint8)
    return images, fine, fine // 5


# ----------------------------------------------------------------------------------------------
# Writing a store


def _channel_stats(images: np.ndarray, chunk: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in units of 0..1, in chunks to keep memory flat."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    for lo in range(0, len(images), chunk):
        x = images[lo:lo + chunk].reshape(-1, 3).astype(np.float64)
        s += x.sum(0)
        s2 += (x * x).sum(0)
    n = max(len(images) * 32 * 32, 1)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean * mean, 0))
    return [round(float(v) / 255, 6) for v in mean], [round(float(v) / 255, 6) for v in std]


def _write_store(dest: Path, splits: dict, names: dict, source: dict, synthetic: bool) -> None:
    """Build the store in a temporary sibling directory, then swap it in with renames, so dest is
    either the old complete store or the new complete one, never a half-written one."""
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a store is as readable as any directory
    except OSError as e:
        raise BadInput(f"Cannot write the store to {dest} ({e.strerror or e}); choose a writable --data-dir.")
    try:
        outputs = {}
        for split in SPLITS:
            for kind, arr in zip(("images", "labels", "coarse"), splits[split]):
                name = f"{split}_{kind}.npy"
                np.save(tmp / name, arr)
                outputs[name] = _digest(tmp / name, "sha256")
        mean, std = _channel_stats(splits["train"][0])
        meta = {
            "format_version": FORMAT_VERSION,
            "synthetic": synthetic,
            "source": source,
            "counts": {split: int(len(splits[split][1])) for split in SPLITS},
            **names,
            "mean": mean,
            "std": std,
            "checksums": {"source_md5": source.get("md5", {}), "outputs_sha256": outputs},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        old = None
        if dest.exists():
            old = parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise BadInput(f"Cannot write the store to {dest} ({e.strerror or e}); choose a writable --data-dir.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source_stat(source: Path) -> dict:
    """{file: [size, mtime_ns]} of a local source: what identifies it for the idempotence check
    without re-hashing a 161 MB tarball."""
    if source.is_file():
        files = [source]
    else:
        d = source / "cifar-100-python" if (source / "cifar-100-python").is_dir() else source
        files = [d / name for name in MEMBER_MD5 if (d / name).is_file()]
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def prepare(data_dir: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
            synthetic: bool = False, n_train: int = 50000, n_test: int = 10000, seed: int = 0,
            verify: bool = True, force: bool = False, progress: bool = True, log=print) -> Path:
    """Build the store at data_dir from the official download (default), a local source, or a
    synthetic set. Returns the store directory. Raises BadInput on bad input."""
    dest = Path(data_dir) if data_dir is not None else default_data_dir()
    existing = None if force else _store_is_complete(dest)

    if synthetic:
        if n_train < 1 or n_test < 1:
            raise BadInput(f"--train and --test must be at least 1 (got {n_train} and {n_test}).")
        info = {"kind": "synthetic", "train": n_train, "test": n_test, "seed": seed}
        if existing and existing["source"] == info:
            log(f"{dest}: complete synthetic store ({n_train} train / {n_test} test) already there; --force rebuilds it.")
            return dest
        fine_names, coarse_names = synthetic_class_names()
        log(f"Generating a synthetic CIFAR-100 stand-in: {n_train} train / {n_test} test images (seed {seed}).")
        splits = {"train": synthetic_split(n_train, seed), "test": synthetic_split(n_test, seed + 1)}
        names = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
        _write_store(dest, splits, names, info, synthetic=True)
        log(f"Wrote the synthetic store to {dest}.")
        return dest

    if source is None:  # the official download, cached beside the store
        if existing and existing["source"].get("md5", {}).get(TARBALL_NAME) == TARBALL_MD5:
            log(f"{dest}: complete CIFAR-100 store already there; --force rebuilds it.")
            return dest
        tarball = dest.parent / TARBALL_NAME
        if not (tarball.is_file() and _digest(tarball) == TARBALL_MD5):
            log(f"Downloading {URL} to {tarball}.")
            download(URL, tarball, TARBALL_MD5, progress=progress)
        source, verify = tarball, True

    source = Path(source)
    if not source.exists():
        raise BadInput(f"{source} does not exist; --from takes a cifar-100-python.tar.gz or its extracted directory.")
    stat = _source_stat(source)
    if existing:
        old = existing["source"]
        if (old.get("path"), old.get("stat"), old.get("verified")) == (str(source.resolve()), stat, verify):
            log(f"{dest}: complete store from {source} already there; --force rebuilds it.")
            return dest

    log(f"Reading {source}{'' if verify else ' (checksums not verified)'}.")
    splits, names, info = _read_official(source, verify)
    info["stat"] = stat
    _write_store(dest, splits, names, info, synthetic=False)
    log(f"Wrote {_counts(splits)} to {dest}.")
    return dest


def _counts(splits: dict) -> str:
    return " / ".join(f"{len(splits[s][1])} {s}" for s in SPLITS) + " images"
