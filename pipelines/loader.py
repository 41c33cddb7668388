"""One loader interface over the backends (the contract the train loop relies on; the reference,
with an example, is docs/pipelines.md "The loader"):

    loader = make_loader(store, "train", spec, batch_size=250, backend="auto", device="cuda:0",
                         seed=0, shard=(rank, world))
    loader.set_epoch(epoch)              # order and augmentation draws are a function of (seed, epoch)
    for images, labels in loader: ...    # NCHW channels_last spec.dtype, int64 (N,); on device

Beyond that page: iterating twice without set_epoch repeats the same epoch (as DistributedSampler
does); set_epoch(epoch, start_batch=k) gives the same images and draws as the uninterrupted epoch
on torch and DALI, but only the same order on the tutorial path (its draws depend on its workers);
loader.batches(epoch) gives the row indices of each batch of that epoch (for checks and tests).
"""

from __future__ import annotations

import numpy as np
import torch

from fastcifar.errors import BadInput, shown
from fastcifar.pipelines.spec import AugSpec, mean_std

BACKENDS = ("auto", "dali", "torch", "tutorial")
SPLITS = ("train", "test")


def dali_available() -> bool:
    """Whether DALI imports here (then backend="auto" picks it)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def epoch_rows(rows: np.ndarray, seed: int, epoch: int, shuffle: bool, shard: tuple[int, int],
               train: bool) -> np.ndarray:
    """This shard's rows for one epoch, in order. The permutation depends on (seed, epoch) only,
    so every rank cuts the same one: training shards take equal disjoint blocks (the n % world
    left over sit out that epoch), evaluation shards split all rows, sizes differing by at most 1."""
    rank, world = shard
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(rows) if shuffle else rows
    if train:
        per = len(order) // world
        return order[rank * per:(rank + 1) * per]
    return np.array_split(order, world)[rank]


class Loader:
    """An epoch-aware iterable of (images, labels) batches on the training device."""

    def __init__(self, impl, rows, batch_size, seed, shard, shuffle, drop_last, train, multi):
        self.impl, self.rows, self.batch_size, self.seed, self.shard = impl, rows, batch_size, seed, shard
        self.backend = impl.name  # what runs: dali-gpu, dali-cpu, torch or tutorial
        self.shuffle, self.drop_last, self.train, self.multi = shuffle, drop_last, train, multi
        self.epoch, self.start_batch = 0, 0
        n = len(epoch_rows(rows, seed, 0, False, shard, train))  # same length every epoch
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        self.num_samples = self.num_batches * batch_size if drop_last else n

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Choose the epoch the next iteration yields, from batch `start_batch` on (a mid-epoch
        resume: the batches are the very ones the uninterrupted epoch had there)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Row indices (into the split) of each batch of an epoch, as the loader yields them."""
        e = self.epoch if epoch is None else epoch
        rows = epoch_rows(self.rows, self.seed, e, self.shuffle, self.shard, self.train)
        bs = self.batch_size
        return [rows[i * bs:(i + 1) * bs] for i in range(self.num_batches)]

    def __len__(self) -> int:  # batches per full epoch, whatever start_batch is
        return self.num_batches

    def __iter__(self):
        todo = list(enumerate(self.batches()))[self.start_batch:]
        for images, labels in self.impl.epoch(todo, self.epoch):
            yield (images if self.multi else images[0]), labels


def make_loader(store, split: str, spec: AugSpec, batch_size: int, backend: str = "auto", device="cpu",
                seed: int = 0, shard: tuple[int, int] = (0, 1), shuffle: bool | None = None,
                drop_last: bool | None = None, augment: bool | None = None, indices=None,
                sizes: tuple[int, ...] | None = None) -> Loader:
    """A loader of `split` from the store: see the module docstring for the contract."""
    if split not in SPLITS:
        raise BadInput(f"split {shown(split)} is not one of {', '.join(SPLITS)}.")
    if backend not in BACKENDS:
        raise BadInput(f"backend {shown(backend)} is not one of {', '.join(BACKENDS)}.")
    spec.validate()
    train = split == "train" if augment is None else bool(augment)
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    if drop_last and not train:
        raise BadInput("An evaluation loader (augment=False) yields every image exactly once; it cannot drop_last.")
    rank, world = shard
    if not (world >= 1 and 0 <= rank < world):
        raise BadInput(f"shard={shown(shard)}: needs (rank, world) with world >= 1 and 0 <= rank < world.")
    if batch_size < 1:
        raise BadInput(f"batch_size = {batch_size}: must be at least 1.")
    n = len(store.labels(split))
    rows = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n or len(np.unique(rows)) != len(rows)):
        raise BadInput(f"indices must be distinct rows of the {split} split, within 0..{n - 1}.")
    if not drop_last:  # a batch never outgrows the shard (the same batches either way), so a huge batch_size
        batch_size = min(batch_size, max(1, -(-len(rows) // world)))  # pads no giant batch, sizes no giant DALI buffer
    multi = sizes is not None
    sizes = tuple(int(s) for s in sizes) if multi else (spec.image_size,)
    if not sizes or min(sizes) < 8:
        raise BadInput(f"sizes={shown(sizes)}: give one or more output sides of at least 8 px.")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the current GPU, by its number
        device = torch.device("cuda", torch.cuda.current_device())
    mean, std = mean_std(spec, store)

    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    elif backend == "dali" and not dali_available():
        raise BadInput("backend 'dali' needs NVIDIA DALI, which does not import here (pip install "
                       "nvidia-dali-cuda120, Linux only); use backend 'torch', or 'auto' to take DALI where it is.")
    kw = dict(spec=spec, sizes=sizes, device=device, augment=train, seed=seed, rank=rank, mean=mean, std=std)
    if backend == "torch":
        from fastcifar.pipelines.torch_backend import TorchBackend
        impl = TorchBackend(store, split, **kw)
    elif backend == "dali":
        from fastcifar.pipelines.dali import DaliBackend
        impl = DaliBackend(store, split, batch_size=batch_size, **kw)
    else:
        from fastcifar.pipelines.tutorial import TutorialBackend
        impl = TutorialBackend(store, split, **kw)
    loader = Loader(impl, rows, batch_size, seed, shard, shuffle, drop_last, train, multi)
    if train and loader.num_batches == 0:
        raise BadInput(f"A training batch of {batch_size} images is larger than this shard's {len(rows) // world} "
                       f"images, so a training epoch would have no batch; lower data.batch_size or set "
                       f"data.drop_last=false (from Python: make_loader(..., drop_last=False)).")
    return loader
