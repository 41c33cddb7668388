"""The DALI backend: a `@pipeline_def` graph for training and one for evaluation.

Index batches are read from the memmap on the host and enter through `fn.external_source` (batch
mode) with their labels and the batch's augmentation draws (pipelines.draw). Every image op after
it runs on the GPU when a device is given (`.gpu()`), and the very same graph runs in DALI's CPU
mode (`device_id=None`) when there is none. DALI's own random ops are not used: the draws are a
function of (seed, epoch, rank, batch), so the same seed gives the same batches and a resumed run
is exact. Per-image ops run only on the images that drew them (DALI conditionals split the batch).

This module imports DALI at the top; pipelines.loader imports it only for backend="dali".
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines.draw import SIDE, batch_rng, draw, may, mean_grey
from pipelines.spec import AugSpec

_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _finish(x, sizes, spec: AugSpec, mean, std):
    """uint8 HWC at 32 -> one normalised float HWC output per size.

    Normalised at 32, then resized as floats: one pass over the 224 output instead of two
    (a uint8 resize, then a float conversion at 224); measured 1.8x faster on a CPU. Resizing is
    linear, so the order changes nothing but the uint8 rounding at 224 (which this avoids).
    Cubic overshoots at edges, so it resizes uint8 (clamped to 0..255) before normalising.
    Always float32: DALI's resize has no float16 output and no bfloat16 at all; torch casts after."""
    # HWC out: seen from torch as NCHW it is channels_last, with no transpose anywhere
    norm = lambda t: fn.crop_mirror_normalize(t, mean=[255 * m for m in mean], std=[255 * s for s in std],
                                              output_layout="HWC", dtype=types.FLOAT)
    resize = lambda t, size: t if size == SIDE else fn.resize(
        t, size=[size, size], interp_type=_INTERP[spec.interpolation], antialias=size < SIDE)
    if spec.interpolation == "cubic":
        return [norm(resize(x, size)) for size in sizes]
    x = norm(x)
    return [resize(x, size) for size in sizes]


def _pixel_moves(x, shift, flip, spec: AugSpec):
    """Pad-and-crop by whole pixels (a zero-padded slice), then the flips."""
    if spec.pad_crop:
        x = fn.slice(x, start=shift, shape=[SIDE, SIDE], axis_names="HW", out_of_bounds_policy="pad", fill_values=0)
    if may(spec, "hflip") or may(spec, "vflip"):
        x = fn.flip(x, horizontal=flip[0], vertical=flip[1])
    return x


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, spec: AugSpec, sizes, mean, std, gpu: bool):
    """Training graph: geometry (one affine warp), colour (one 3x4 matrix), erasing, resize, normalise."""
    images, labels, warp, affine, shift, flip, jitter, colour, offset, erase, anchor, shape = fn.external_source(
        source=source, num_outputs=12, batch=True, layout=["HWC"] + [""] * 11)
    x = images.gpu() if gpu else images
    # Per image: each op runs only on the images whose draw asked for it (the batch is split and
    # merged by DALI). Shift-scale-rotate or a resized crop needs the general warp (the whole
    # geometry in one map); the rest move by whole pixels: a zero-padded slice and a flip, 3-6x
    # cheaper than warp_affine on a CPU.
    if may(spec, "shift_scale_rotate") or spec.rrc_scale is not None:
        if warp:
            x = fn.warp_affine(x, matrix=affine, fill_value=0, interp_type=types.INTERP_LINEAR)
        else:
            x = _pixel_moves(x, shift, flip, spec)
    else:
        x = _pixel_moves(x, shift, flip, spec)
    if may(spec, "color_jitter") and jitter:
        x = fn.coord_transform(x, M=colour, T=offset, dtype=types.UINT8)  # rounds and clamps
    if may(spec, "coarse_dropout") and erase:
        x = fn.erase(x, anchor=anchor, shape=shape, axis_names="HW", fill_value=spec.erase_fill)
    return (*_finish(x, sizes, spec, mean, std), labels.gpu() if gpu else labels)


@pipeline_def
def eval_pipeline(source, spec: AugSpec, sizes, mean, std, gpu: bool):
    """Evaluation graph: resize and normalise only."""
    images, labels = fn.external_source(source=source, num_outputs=2, batch=True, layout=["HWC", ""])
    x = images.gpu() if gpu else images
    return (*_finish(x, sizes, spec, mean, std), labels.gpu() if gpu else labels)


class _Feed:
    """external_source's callable: the current epoch's inputs. A separate object, so the pipeline
    does not point back at its backend: no reference cycle, so a dropped loader frees its
    pipeline (and threads) at once, not in some later GC pass - possibly in a forked worker,
    where DALI's shutdown aborts."""

    def __init__(self):
        self.inputs = iter(())

    def __call__(self):
        return next(self.inputs)  # StopIteration here ends DALI's epoch


class DaliBackend:
    """Batches of a split through the DALI graph (GPU, or CPU mode without one)."""

    def __init__(self, store, split, spec: AugSpec, sizes, device, augment: bool, seed: int, rank: int,
                 mean, std, batch_size: int):
        self.spec, self.sizes, self.device, self.seed, self.rank = spec, sizes, device, seed, rank
        self.augment, self.mean, self.std, self.batch_size = augment and spec.augments, mean, std, batch_size
        self.images, self.labels = store.images(split), store.labels(split)  # memmaps: read per batch
        self.gpu = device.type == "cuda"
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        self.pipe, self.feed, self._clean = None, _Feed(), False

    def _build(self):
        graph = train_pipeline if self.augment else eval_pipeline
        threads = min(4, len(os.sched_getaffinity(0))) if self.gpu else len(os.sched_getaffinity(0))
        self.pipe = graph(self.feed, self.spec, self.sizes, self.mean, self.std, self.gpu,
                          batch_size=self.batch_size, num_threads=threads, prefetch_queue_depth=2,
                          device_id=self.device.index if self.gpu else None, seed=self.seed)
        with warnings.catch_warnings():  # outputs of the source that this spec's graph never reads
            warnings.filterwarnings("ignore", message="The external source node")
            self.pipe.build()

    def _inputs(self, batches, epoch):
        """What external_source gets per batch: images, labels and (training) the draws."""
        for b, idx in batches:
            x, y = np.take(self.images, idx, axis=0), np.take(self.labels, idx)
            if not self.augment:
                yield x, y
                continue
            p = draw(self.spec, len(idx), batch_rng(self.seed, epoch, self.rank, b))
            offset = np.zeros((len(idx), 3), np.float32)
            if p["jitter"].any():  # contrast pivots on the stored image's mean grey, as in the torch backend
                j = p["jitter"]
                offset[j] = (p["colour_k"][j] * mean_grey(x[j]))[:, None]
            holes = p["holes"].astype(np.float32)
            yield tuple(np.ascontiguousarray(a) for a in (
                x, y, p["warp"], p["affine"], p["shift"], p["flip"], p["jitter"], p["colour"], offset, p["erase"],
                holes[..., :2].reshape(len(idx), -1), holes[..., 2:].reshape(len(idx), -1)))

    def _torch(self, tl, dtype):
        """A DALI output batch as a torch tensor on the loader's device (zero-copy on the CPU)."""
        if not self.gpu:
            return torch.from_dlpack(tl.as_tensor())
        from nvidia.dali.plugin.pytorch import feed_ndarray
        out = torch.empty((len(tl), *tl.shape()[0]), dtype=dtype, device=self.device)
        feed_ndarray(tl, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def epoch(self, batches, epoch: int):
        if self.pipe is None or not self._clean:  # new, or the last epoch was left half-way: rebuild
            self._build()
        self.feed.inputs, self._clean = self._inputs(batches, epoch), False
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        while True:
            try:
                outs = self.pipe.run(stream) if self.gpu else self.pipe.run()
            except StopIteration:
                self.pipe.reset()
                self._clean = True
                return
            images = tuple(self._torch(t, torch.float32).permute(0, 3, 1, 2) for t in outs[:-1])  # NCHW view
            if self.spec.dtype != "float32":  # keeps channels_last
                images = tuple(t.to(_TORCH[self.spec.dtype]) for t in images)
            yield images, self._torch(outs[-1], torch.int64)
