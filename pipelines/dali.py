"""The DALI backend: a `@pipeline_def` graph for training and one for evaluation.

Index batches are taken from the split (read into RAM once) on the host and enter through `fn.external_source` (batch
mode) with their labels and the batch's augmentation draws (pipelines.draw): only the inputs this
spec's graph reads (`graph_inputs`). Every image op after it runs on the GPU when a device is given
(`.gpu()`), and the very same graph runs in DALI's CPU mode (`device_id=None`) when there is none.
DALI's own random ops are not used: the draws are a function of (seed, epoch, rank, batch), so the
same seed gives the same batches and a resumed run is exact. Per-image ops run only on the images
that drew them (DALI conditionals split the batch; a branch no image takes runs on an empty batch).
The policies' colour ops (TrivialAugment, RandAugment) are DALI 2.x ops on CPU and GPU alike:
arithmetic expressions (which move their CPU inputs to the GPU themselves), `fn.reductions`,
`fn.coord_transform`, `fn.filter` and `fn.equalize`; the statistics they need (mean grey, channel
min/max, histograms) are computed where the images are.

Outputs reach torch through one conversion, `to_torch`, on the CPU and the GPU alike, so CI runs
the code the GPU runs. CI also defines the GPU graph (without building it, which needs CUDA) and
checks its placement: every image op on the GPU with a GPU kernel in this DALI, the CPU keeping the
source and the draws (tests/test_pipelines_dali.py). What only a GPU executes:

| line                                          | what it does                                         |
|-----------------------------------------------|------------------------------------------------------|
| `images.gpu()`, `labels.gpu()` (both graphs)  | move the batch to the GPU after the external source  |
| `device_id=self.device.index`                 | the pipeline's GPU                                   |
| `stream = torch.cuda.current_stream(...)`     | handed to `run`: outputs ordered on torch's stream   |
| `threads = min(4, ...)`                       | fewer CPU threads: on a GPU they only feed the source |

It relies on DALI 2.x (checked when the backend is made: `check_dali`, then `exec_dynamic` at
build): `run(cuda_stream)`, and the dynamic executor, whose outputs DALI never writes again once
returned (so torch may keep them without a copy, as DALI's own PyTorch plugin does since 1.44).

This module imports DALI at the top; pipelines.loader imports it only for backend="dali".
"""

from __future__ import annotations

import os

import numpy as np
import torch
import nvidia.dali
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from fastcifar import BadInput
from pipelines.draw import COLOUR_STEPS, LUMA, SIDE, batch_rng, draw, may, mean_grey
from pipelines.spec import AugSpec

_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_DALI = 2  # major version: run(cuda_stream) and the dynamic executor's outputs that are never reused
POLICY_INPUTS = ("op", "lin", "lin_c", "sharp", "thresh", "bits")  # per policy step k: op0, lin0, ...
SHARPEN = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # torchvision's sharpness blur
INNER = np.pad(np.ones((SIDE - 2, SIDE - 2, 1), np.float32), ((1, 1), (1, 1), (0, 0)))  # sharpness keeps the border


def check_dali() -> str:
    """DALI's version, or BadInput when it is older than what this backend relies on."""
    version = nvidia.dali.__version__
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_DALI:
        raise BadInput(f"backend 'dali' needs NVIDIA DALI >= {MIN_DALI}.0 (its dynamic executor hands each batch "
                       f"to torch without a copy, ordered on torch's CUDA stream), but DALI {version} is installed. "
                       f"Upgrade it (pip install --upgrade 'nvidia-dali-cuda120>={MIN_DALI}.0', or "
                       f"nvidia-dali-cuda130 for CUDA 13), or use --set data.backend=torch.")
    return version


def to_torch(batch) -> torch.Tensor:
    """One DALI output batch (a TensorList, CPU or GPU) as a torch tensor on its memory, no copy.

    `as_tensor()` views the batch as one dense [N, ...] tensor (a TensorList's `shape()` is one
    shape per image, which no torch tensor has). `torch.from_dlpack` hands DALI torch's current
    CUDA stream, and DALI makes that stream wait for the batch if needed (on the CPU: nothing)."""
    return torch.from_dlpack(batch.as_tensor())


def graph_inputs(spec: AugSpec, augment: bool) -> tuple[str, ...]:
    """The external source's outputs that the graph for this spec reads, in order."""
    if not augment:
        return ("images", "labels")
    names = ["images", "labels"]
    if may(spec, "shift_scale_rotate") or spec.rrc_scale is not None or spec.policy != "none":
        names += ["warp", "affine"]  # which images need the general warp, and its maps
    if spec.pad_crop:
        names.append("shift")
    if may(spec, "hflip") or may(spec, "vflip"):
        names.append("flip")
    for k in range(spec.policy_steps):
        names += [f"{a}{k}" for a in POLICY_INPUTS]
    if may(spec, "color_jitter"):
        names += ["jitter", "colour", "offset"]
    if may(spec, "coarse_dropout"):
        names += ["erase", "anchor", "shape"]
    return tuple(names)


def _source(source, names):
    """The external source node's outputs by name."""
    outs = fn.external_source(source=source, num_outputs=len(names), batch=True,
                              layout=["HWC" if n == "images" else "" for n in names])
    return dict(zip(names, outs))


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


def _pixel_moves(x, inp, spec: AugSpec):
    """Pad-and-crop by whole pixels (a zero-padded slice), then the flips."""
    if "shift" in inp:
        x = fn.slice(x, start=inp["shift"], shape=[SIDE, SIDE], axis_names="HW", out_of_bounds_policy="pad",
                     fill_values=0)
    if "flip" in inp:
        x = fn.flip(x, horizontal=inp["flip"][0], vertical=inp["flip"][1])
    return x


# ---- the policies' colour ops, as pipelines.torch_backend computes them

def _round_u8(y):
    """Float pixels to uint8, ties up: DALI's cast rounds ties away from zero on the CPU and to even
    on the GPU, so the policy ops round before casting (the cast then only clamps)."""
    return fn.cast(dmath.floor(y + 0.5), dtype=types.UINT8)


def _linear(x, m, c):
    """out = M @ rgb + c * the image's mean grey: brightness, colour (saturation) and contrast."""
    grey = fn.reductions.mean(fn.coord_transform(x, M=LUMA.tolist(), dtype=types.FLOAT))  # one value per image
    return _round_u8(fn.coord_transform(x, M=m, dtype=types.FLOAT) + c * grey)


def _sharpen(x, w):
    """Each inner pixel blended with its rounded 3x3 blur (weight w on the blur); the border kept."""
    xf = fn.cast(x, dtype=types.FLOAT)
    return _round_u8(xf + w * types.Constant(INNER) * (fn.filter(x, SHARPEN) - xf))


def _point(x, thresh, bits):
    """Solarize (x ^ 255 = 255 - x on the pixels >= thresh), then posterize (x & bits)."""
    return (x ^ (fn.cast(x >= thresh, dtype=types.UINT8) * types.Constant(255, dtype=types.UINT8))) & bits


def _autocontrast(x):
    """Each channel's min..max stretched to 0..255; a one-value channel stays as it is."""
    lo = fn.reductions.min(x, axes=[0, 1], keep_dims=True)
    span = fn.cast(fn.reductions.max(x, axes=[0, 1], keep_dims=True) - lo, dtype=types.FLOAT)
    flat = fn.cast(span == 0, dtype=types.FLOAT)
    scale = (1 - flat) * 255 / (span + flat) + flat  # 255 / span, or 1
    return _round_u8((x - lo * (1 - flat)) * scale)


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, spec: AugSpec, sizes, mean, std, gpu: bool):
    """Training graph: geometry (one affine warp), colour (one 3x4 matrix), erasing, resize, normalise."""
    inp = _source(source, graph_inputs(spec, True))
    x = inp["images"].gpu() if gpu else inp["images"]
    # Per image: each op runs only on the images whose draw asked for it (the batch is split and
    # merged by DALI). First the policy's colour ops, step by step in the order drawn, on the
    # stored image (its geometry joins the warp below; pipelines.torch_backend.augment says why).
    for k in range(spec.policy_steps):
        op = inp[f"op{k}"]
        if op == COLOUR_STEPS.index("linear"):
            x = _linear(x, inp[f"lin{k}"], inp[f"lin_c{k}"])
        if op == COLOUR_STEPS.index("sharpness"):
            x = _sharpen(x, inp[f"sharp{k}"])
        if op == COLOUR_STEPS.index("point"):
            x = _point(x, inp[f"thresh{k}"], inp[f"bits{k}"])
        if op == COLOUR_STEPS.index("autocontrast"):
            x = _autocontrast(x)
        if op == COLOUR_STEPS.index("equalize"):
            x = fn.equalize(x)  # OpenCV's equalizeHist per channel
    # Then geometry. Shift-scale-rotate or a resized crop needs the general warp (the whole
    # geometry in one map); the rest move by whole pixels: a zero-padded slice and a flip, 3-6x
    # cheaper than warp_affine on a CPU.
    if "warp" in inp:
        if inp["warp"]:
            x = fn.warp_affine(x, matrix=inp["affine"], fill_value=0, interp_type=types.INTERP_LINEAR)
        else:
            x = _pixel_moves(x, inp, spec)
    else:
        x = _pixel_moves(x, inp, spec)
    if "jitter" in inp:
        if inp["jitter"]:
            x = fn.coord_transform(x, M=inp["colour"], T=inp["offset"], dtype=types.UINT8)  # rounds and clamps
    if "erase" in inp:
        if inp["erase"]:
            x = fn.erase(x, anchor=inp["anchor"], shape=inp["shape"], axis_names="HW", fill_value=spec.erase_fill)
    labels = inp["labels"]
    return (*_finish(x, sizes, spec, mean, std), labels.gpu() if gpu else labels)


@pipeline_def
def eval_pipeline(source, spec: AugSpec, sizes, mean, std, gpu: bool):
    """Evaluation graph: resize and normalise only."""
    inp = _source(source, graph_inputs(spec, False))
    x = inp["images"].gpu() if gpu else inp["images"]
    labels = inp["labels"]
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
        check_dali()
        self.spec, self.sizes, self.device, self.seed, self.rank = spec, sizes, device, seed, rank
        self.augment, self.mean, self.std, self.batch_size = augment and spec.augments, mean, std, batch_size
        self.names = graph_inputs(spec, self.augment)
        # read into RAM once, as the torch backend does: a store file cut short or rewritten in place
        # while the run reads a memmap would kill the process (SIGBUS) mid-epoch, unsaved
        self.images, self.labels = np.array(store.images(split)), np.array(store.labels(split))
        self.gpu = device.type == "cuda"
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        self.pipe, self.feed, self._clean = None, _Feed(), False

    def _build(self):
        graph = train_pipeline if self.augment else eval_pipeline
        threads = min(4, len(os.sched_getaffinity(0))) if self.gpu else len(os.sched_getaffinity(0))
        self.pipe = graph(self.feed, self.spec, self.sizes, self.mean, self.std, self.gpu,
                          batch_size=self.batch_size, num_threads=threads, prefetch_queue_depth=2,
                          device_id=self.device.index if self.gpu else None, seed=self.seed, exec_dynamic=True)
        if not self.pipe.exec_dynamic:  # to_torch keeps DALI's buffers: only the dynamic executor never reuses them
            raise RuntimeError(f"DALI {nvidia.dali.__version__} did not take the dynamic executor for this pipeline.")
        self.pipe.build()

    def _inputs(self, batches, epoch):
        """What external_source gets per batch: the arrays named by graph_inputs, in that order."""
        for b, idx in batches:
            a = {"images": np.take(self.images, idx, axis=0), "labels": np.take(self.labels, idx)}
            if self.augment:
                n = len(idx)
                p = draw(self.spec, n, batch_rng(self.seed, epoch, self.rank, b))
                a.update({name: p[name] for name in self.names if name in p})
                if "offset" in self.names:  # contrast pivots on the stored image's mean grey, as in the torch backend
                    a["offset"] = np.zeros((n, 3), np.float32)
                    j = p["jitter"]
                    if j.any():
                        a["offset"][j] = (p["colour_k"][j] * mean_grey(a["images"][j]))[:, None]
                if "anchor" in self.names:
                    holes = p["holes"].astype(np.float32)
                    a["anchor"], a["shape"] = holes[..., :2].reshape(n, -1), holes[..., 2:].reshape(n, -1)
            yield tuple(np.ascontiguousarray(a[name]) for name in self.names)

    def epoch(self, batches, epoch: int):
        if self.pipe is None or not self._clean:  # new, or the last epoch was left half-way: rebuild
            self._build()
        self.feed.inputs, self._clean = self._inputs(batches, epoch), False
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        while True:
            try:
                outs = self.pipe.run(stream)  # None on the CPU: host-synchronous
            except StopIteration:
                self.pipe.reset()
                self._clean = True
                return
            images = tuple(to_torch(t).permute(0, 3, 1, 2) for t in outs[:-1])  # NHWC memory seen as NCHW
            if self.spec.dtype != "float32":  # keeps channels_last
                images = tuple(t.to(_TORCH[self.spec.dtype]) for t in images)
            yield images, to_torch(outs[-1])
