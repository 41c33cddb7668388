"""The random part of augmentation: every per-image parameter of one batch, drawn on the host
with numpy from (seed, epoch, rank, batch). Every backend applies the same draws, so the DALI
graph and the torch ops give the same images for the same seed, and a resumed run is exact.

All geometry is one affine map per image at the stored 32x32, in pixel units where (0, 0) is the
corner of the first pixel and pixel centres sit at i + 0.5 (DALI's and torch's align_corners=False
convention). All colour jitter is one 3x3 matrix plus an offset per image. A policy's geometry
joins that map; its colour ops become per-step codes and parameters (`policy_steps`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from fastcifar.pipelines.spec import POLICY_OPS, AugSpec

SIDE = 32  # the stored images are 32x32: every op before the resize works at this size
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights: grey level used by saturation and contrast
_GREY = np.outer(np.ones(3), LUMA)  # M @ rgb with this M: each channel replaced by the pixel's grey
# each OneOf-able op's own probability field of AugSpec
OP_P = {"shift_scale_rotate": "ssr_p", "coarse_dropout": "erase_p", "color_jitter": "jitter_p",
        "hflip": "hflip", "vflip": "vflip"}
_EYE = np.eye(3)
_PIXEL_WEIGHTS = np.tile(LUMA.astype(np.float32), SIDE * SIDE) / (SIDE * SIDE)  # mean grey as one dot product
_EYE_TOL = 1e-9 + 1e-5 * _EYE


def _eye(n: int) -> np.ndarray:
    """(n, 3, 3) identity maps."""
    return np.broadcast_to(_EYE, (n, 3, 3)).copy()


def _identity(maps: np.ndarray) -> np.ndarray:
    """(n,) whether each (n, 3, 3) map is the identity, as np.isclose(maps, eye, atol=1e-9) says
    (|a - b| <= 1e-9 + 1e-5 |b|), without its generality's cost."""
    return np.all(np.abs(maps - _EYE) <= _EYE_TOL, axis=(1, 2))


def batch_rng(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    """The generator of one batch's draws: a pure function of (seed, epoch, rank, batch)."""
    return np.random.default_rng([seed, epoch, rank, batch, 0xA06])


def may(spec: AugSpec, op: str) -> bool:
    """Whether any image can get `op` (one of spec.ONEOF_OPS) under this spec."""
    return (op in spec.oneof and spec.oneof_p > 0) or (op not in spec.oneof and getattr(spec, OP_P[op]) > 0)


def _uniform(rng: np.random.Generator, n: int, *ranges) -> list[np.ndarray]:
    """n draws uniform in each (lo, hi) of `ranges`, in that order: the values of as many
    rng.uniform(lo, hi, n) calls (lo + (hi - lo) * a double, as numpy computes them), from one call."""
    return [lo + (hi - lo) * r for (lo, hi), r in zip(ranges, rng.random((len(ranges), n)))]


def _on(spec: AugSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Which images get which of the five OneOf-able ops (bool (n,) per op); an op in spec.oneof
    ignores its own p, as in albumentations' OneOf."""
    pick = rng.integers(len(spec.oneof), size=n) if spec.oneof else np.zeros(n, int)
    hit, *drawn = rng.random((1 + len(OP_P), n))
    hit = hit < spec.oneof_p
    return {op: hit & (pick == spec.oneof.index(op)) if op in spec.oneof else r < getattr(spec, p)
            for (op, p), r in zip(OP_P.items(), drawn)}


def _crop(spec: AugSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) destination -> source maps of the random crop (identity when off)."""
    m = _eye(n)
    if spec.pad_crop:  # shift by whole pixels in [-pad, pad]; what falls outside is filled with 0
        m[:, :2, 2] = rng.integers(-spec.pad_crop, spec.pad_crop + 1, size=(n, 2))
    elif spec.rrc_scale is not None:  # torchvision's RandomResizedCrop: 10 tries, else the whole image
        tries = 10
        area = SIDE * SIDE * rng.uniform(*spec.rrc_scale, size=(tries, n))
        log_r = np.log(spec.rrc_ratio)
        ratio = np.exp(rng.uniform(log_r[0], log_r[1], size=(tries, n)))
        w, h = np.rint(np.sqrt(area * ratio)), np.rint(np.sqrt(area / ratio))
        ok = (w >= 1) & (w <= SIDE) & (h >= 1) & (h <= SIDE)
        first = ok.argmax(0), np.arange(n)  # each image's first try that fits
        w, h = np.where(ok.any(0), w[first], SIDE), np.where(ok.any(0), h[first], SIDE)
        m[:, 0, 0], m[:, 0, 2] = w / SIDE, np.floor(rng.random(n) * (SIDE - w + 1))  # x0, drawn before y0
        m[:, 1, 1], m[:, 1, 2] = h / SIDE, np.floor(rng.random(n) * (SIDE - h + 1))
    return m


def _ssr(spec: AugSpec, n: int, rng: np.random.Generator, on: np.ndarray) -> np.ndarray:
    """(n, 3, 3) destination -> source maps of shift-scale-rotate about the image centre, for the
    images `on` (the others: identity; their parameters are drawn all the same)."""
    angle, scale, *shift = _uniform(rng, n, (-spec.ssr_degrees, spec.ssr_degrees),
                                    (1 - spec.ssr_scale, 1 + spec.ssr_scale), *[(-spec.ssr_shift, spec.ssr_shift)] * 2)
    angle, scale = np.deg2rad(angle[on]), scale[on]
    shift = np.concatenate(shift).reshape(n, 2)[on] * SIDE  # px; 2n draws in a row, as rng.uniform(size=(n, 2))
    c = SIDE / 2
    # forward: dst = c + scale * R(angle) (src - c) + shift; inverted here: src = c + R(-angle) (dst - c - shift) / scale
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    m = _eye(len(angle))
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
    d = np.array([c, c]) + shift  # dst point that maps to the source centre
    m[:, :2, 2] = c - np.einsum("nij,nj->ni", m[:, :2, :2], d)
    out = _eye(n)
    out[on] = m
    return out


_AXIS = np.full(3, 1 / math.sqrt(3))  # the grey axis, unit length
_AXIS_CROSS = np.array([[0, -_AXIS[2], _AXIS[1]], [_AXIS[2], 0, -_AXIS[0]], [-_AXIS[1], _AXIS[0], 0]])
_AXIS_OUTER = np.outer(_AXIS, _AXIS)


def _colour(spec: AugSpec, n: int, rng: np.random.Generator, on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Colour jitter as out = M @ rgb + k * mean_luma: brightness, then contrast about the image's
    mean grey, then saturation (blend with grey), then hue rotation, composed into one matrix; for
    the images `on` (the others: M = I, k = 0; their factors are drawn all the same)."""
    factors = [(max(0.0, 1 - f), 1 + f) for f in (spec.brightness, spec.contrast, spec.saturation)]
    b, c, s, h = (x[on] for x in _uniform(rng, n, *factors, (-spec.hue, spec.hue)))
    sat = s[:, None, None] * _EYE + (1 - s)[:, None, None] * _GREY
    m, k = _eye(n), np.zeros(n)
    a = 2 * math.pi * h[:, None, None]  # hue: a rotation of RGB about the grey axis by h turns (greys stay)
    cos = np.cos(a)
    m[on] = (cos * _EYE + np.sin(a) * _AXIS_CROSS + (1 - cos) * _AXIS_OUTER) @ sat * (b * c)[:, None, None]
    # contrast: c * (b x - b mean) + b mean = c b x + (1 - c) b mean; sat and hue keep greys, so
    # the offset passes through them unchanged
    k[on] = (1 - c) * b
    return m, k


def _holes(spec: AugSpec, n: int, rng: np.random.Generator, on: np.ndarray) -> np.ndarray:
    """(n, max_holes, 4) int boxes (y0, x0, h, w) in px at 32x32 for the images `on`; unused holes
    (and every hole of the other images, whose boxes are drawn all the same) have h = w = 0."""
    lo, hi = spec.erase_holes
    count = rng.integers(lo, hi + 1, size=n)[on]
    side, corner = _uniform(rng, n * hi * 2, spec.erase_size, (0.0, 1.0))  # as rng.uniform, then rng.random
    hw = np.maximum(1, np.rint(side.reshape(n, hi, 2)[on] * SIDE))
    yx = np.floor(corner.reshape(n, hi, 2)[on] * (SIDE - hw + 1))
    drawn = np.concatenate([yx, hw], axis=2).astype(np.int32)
    drawn[np.arange(hi)[None, :] >= count[:, None], 2:] = 0
    boxes = np.zeros((n, hi, 4), np.int32)
    boxes[on] = drawn
    return boxes


# ---- TrivialAugment-wide and RandAugment: torchvision's op list, magnitude bins and signs

BINS = 31  # magnitude bins, as torchvision's; RandAugment's M picks one (0..30)
# What a policy step does to colour (all colour steps run before the one warp): a code per image
# and step (linear: out = M @ rgb + c * mean grey; point: solarize above a threshold, then keep
# the top bits)
COLOUR_STEPS = ("none", "linear", "sharpness", "point", "autocontrast", "equalize")
SIGNED = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness")


@functools.cache
def policy_space(policy: str) -> np.ndarray:
    """(len(POLICY_OPS), BINS) unsigned magnitudes of each op per bin, as torchvision's (v2)
    TrivialAugmentWide ("trivialaugment") and RandAugment at 32x32: shear as a slope, translation
    in px, rotation in degrees, enhancements as factor - 1, posterize in bits kept, solarize as
    the threshold (0..255). Ops without a magnitude (identity, autocontrast, equalize) have 0 rows.
    Made with torch.linspace as torchvision makes them: its float32 rounding is part of the bins
    (TrivialAugment's translation bin 15 is 15 px once truncated, not 16). Do not modify: cached."""
    wide = policy == "trivialaugment"
    shear, move, turn, enhance = (0.99, 32.0, 135.0, 0.99) if wide else (0.3, 150.0 / 331.0 * SIDE, 30.0, 0.9)
    ramp = lambda lo, hi: torch.linspace(lo, hi, BINS).double().numpy()
    posterize = (8 - (torch.arange(BINS) / ((BINS - 1) / (6 if wide else 4))).round()).double().numpy()
    rows = {"shear_x": ramp(0.0, shear), "shear_y": ramp(0.0, shear), "translate_x": ramp(0.0, move),
            "translate_y": ramp(0.0, move), "rotate": ramp(0.0, turn), "brightness": ramp(0.0, enhance),
            "color": ramp(0.0, enhance), "contrast": ramp(0.0, enhance), "sharpness": ramp(0.0, enhance),
            "posterize": posterize, "solarize": 255 * ramp(1.0, 0.0)}
    return np.stack([rows.get(op, np.zeros(BINS)) for op in POLICY_OPS])


def _policy_draw(spec: AugSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(steps, n) op indices into POLICY_OPS, uniform with replacement, and their signed magnitudes."""
    steps = spec.policy_steps
    ops = rng.integers(len(POLICY_OPS), size=(steps, n))
    wide = spec.policy == "trivialaugment"  # a bin uniformly per image; RandAugment: always bin ra_m
    bins = rng.integers(BINS, size=(steps, n)) if wide else np.full((steps, n), spec.ra_m)
    sign = np.where(rng.random((steps, n)) < 0.5, -1.0, 1.0)
    return ops, policy_space(spec.policy)[ops, bins] * np.where(_SIGNED[ops], sign, 1.0)


_OP = {op: i for i, op in enumerate(POLICY_OPS)}
_MOVES = np.isin(np.array(POLICY_OPS), ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"))
# the ops that set one entry of the 3x3 map (row-major index; -1: none): shears the slope, translations -px
_SLOT = np.array([{"shear_x": 1, "shear_y": 3, "translate_x": 2, "translate_y": 5}.get(op, -1) for op in POLICY_OPS])
_SHIFTS = np.isin(np.array(POLICY_OPS), ("translate_x", "translate_y"))
_SIGNED = np.isin(np.array(POLICY_OPS), SIGNED)
# each policy op's COLOUR_STEPS code (the geometric ops and identity: none)
_STEP = {"brightness": "linear", "color": "linear", "contrast": "linear", "sharpness": "sharpness",
         "solarize": "point", "posterize": "point", "autocontrast": "autocontrast", "equalize": "equalize"}
_CODE = np.array([COLOUR_STEPS.index(_STEP.get(op, "none")) for op in POLICY_OPS], np.int32)  # op -> its colour step


def policy_params(ops: np.ndarray, mag: np.ndarray) -> dict[str, np.ndarray]:
    """What the backends apply for drawn policy ops ((steps, n) indices into POLICY_OPS, signed
    magnitudes): geometry (n, 3, 3), the destination -> source map of every step's shear,
    translation or rotation, composed in order; per step k, colour code op{k} (n,) int32 into
    COLOUR_STEPS, lin{k} (n, 3, 3) and lin_c{k} (n,) (linear: M and the weight of the mean grey),
    sharp{k} (n,) (weight of the blurred image), thresh{k} (n,) (solarize pixels >= it; 256 = none)
    and bits{k} (n,) uint8 (posterize: the mask of the bits kept). Each is computed for the images
    whose op uses it; the others hold the identity (M = I, weights 0, threshold 256, all bits)."""
    steps, n = ops.shape
    geometry = _eye(n)
    out = {}
    for k in range(steps):
        op, m = ops[k], mag[k]
        # torchvision's maps: shears about the corner (0, 0), translations by whole px (truncated),
        # rotations about the centre, counter-clockwise on screen for m > 0
        moves = np.flatnonzero(_MOVES[op])
        o, mm = op[moves], m[moves]
        g = _eye(len(moves))
        one = np.flatnonzero(_SLOT[o] >= 0)  # shear: the slope; translation: whole px, truncated, backwards
        g.reshape(-1, 9)[one, _SLOT[o[one]]] = np.where(_SHIFTS[o[one]], -np.trunc(mm[one]), mm[one])
        turn = o == _OP["rotate"]
        a = np.deg2rad(mm[turn])
        cos, sin, c = np.cos(a), np.sin(a), SIDE / 2
        g[turn, 0, 0], g[turn, 0, 1], g[turn, 0, 2] = cos, -sin, c - c * cos + c * sin
        g[turn, 1, 0], g[turn, 1, 1], g[turn, 1, 2] = sin, cos, c - c * sin - c * cos
        geometry[moves] = geometry[moves] @ g  # dst -> src: undo this step first, then the earlier ones

        f = 1 + m  # the enhancements' factor
        code = _CODE[op]
        lin = _eye(n)
        on = code == COLOUR_STEPS.index("linear")  # brightness, colour and contrast scale rgb by f
        lin[on] *= f[on, None, None]
        on = op == _OP["color"]  # saturation: blend each channel with the pixel's grey
        lin[on] += (1 - f[on])[:, None, None] * _GREY
        lin_c = np.where(op == _OP["contrast"], 1 - f, 0.0)  # blend with the mean grey of the image at this step
        sharp = np.where(op == _OP["sharpness"], 1 - f, 0.0)
        # solarize x >= m, compared in float32 as torch compares a uint8 image with a float: for
        # whole x, x >= ceil(float32(m)), which float32 holds exactly on every backend
        thresh = np.where(op == _OP["solarize"], np.ceil(m.astype(np.float32)), 256.0)
        keep = np.where(op == _OP["posterize"], m, 8).astype(int)
        out.update({f"op{k}": code, f"lin{k}": lin.astype(np.float32), f"lin_c{k}": lin_c.astype(np.float32),
                    f"sharp{k}": sharp.astype(np.float32), f"thresh{k}": thresh.astype(np.float32),
                    f"bits{k}": ((0xFF << (8 - keep)) & 0xFF).astype(np.uint8)})
    out["geometry"] = geometry
    return out


def draw(spec: AugSpec, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One batch's augmentation: which image gets which op, and the op parameters.

    Geometry: affine (n, 2, 3) float32, the destination -> source px maps at 32x32 (all of it, a
    policy's too), moved (n,) bool (not the identity); warp (n,) bool: images with shift-scale-rotate,
    a resized crop or a policy's geometry; the others move by whole pixels, as shift (n, 2) int32
    (dy, dx; src = dst + shift), then flip (n, 2) int32 (horizontal, vertical). Colour: jitter (n,)
    bool, colour (n, 3, 3) float32, colour_k (n,) float32 (offset = k * mean grey of the stored
    image, 0..255). Erasing: erase (n,) bool, holes (n, max_holes, 4) int32 (y0, x0, h, w). A policy
    adds policy (steps, n) int (indices into POLICY_OPS), magnitude (steps, n) (signed) and the
    per-step colour parameters of `policy_params`.
    Every parameter is drawn whether its op is on or not, and the policy's last, so switching an op
    on changes no other draw. What follows from the draws is computed only for the images whose op
    is on (the host's time per batch: `fastcifar bench`'s dali-host rows); the others hold the
    identity (colour I, colour_k 0, no holes, identity maps).
    """
    on = _on(spec, n, rng)
    crop = _crop(spec, n, rng)
    ssr = _ssr(spec, n, rng, on["shift_scale_rotate"])
    colour, k = _colour(spec, n, rng, on["color_jitter"])
    holes = _holes(spec, n, rng, on["coarse_dropout"])
    policy, bent = {}, np.zeros(n, bool)
    # dst -> src: undo the policy, ssr, then the flips, then the crop; a factor that is the
    # identity for every image is left out (multiplying by it changes no value)
    affine = crop
    if on["hflip"].any() or on["vflip"].any():
        flip = _eye(n)  # x -> SIDE - x
        flip[on["hflip"], 0, 0], flip[on["hflip"], 0, 2] = -1, SIDE
        flip[on["vflip"], 1, 1], flip[on["vflip"], 1, 2] = -1, SIDE
        affine = affine @ flip
    if on["shift_scale_rotate"].any():
        affine = affine @ ssr
    if spec.policy != "none":
        ops, mag = _policy_draw(spec, n, rng)
        policy = {"policy": ops, "magnitude": mag, **policy_params(ops, mag)}
        geometry = policy.pop("geometry")
        affine = affine @ geometry
        bent = ~_identity(geometry)
    moved = ~_identity(affine)
    return {
        "moved": moved,
        "affine": affine[:, :2].astype(np.float32),
        # the same geometry split for cheaper ops: images without ssr, rrc or a policy's geometry
        # move by whole pixels (shift and flip hold the crop and flips only: an image whose policy
        # translation undoes its crop warps, by the identity)
        "warp": moved & (on["shift_scale_rotate"] | (spec.rrc_scale is not None)) | bent,
        "shift": np.ascontiguousarray(crop[:, [1, 0], 2], dtype=np.int32),  # pad-and-crop (dy, dx): src = dst + shift
        "flip": np.stack([on["hflip"], on["vflip"]], 1).astype(np.int32),  # (horizontal, vertical)
        "jitter": on["color_jitter"],
        "colour": colour.astype(np.float32),
        "colour_k": k.astype(np.float32),
        "erase": on["coarse_dropout"],
        "holes": holes,
        **policy,
    }


def mean_grey(images: np.ndarray) -> np.ndarray:
    """(n,) float32 mean grey level (0..255) of uint8 NHWC 32x32 images: the pivot of contrast jitter."""
    return images.reshape(len(images), -1).astype(np.float32) @ _PIXEL_WEIGHTS
