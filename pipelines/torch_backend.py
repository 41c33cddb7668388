"""The torch backend: the whole uint8 split moved to the device once, augmentation as batched
tensor ops on NHWC uint8 (no per-image Python loop), then resize, normalise, cast.

Images stay uint8 through the augmentation at 32 and become floats for the resize and the
normalisation only (`finish`: the same arithmetic on the CPU and the GPU, in the DALI graph's order).
Which image gets which op is known on the host (pipelines.draw), so each op runs on the subset
of the batch it touches, indexed without a device sync. No op is a matmul or a convolution (colour
jitter, the mean grey, the affine grid and the sharpness blur are multiply-adds in float32): with
TF32 on, which the trainer turns on, a CUDA matmul rounds its inputs to 10 bits and the backends
would disagree.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.pipelines.draw import COLOUR_STEPS, LUMA, SIDE, batch_rng, draw
from fastcifar.pipelines.spec import AugSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MODES = {"linear": "bilinear", "cubic": "bicubic"}
_ON_DEVICE: dict = {}  # (store dir, split, device) -> (images, labels): a split moves once per process


def host_to_device(a, device: torch.device) -> torch.Tensor:
    """A small host array on the device; pinned + non_blocking on CUDA so it never waits."""
    if isinstance(a, torch.Tensor):
        return a.to(device)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _subset(x: torch.Tensor, mask: np.ndarray, op, *args) -> torch.Tensor:
    """op(x, *args) on the images where mask is set (args indexed alike); the rest pass untouched."""
    if not mask.any():
        return x
    if mask.all():
        return op(x, *(host_to_device(a, x.device) for a in args))
    idx = np.flatnonzero(mask)
    di = host_to_device(idx, x.device)
    out = x.clone()
    out[di] = op(x[di], *(a[di] if isinstance(a, torch.Tensor) else host_to_device(a[idx], x.device) for a in args))
    return out


def theta(affine: np.ndarray, side: int = SIDE) -> np.ndarray:
    """(n, 2, 3) px maps -> affine_grid's maps in normalised coordinates (align_corners=False:
    u = 2 x / side - 1), on the host so the device never waits on a matrix inverse."""
    norm = np.array([[2 / side, 0, -1], [0, 2 / side, -1], [0, 0, 1]])
    full = np.concatenate([affine, np.broadcast_to(norm[2:], (len(affine), 1, 3))], axis=1)
    return (norm @ full @ np.linalg.inv(norm))[:, :2].astype(np.float32)


def grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(theta, (n, C, h, w), align_corners=False) as multiply-adds: (n, h, w, 2)
    sampling points of the pixel centres (affine_grid itself is a batched matmul, see above)."""
    # the pixel centres in [-1, 1] along x and y
    u, v = ((torch.arange(k, device=theta.device, dtype=torch.float32) * 2 + 1) / k - 1 for k in (w, h))
    t = theta[:, :, None, None, :]  # (n, 2, 1, 1, 3): rows x' and y' of each map
    g = t[..., 0] * u + t[..., 1] * v[:, None] + t[..., 2]  # (n, 2, h, w)
    return g.permute(0, 2, 3, 1)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warp of uint8 NHWC images (maps from `theta()`), zero fill."""
    n, h, w, _ = x.shape
    y = F.grid_sample(x.permute(0, 3, 1, 2).float(), grid(theta, h, w), mode="bilinear", padding_mode="zeros",
                      align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def grey(x: torch.Tensor) -> torch.Tensor:
    """(n,) mean grey level (0..255) of uint8 NHWC images: the pivot of contrast jitter."""
    x = x.float()
    r, g, b = LUMA.tolist()
    return (x[..., 0] * r + x[..., 1] * g + x[..., 2] * b).mean((1, 2))


def _matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """M @ rgb per pixel (float32) as three multiply-adds per output channel, no matmul
    (bench/tf32_free_ops.py times both ways)."""
    x, m = x.float(), m[:, None, None]  # m: (n, 1, 1, out, in)
    return x[..., 0:1] * m[..., 0] + x[..., 1:2] * m[..., 1] + x[..., 2:3] * m[..., 2]


def colour(x: torch.Tensor, m: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out = M @ rgb + k * grey per image (see pipelines.draw), rounded and clamped to uint8."""
    return (_matrix(x, m) + (k * g)[:, None, None, None]).round_().clamp_(0, 255).to(torch.uint8)


def erase(x: torch.Tensor, holes: torch.Tensor, fill: int) -> torch.Tensor:
    """Fill the boxes (y0, x0, h, w) of each image with `fill` (boxes with h = 0 are unused)."""
    r = torch.arange(x.shape[1], device=x.device)
    y0, x0, h, w = (holes[..., i, None] for i in range(4))  # each (n, holes, 1)
    rows = (r >= y0) & (r < y0 + h)  # (n, holes, H)
    cols = (r >= x0) & (r < x0 + w)  # (n, holes, W)
    mask = (rows[..., :, None] & cols[..., None, :]).any(1)  # (n, H, W)
    return x.masked_fill(mask[..., None], fill)


# ---- the policies' colour ops (TrivialAugment, RandAugment), as the DALI graph computes them

def round_u8(y: torch.Tensor) -> torch.Tensor:
    """Float pixels to uint8, ties rounded up: DALI's casts round ties away from zero on the CPU and
    to even on the GPU, so the policy ops round explicitly, the same on every backend."""
    return (y + 0.5).floor_().clamp_(0, 255).to(torch.uint8)


def linear(x: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """out = M @ rgb + c * the image's mean grey: brightness, colour (saturation) and contrast."""
    return round_u8(_matrix(x, m) + (c * grey(x))[:, None, None, None])


def sharpen(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness: blend each inner pixel with its 3x3 blur (weights 1, centre 5, over
    13, rounded), weight w on the blur; the one-pixel border is kept. Shifted adds, not a conv."""
    f = x.float()
    h, v = f.shape[1] - 2, f.shape[2] - 2
    inner = f[:, 1:-1, 1:-1]
    blur = (sum(f[:, dy:dy + h, dx:dx + v] for dy in range(3) for dx in range(3)) + 4 * inner) / 13
    out = f.clone()
    out[:, 1:-1, 1:-1] = inner + w[:, None, None, None] * (blur.round_() - inner)  # thirteenths: no ties
    return round_u8(out)


def point(x: torch.Tensor, thresh: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Solarize (invert the pixels >= thresh), then posterize (keep the bits set in `bits`)."""
    inverted = torch.where(x >= thresh[:, None, None, None], 255 - x, x)
    return inverted & bits[:, None, None, None]


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's min..max to 0..255 (a one-value channel stays as it is)."""
    f = x.float()
    lo, hi = f.amin((1, 2), keepdim=True), f.amax((1, 2), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, 1.0, f.new_tensor(255.0) / (hi - lo))  # true division, as DALI (255 / t is 255 * (1 / t))
    return round_u8((f - torch.where(flat, 0.0, lo)) * scale)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel as OpenCV's equalizeHist (what DALI's fn.equalize
    computes): lut[v] = round((cdf[v] - cdf[lowest value]) * 255 / (pixels - cdf[lowest value])),
    in float32 rounding half to even; a one-value channel stays as it is."""
    n, h, w, _ = x.shape
    v = x.permute(0, 3, 1, 2).reshape(n, 3, h * w).long()
    hist = torch.zeros(n, 3, 256, dtype=torch.int64, device=x.device).scatter_add_(2, v, torch.ones_like(v))
    cdf = hist.cumsum(2)
    low = torch.where(hist > 0, cdf, h * w).amin(2, keepdim=True)  # pixels at the lowest value
    scale = x.new_tensor(255.0, dtype=torch.float32) / (h * w - low).clamp(min=1).float()  # OpenCV's float32 scale
    lut = ((cdf - low).float() * scale).round_().clamp_(0, 255).to(torch.uint8)
    lut = torch.where(low == h * w, torch.arange(256, device=x.device, dtype=torch.uint8), lut)
    return lut.gather(2, v).view(n, 3, h, w).permute(0, 2, 3, 1).contiguous()


# COLOUR_STEPS code -> (op, the per-step draws it takes, by name without the step number)
POLICY_COLOUR = {"linear": (linear, ("lin", "lin_c")), "sharpness": (sharpen, ("sharp",)),
                 "point": (point, ("thresh", "bits")), "autocontrast": (autocontrast, ()),
                 "equalize": (equalize, ())}


def augment(x: torch.Tensor, p: dict, spec: AugSpec) -> torch.Tensor:
    """Apply one batch's draws (pipelines.draw) to uint8 NHWC images at 32x32."""
    g = grey(x) if p["jitter"].any() else None  # of the stored image, as the DALI graph does it
    # the policy's colour ops first, step by step in the order drawn, on the stored image: after a
    # warp they would turn its rare rounding ties (1/255) into whole solarize or posterize steps
    for k in range(spec.policy_steps):
        for name, (op, args) in POLICY_COLOUR.items():
            x = _subset(x, p[f"op{k}"] == COLOUR_STEPS.index(name), op, *(p[f"{a}{k}"] for a in args))
    x = _subset(x, p["moved"], warp, theta(p["affine"]))  # one bilinear warp: exact for whole-pixel moves
    x = _subset(x, p["jitter"], colour, p["colour"], p["colour_k"], g)
    x = _subset(x, p["erase"], lambda t, b: erase(t, b, spec.erase_fill), p["holes"])
    return x


def finish(x: torch.Tensor, size: int, spec: AugSpec, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC at 32 -> resized, normalised NCHW channels_last tensor of spec.dtype, in the order
    of the DALI graph (pipelines.dali._finish says why), with the same arithmetic on every device:
    floats throughout (CUDA has no uint8 resize, so a CPU-only uint8 kernel would give other
    images). Cubic uses DALI's kernel, Keys' a = -0.5: torch's antialiased bicubic (its plain one
    has a = -0.75)."""
    x = x.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: that is channels_last already
    aa = spec.interpolation == "cubic" or size < x.shape[-1]
    resize = lambda t: t if size == x.shape[-1] else F.interpolate(
        t, size=(size, size), mode=_MODES[spec.interpolation], align_corners=False, antialias=aa)
    if spec.interpolation == "cubic":
        y = torch.addcmul(shift, round_u8(resize(x)), scale)  # x * scale + shift, float32
    else:
        y = resize(torch.addcmul(shift, x, scale))
    # channels_last whatever layout a device's resize kernel returns; no copy when it is already
    return y.to(TORCH_DTYPES[spec.dtype], memory_format=torch.channels_last)


def to_device(store, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's uint8 images (N, 32, 32, 3) and int64 labels on the device, moved once."""
    key = (str(store.dir), split, str(device))
    if key not in _ON_DEVICE:
        arrays = store.images(split), store.labels(split)
        _ON_DEVICE[key] = tuple(torch.from_numpy(np.array(a)).to(device) for a in arrays)  # memmaps read once
    return _ON_DEVICE[key]


class TorchBackend:
    """Batches of a split as batched tensor ops on the device."""

    def __init__(self, store, split, *, spec: AugSpec, sizes, device, augment: bool, seed: int, rank: int, mean, std):
        self.name, self.spec, self.sizes, self.device = "torch", spec, sizes, device
        self.augment, self.seed, self.rank = augment and spec.augments, seed, rank
        self.images, self.labels = to_device(store, split, device)
        # normalise as x * scale + shift, per channel, shaped to broadcast over NCHW
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, 3, 1, 1)

    def epoch(self, batches: list[tuple[int, np.ndarray]], epoch: int) -> Iterator:
        """(images, labels) of each batch's rows, augmented with that batch's draws of this epoch."""
        for b, idx in batches:
            di = host_to_device(idx, self.device)
            x = self.images[di]
            if self.augment:
                x = augment(x, draw(self.spec, len(idx), batch_rng(self.seed, epoch, self.rank, b)), self.spec)
            yield tuple(finish(x, s, self.spec, self.scale, self.shift) for s in self.sizes), self.labels[di]
