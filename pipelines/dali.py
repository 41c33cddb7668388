"""The DALI backend: one `@pipeline_def` graph, for training (augmenting) and for evaluation.

Index batches of the split (read into RAM once) enter through `fn.external_source` with their
labels and the batch's draws (pipelines.draw), only those this spec's graph reads (`graph_inputs`),
made AHEAD batches early by a thread (`Ahead`) so the training thread, on which DALI calls the
source, does not wait. Every image op runs on the GPU (`.gpu()`), or in DALI's CPU mode
(`device_id=None`) where there is none: the same graph. DALI's own random ops are not used, so the
same seed gives the same batches and a resume is exact; per-image ops run only on the images that
drew them (DALI conditionals).

Outputs reach torch through one conversion, `to_torch` (a DLPack view, copied where needed), and
DALI's outputs are held until the copies have run (`_release`): CI runs the code the GPU runs, and
checks the GPU graph's placement without building it (tests/test_pipelines_dali.py). What only a
GPU executes:

| line                                          | what it does                                          |
|-----------------------------------------------|-------------------------------------------------------|
| `images.gpu()`, `labels.gpu()`                | move the batch to the GPU after the external source   |
| `device_id=self.device.index`                 | the pipeline's GPU                                    |
| `stream = torch.cuda.current_stream(...)`     | handed to `run`: outputs ordered on torch's stream    |
| `self.copy = self.gpu`                        | float32 batches copied into torch's memory            |
| `stream.record_event()`                       | marks the copies on torch's stream; DALI's outputs are held until it has passed |
| `threads = min(4, ...)`                       | fewer CPU threads: on a GPU they only feed the source |
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading

import numpy as np
import torch
import nvidia.dali
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from fastcifar.errors import BadInput
from fastcifar.pipelines.draw import COLOUR_STEPS, LUMA, SIDE, batch_rng, draw, may, mean_grey
from fastcifar.pipelines.spec import AugSpec
from fastcifar.pipelines.torch_backend import TORCH_DTYPES

_INTERP = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}
MIN_DALI = 2  # major version: run(cuda_stream) and the dynamic executor's outputs that are never reused
POLICY_INPUTS = ("op", "lin", "lin_c", "sharp", "thresh", "bits")  # per policy step k: op0, lin0, ...
SHARPEN = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # torchvision's sharpness blur
INNER = np.pad(np.ones((SIDE - 2, SIDE - 2, 1), np.float32), ((1, 1), (1, 1), (0, 0)))  # sharpness keeps the border
AHEAD = 2  # batches whose host inputs (index reads, draws) a thread makes ahead of the one DALI takes
HELD = 3  # output batches DALI's memory may be held for, before the oldest waits for torch's stream


def check_dali() -> None:
    """BadInput when DALI is older than what this backend relies on."""
    version = nvidia.dali.__version__
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_DALI:  # a local build's "custom-build" is not new enough
        raise BadInput(f"backend 'dali' needs NVIDIA DALI >= {MIN_DALI}.0, but DALI {version} is installed. Upgrade "
                       f"it (pip install --upgrade 'nvidia-dali-cuda120>={MIN_DALI}.0', or nvidia-dali-cuda130 for "
                       f"CUDA 13), or use --set data.backend=torch.")


def to_torch(batch) -> torch.Tensor:
    """One DALI output batch (a TensorList, CPU or GPU) as a dense torch tensor on its memory, no
    copy; from_dlpack makes torch's current CUDA stream wait for the batch."""
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


def _finish(x, sizes, spec: AugSpec, mean, std):
    """uint8 HWC at 32 -> one normalised float32 HWC output per size (DALI's resize has no fp16/bf16 output;
    torch casts after). Normalised at 32, then resized as floats: one pass over the 224 output, not two, 1.8x
    faster on a CPU, equal but for uint8 rounding (resizing is linear). Cubic overshoots at edges (a 0/255
    step upscaled reaches -0.12 .. 1.18), so it resizes uint8 (rounded, clamped) before normalising."""
    # HWC out: seen from torch as NCHW it is channels_last, with no transpose anywhere
    norm = lambda t: fn.crop_mirror_normalize(t, mean=[255 * m for m in mean], std=[255 * s for s in std],
                                              output_layout="HWC", dtype=types.FLOAT)
    resize = lambda t, size: t if size == SIDE else fn.resize(
        t, size=[size, size], interp_type=_INTERP[spec.interpolation], antialias=size < SIDE)
    if spec.interpolation == "cubic":
        return [norm(resize(x, size)) for size in sizes]
    x = norm(x)
    return [resize(x, size) for size in sizes]


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


# COLOUR_STEPS code -> (graph op, the per-step inputs it takes), as torch_backend.POLICY_COLOUR;
# fn.equalize is OpenCV's equalizeHist per channel
POLICY_COLOUR = {"linear": (_linear, ("lin", "lin_c")), "sharpness": (_sharpen, ("sharp",)),
                 "point": (_point, ("thresh", "bits")), "autocontrast": (_autocontrast, ()),
                 "equalize": (fn.equalize, ())}


@pipeline_def(enable_conditionals=True)
def graph(source, spec: AugSpec, augment: bool, sizes, mean, std, gpu: bool):
    """Augmenting: geometry (one affine warp), colour (one 3x4 matrix), erasing; then resize, normalise."""
    names = graph_inputs(spec, augment)
    inp = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                             layout=["HWC" if n == "images" else "" for n in names])))
    x = inp["images"].gpu() if gpu else inp["images"]
    # Per image: each op runs only on the images whose draw asked for it (the batch is split and
    # merged by DALI). First the policy's colour ops, step by step in the order drawn, on the
    # stored image (its geometry joins the warp below; pipelines.torch_backend.augment says why).
    for k in range(spec.policy_steps if augment else 0):
        for name, (op, args) in POLICY_COLOUR.items():
            if inp[f"op{k}"] == COLOUR_STEPS.index(name):
                x = op(x, *[inp[f"{a}{k}"] for a in args])
    # Then geometry. Shift-scale-rotate or a resized crop needs the general warp (the whole
    # geometry in one map); the rest move by whole pixels: a zero-padded slice and a flip, 3-6x
    # cheaper than warp_affine on a CPU. A graph without an op's input has no branch for it (None
    # is a Python condition; a DataNode, DALI's).
    if inp.get("warp"):
        x = fn.warp_affine(x, matrix=inp["affine"], fill_value=0, interp_type=types.INTERP_LINEAR)
    else:  # pad-and-crop by whole pixels (a zero-padded slice), then the flips
        if "shift" in inp:
            x = fn.slice(x, start=inp["shift"], shape=[SIDE, SIDE], axis_names="HW", out_of_bounds_policy="pad",
                         fill_values=0)
        if "flip" in inp:
            x = fn.flip(x, horizontal=inp["flip"][0], vertical=inp["flip"][1])
    if inp.get("jitter"):
        x = fn.coord_transform(x, M=inp["colour"], T=inp["offset"], dtype=types.UINT8)  # rounds and clamps
    if inp.get("erase"):
        x = fn.erase(x, anchor=inp["anchor"], shape=inp["shape"], axis_names="HW", fill_value=spec.erase_fill)
    labels = inp["labels"]
    return (*_finish(x, sizes, spec, mean, std), labels.gpu() if gpu else labels)


class _Feed:
    """external_source's callable: the epoch's inputs. Not the backend: with no reference cycle a dropped
    loader frees its pipeline at once, not in a GC pass in a forked worker, where DALI's shutdown aborts."""

    def __init__(self):
        self.inputs = iter(())

    def __call__(self):
        return next(self.inputs)  # StopIteration here ends DALI's epoch


class Ahead:
    """An iterator's items made `depth` ahead in a daemon thread, in order: the next batches' host side
    (~1 ms of a CPU core per batch of 250: bench's dali-host rows) runs during the step. next() raises
    the thread's error; close() (epoch end, break, exception, Ctrl-C) stops and joins the thread."""

    def __init__(self, items, depth: int, name: str = "fastcifar-dali-inputs"):
        self._queue, self._stop = queue.Queue(depth), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _run(self, items):
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._queue.put((item, None))
            self._queue.put((None, StopIteration()))
        except BaseException as e:  # noqa: BLE001 - raised on the consumer's side
            self._queue.put((None, e))

    def __next__(self):
        item, error = self._queue.get()
        if error is not None:
            raise error
        return item

    def close(self):
        """Stop making items and join the thread (emptying the queue frees the put it may be in)."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()


def _release(held: collections.deque) -> None:
    """Drop DALI's outputs of the batches before the newest whose copies torch's stream has run;
    past HELD batches, wait for the oldest (a host more than HELD batches ahead of the GPU)."""
    while len(held) > 1 and (held[0][1] is None or held[0][1].query()):
        held.popleft()
    while len(held) > HELD:
        held.popleft()[1].synchronize()


class DaliBackend:
    """Batches of a split through the DALI graph (GPU, or CPU mode without one)."""

    def __init__(self, store, split, *, spec: AugSpec, sizes, device, augment: bool, seed: int, rank: int, mean, std,
                 batch_size: int):
        check_dali()
        self.spec, self.sizes, self.device, self.seed, self.rank = spec, sizes, device, seed, rank
        self.augment, self.mean, self.std, self.batch_size = augment and spec.augments, mean, std, batch_size
        self.names = graph_inputs(spec, self.augment)
        # read into RAM once, as the torch backend does: a store file cut short or rewritten in place
        # while the run reads a memmap would kill the process (SIGBUS) mid-epoch, unsaved
        self.images, self.labels = np.array(store.images(split)), np.array(store.labels(split))
        self.gpu = device.type == "cuda"
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        # DALI's output lifetime. On a GPU the step's kernels read a batch after it is handed over, and
        # nothing orders DALI's reuse of its buffers with torch's stream: each batch is copied into
        # torch's memory on that stream (150 MB at 224 px, batch 250: 0.1 ms at an H100's 3 TB/s; a
        # bf16/fp16 cast is that copy), DALI's outputs held until it has run (_release). On the CPU a
        # read ends before its call returns, so a batch stays in DALI's memory (never reused by the
        # dynamic executor): there the copy would cost as much as DALI's own work at 224 px.
        self.copy = self.gpu  # GPU only: DALI's outputs copied into torch's memory
        self.held = collections.deque()  # (DALI's outputs, event after their copies), oldest first
        self.pipe, self.feed, self._clean = None, _Feed(), False

    def _build(self):
        threads = min(4, len(os.sched_getaffinity(0))) if self.gpu else len(os.sched_getaffinity(0))
        self.pipe = graph(self.feed, self.spec, self.augment, self.sizes, self.mean, self.std, self.gpu,
                          batch_size=self.batch_size, num_threads=threads, prefetch_queue_depth=2,
                          device_id=self.device.index if self.gpu else None, seed=self.seed, exec_dynamic=True)
        if not self.pipe.exec_dynamic:  # a CPU batch stays in DALI's memory: only the dynamic executor never reuses it
            raise RuntimeError(f"DALI {nvidia.dali.__version__} did not take the dynamic executor for this pipeline.")
        self.pipe.build()

    def inputs(self, batches, epoch):
        """What external_source gets per batch: the arrays named by graph_inputs, in that order (the
        host side: index reads and draws; `fastcifar bench` times it as backend dali-host)."""
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
        self._clean = False
        dtype = TORCH_DTYPES[self.spec.dtype]
        self.feed.inputs = ahead = Ahead(self.inputs(batches, epoch), AHEAD)
        try:
            while True:
                stream = torch.cuda.current_stream(self.device) if self.gpu else None
                try:
                    outs = self.pipe.run(stream)  # None on the CPU: host-synchronous
                except StopIteration:
                    self.pipe.reset()
                    self._clean = True
                    return
                # in torch's memory when copy is set or the dtype changes (the cast is the copy)
                images = tuple(to_torch(t).to(dtype, copy=self.copy).permute(0, 3, 1, 2) for t in outs[:-1])  # NCHW
                labels = to_torch(outs[-1]).to(torch.int64, copy=self.copy)
                # with an event after the copies on torch's stream (GPU only; None on the CPU: done)
                self.held.append((outs, None if stream is None else stream.record_event()))
                _release(self.held)  # the batches before this one, once their copies have run
                yield images, labels
        finally:
            ahead.close()
            self.feed.inputs = iter(())
            while self.held:  # the last copies run before DALI's memory goes back to DALI
                done = self.held.popleft()[1]
                if done is not None:
                    done.synchronize()
