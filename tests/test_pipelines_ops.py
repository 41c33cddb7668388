"""Each augmentation op does what it says, on every backend that can show it; the DALI graph and
the torch ops agree; a resumed loader repeats an epoch exactly."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import BACKENDS, BATCHED, MATMUL_OPS, ArrayStore, OpRecorder, as_uint8_nhwc, needs_dali
from fastcifar.pipelines import AugSpec, make_loader
from fastcifar.pipelines.draw import LUMA, batch_rng, draw
from fastcifar.pipelines.spec import tutorial_oneof

SEED = 11


def first_batch(store, spec, backend, batch_size=100, seed=SEED):
    """(output uint8 NHWC at 32, stored uint8 NHWC, draws) of epoch 0's first batch."""
    loader = make_loader(store, "train", spec, batch_size=batch_size, backend=backend, seed=seed)
    x, _ = next(iter(loader))
    rows = loader.batches(0)[0]
    p = draw(spec, len(rows), batch_rng(seed, 0, 0, 0))
    return as_uint8_nhwc(x), np.array(store.images("train")[rows]), p


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_flip(store, backend):
    out, src, _ = first_batch(store, AugSpec(hflip=1.0), backend)
    np.testing.assert_array_equal(out, src[:, :, ::-1])
    out, src, _ = first_batch(store, AugSpec(vflip=1.0), backend)
    np.testing.assert_array_equal(out, src[:, ::-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_crop_is_a_zero_filled_shift(store, backend):
    """Each output is its stored image moved by whole pixels (|dy|, |dx| <= 4), zeros coming in,
    at the same size; and the moves vary."""
    out, src, _ = first_batch(store, AugSpec(pad_crop=4), backend)
    assert out.shape == src.shape
    padded = np.pad(src, ((0, 0), (4, 4), (4, 4), (0, 0)))
    moves = []
    for o, p in zip(out, padded):
        hits = [(dy, dx) for dy in range(9) for dx in range(9) if np.array_equal(o, p[dy:dy + 32, dx:dx + 32])]
        assert hits, "an output is not a shift of its stored image"
        moves.append(hits[0])
    assert len(set(moves)) > 10


@pytest.mark.parametrize("backend", BATCHED)
def test_erasing_fills_its_holes(store, backend):
    """Exactly the drawn holes (1-2 boxes, sides 10-20% of 32 px) hold the fill; the rest is the store."""
    out, src, p = first_batch(store, AugSpec(erase_p=1.0, erase_fill=77), backend)
    expect = src.copy()
    for img, holes in zip(expect, p["holes"]):
        for y0, x0, h, w in holes:
            assert h == 0 or 3 <= h <= 7 and 3 <= w <= 7  # round(0.1 * 32) .. round(0.2 * 32), or unused
            img[y0:y0 + h, x0:x0 + w] = 77
    np.testing.assert_array_equal(out, expect)
    assert (out != src).any(axis=3).sum() > 9 * len(out)  # holes are at least 3x3 px (unless already 77)


def test_tutorial_erasing_fills(store):
    """The tutorial path (albumentations or its torch fallback): changed pixels all hold the fill."""
    out, src, _ = first_batch(store, AugSpec(erase_p=1.0, erase_fill=77), "tutorial")
    changed = (out != src).any(axis=3)
    assert changed.any() and (out[changed] == 77).all()


def _stats(x: np.ndarray):
    f = x.reshape(len(x), -1, 3).astype(np.float64)
    grey = f @ LUMA
    return f.mean((1, 2)), grey.mean(1), grey.std(1), f.mean(2)


@pytest.mark.parametrize("backend", BATCHED)
def test_colour_jitter_within_bounds(store, backend):
    """Each jitter factor moves its statistic within its bounds, and does move it. Tolerances:
    1/255 per pixel for rounding; clipping at 0/255 can only pull a statistic towards the middle,
    so bounds are checked on images with no clipped pixel."""
    def run(**kw):
        spec = AugSpec(jitter_p=1.0, **{"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, **kw})
        out, src, _ = first_batch(store, spec, backend, batch_size=250)
        ok = ~((out == 0) | (out == 255)).any(axis=(1, 2, 3))
        assert ok.sum() > 20, "too few unclipped images to test"
        return _stats(out[ok]), _stats(src[ok]), out[ok], src[ok]

    (m, _, _, _), (m0, _, _, _), _, _ = run(brightness=0.3)
    ratio = m / m0
    assert ratio.min() >= 0.7 - 0.01 and ratio.max() <= 1.3 + 0.01 and ratio.std() > 0.05

    (_, g, s, _), (_, g0, s0, _), _, _ = run(contrast=0.3)
    assert np.abs(g - g0).max() <= 1.0, "contrast pivots on the mean grey, which stays"
    ratio = s / s0
    assert ratio.min() >= 0.7 - 0.02 and ratio.max() <= 1.3 + 0.02 and ratio.std() > 0.05

    (_, _, _, _), _, out, src = run(saturation=0.5)
    grey, grey0 = out.astype(float) @ LUMA, src.astype(float) @ LUMA
    assert np.abs(grey - grey0).max() <= 1.0, "saturation keeps each pixel's grey level"
    chroma, chroma0 = np.abs(out - grey[..., None]).mean((1, 2, 3)), np.abs(src - grey0[..., None]).mean((1, 2, 3))
    assert (chroma / chroma0).min() >= 0.5 - 0.05 and (chroma / chroma0).max() <= 1.5 + 0.05

    (_, _, _, a), (_, _, _, a0), out, src = run(hue=0.5)
    assert np.abs(a - a0).max() <= 1.0, "hue rotates about the grey axis: (r + g + b) / 3 stays per pixel"
    assert (np.abs(out.astype(int) - src).max(axis=(1, 2, 3)) > 10).mean() > 0.5, "hue moves colours"


@pytest.mark.parametrize("backend", BATCHED)
def test_oneof_applies_exactly_one_op(store, backend):
    """OneOf(p=1): every image draws exactly one of the five ops, all five occur, and the output
    shows that op: flips flip exactly, erasing touches only its holes, jitter keeps the geometry
    (same ordering of pixel brightness is not guaranteed, so: a different image), and
    shift-scale-rotate moves the image."""
    spec = AugSpec(**tutorial_oneof(1.0))
    out, src, p = first_batch(store, spec, backend, batch_size=250)
    n = len(out)
    ssr = p["warp"]
    hflip, vflip = p["flip"][:, 0].astype(bool), p["flip"][:, 1].astype(bool)
    ops = np.stack([ssr | (p["moved"] & ~(hflip | vflip)), p["erase"], p["jitter"], hflip, vflip], 1)
    np.testing.assert_array_equal(ops.sum(1), np.ones(n), err_msg="not exactly one op per image")
    assert ops.any(0).all(), "some op never drawn in 250 images"
    np.testing.assert_array_equal(out[hflip], src[hflip][:, :, ::-1])
    np.testing.assert_array_equal(out[vflip], src[vflip][:, ::-1])
    for o, s, holes in zip(out[p["erase"]], src[p["erase"]], p["holes"][p["erase"]]):
        inside = np.zeros((32, 32), bool)
        for y0, x0, h, w in holes:
            inside[y0:y0 + h, x0:x0 + w] = True
        np.testing.assert_array_equal(o[~inside], s[~inside])
        assert (o[inside] == 0).all()
    assert all((o != s).any() for o, s in zip(out[ssr], src[ssr]))


@needs_dali
def test_dali_and_torch_agree(store):
    """The same draws through DALI and torch, over four seeds. At 32 every value within 1/255 and
    only rounding ties differ at all (measured: 1-3 values in 100k; the colour matrix and the
    bilinear warp are computed in float by two libraries). At 224 both resize floats (torch on the
    CPU as on a GPU): within the same 1/255, and so is a float resize of torch's own 32 view."""
    std = torch.tensor(store.std).view(1, 3, 1, 1) * 255  # back to 0..255 units
    spec = AugSpec(pad_crop=2, **tutorial_oneof(1.0), normalize="cifar")
    for seed in range(4):
        (t32, t224), (d32, d224) = (next(iter(make_loader(store, "train", spec, batch_size=20, backend=backend,
                                                          seed=seed, sizes=(32, 224))))[0] for backend in ("torch", "dali"))
        diff = lambda a, b: ((a.float() - b.float()) * std).abs()
        at32, at224 = diff(t32, d32), diff(t224, d224)
        resized = diff(F.interpolate(t32.float(), size=(224, 224), mode="bilinear", align_corners=False), d224)
        msg = (f"seed {seed}: at 32 max {at32.max():.3f}/255; at 224 max {at224.max():.3f}/255, mean "
               f"{at224.mean():.4f}/255, against torch's 32 view resized as floats {resized.max():.3f}/255")
        assert at32.max() <= 1 + 1e-3 and (at32 > 0.5).float().mean() <= 5e-4, msg
        assert resized.max() <= 1 + 1e-3, msg
        assert at224.max() <= 1 + 1e-3 and at224.mean() <= 0.01, msg


@pytest.mark.parametrize("backend", BATCHED)
def test_random_resized_crop_draws(store, backend):
    """Resized crops keep the output size, cover 25-50% of the image (+-1 px per side of rounding)
    with aspect ratio in [3/4, 4/3], and zoom in (the output differs from the store)."""
    spec = AugSpec(rrc_scale=(0.25, 0.5))
    p = draw(spec, 500, batch_rng(0, 0, 0, 0))
    a = p["affine"]  # dst -> src: the diagonal is crop side / 32
    w, h = a[:, 0, 0] * 32, a[:, 1, 1] * 32
    assert ((w * h >= 0.25 * 1024 - 2 * 32) & (w * h <= 0.5 * 1024 + 2 * 32)).all()
    assert ((w / h >= 0.75 * 0.9) & (w / h <= 4 / 3 * 1.1)).all()
    assert ((a[:, 0, 2] >= 0) & (a[:, 0, 2] + w <= 32) & (a[:, 1, 2] >= 0) & (a[:, 1, 2] + h <= 32)).all()
    out, src, _ = first_batch(store, spec, backend)
    assert out.shape == src.shape and all((o != s).any() for o, s in zip(out, src))


@pytest.mark.parametrize("backend", BATCHED)
def test_resume_repeats_an_epoch(store, backend):
    """A loader that ran epochs 0-1 (leaving epoch 1 half-way) gives the same epoch 2 as a fresh
    loader that starts at epoch 2, and set_epoch(2, start_batch=3) gives that epoch's batches 3..:
    what a resumed run sees."""
    spec = AugSpec(pad_crop=4, hflip=0.5, **tutorial_oneof(0.5))
    make = lambda: make_loader(store, "train", spec, batch_size=100, backend=backend, seed=9)
    a = make()
    for _ in a:
        pass
    a.set_epoch(1)
    next(iter(a))  # abandoned mid-epoch
    a.set_epoch(2)
    b = make()
    b.set_epoch(2)
    full = list(b)
    assert len(full) == len(b)
    for (xa, ya), (xb, yb) in zip(a, full):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(2, start_batch=3)  # resumed after batch 3 of epoch 2: the same batches 3..
    rest = list(b)
    assert len(rest) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(rest, full[3:]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("backend", BATCHED)
def test_each_rank_applies_its_own_draws(store, backend):
    """Batch b of epoch e on rank r gets the draws of (seed, e, r, b): rank 1's second batch of
    epoch 1 in a two-rank run is flipped as drawn for exactly that (two ranks with one seed must
    not augment alike, and a resumed rank must repeat its own draws)."""
    spec = AugSpec(hflip=0.5)
    loader = make_loader(store, "train", spec, batch_size=100, backend=backend, seed=SEED, shard=(1, 2))
    loader.set_epoch(1)
    x = [x for x, _ in loader][1]
    rows = loader.batches(1)[1]
    src = np.array(store.images("train")[rows])
    flip = draw(spec, len(rows), batch_rng(SEED, 1, 1, 1))["flip"][:, 0].astype(bool)
    assert not np.array_equal(flip, draw(spec, len(rows), batch_rng(SEED, 1, 0, 1))["flip"][:, 0])
    np.testing.assert_array_equal(as_uint8_nhwc(x), np.where(flip[:, None, None, None], src[:, :, ::-1], src))

def test_downscaling_averages_the_whole_footprint():
    """A resize below the stored 32 px (aug.image_size >= 8 is allowed) is antialiased: at 8 px each
    output pixel averages a 4x4-pixel footprint or more, so uniform noise (std 0.29) drops below
    0.29 / 4; a plain bilinear sample averages 2x2 pixels and only halves it (aliasing)."""
    from fastcifar.pipelines.torch_backend import finish

    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = finish(x, 8, AugSpec(image_size=8), torch.full((1, 3, 1, 1), 1 / 255), torch.zeros(1, 3, 1, 1))
    assert y.shape == (4, 3, 8, 8)
    assert x.float().div(255).std() > 0.28 and y.std() < 0.29 / 4
    assert (y.mean() - x.float().div(255).mean()).abs() < 0.01  # averaging keeps the mean


@pytest.mark.parametrize("backend", BATCHED)
def test_loader_downscaling_is_antialiased(backend, tmp_path):
    """The same through each batched backend's loader (aug.image_size=8 of the stored 32): noise
    averaged over each pixel's whole footprint, not sampled (DALI resizes in its own graph)."""
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    loader = make_loader(ArrayStore(x, tmp_path), "test", AugSpec(image_size=8), batch_size=8, backend=backend)
    y, _ = next(iter(loader))
    assert y.shape == (8, 3, 8, 8) and y.std() < 0.29 / 4, f"std {y.std():.3f}"
    assert abs(y.mean() - x.mean() / 255) < 0.01

def test_torch_resize_runs_a_gpus_arithmetic_and_cubic_is_clamped_and_rounded():
    """finish (the torch backend's resize and normalisation) is one float path for every device, so
    the CPU runs what a GPU runs (CUDA has no uint8 resize): linear resizes the normalised floats;
    cubic, which overshoots beside a 0/255 step, rounds and clamps to 0..255 before normalising
    (a GPU's unclamped floats once ranged -0.12 .. 1.18)."""
    from fastcifar.pipelines.torch_backend import finish

    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:2] = 0
    x[:2, :, 16:] = 255
    scale, shift = torch.tensor([1 / (255 * s) for s in (0.2, 0.25, 0.3)]).view(1, 3, 1, 1), torch.tensor(-2.0)
    src = x.permute(0, 3, 1, 2).float()
    resize = lambda t, mode: F.interpolate(t, size=(96, 96), mode=mode, align_corners=False, antialias=mode == "bicubic")
    raw = resize(src, "bicubic")
    assert raw.min() < -10 and raw.max() > 255 + 10  # the step does overshoot
    y = finish(x, 96, AugSpec(image_size=96, interpolation="cubic"), scale, shift)
    pixels = (y - shift) / scale
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3 and (pixels - pixels.round()).abs().max() < 1e-3
    torch.testing.assert_close(pixels, (raw + 0.5).floor().clamp(0, 255), atol=1e-3, rtol=0)
    y = finish(x, 96, AugSpec(image_size=96), scale, shift)
    torch.testing.assert_close(y, resize(src * scale + shift, "bilinear"), atol=1e-5, rtol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)


@needs_dali
def test_cubic_resize_in_range_and_close(store):
    """interpolation='cubic': DALI and torch use the same cubic kernel (Keys' a = -0.5), in their own
    float arithmetic, which differs at sharp edges (up to about 20/255 on these synthetic shapes), so
    only the mean difference is bounded, within 0.5/255; values stay in 0..1 (the overshoot is clamped)."""
    spec = AugSpec(image_size=96, interpolation="cubic")
    outs = [next(iter(make_loader(store, "test", spec, 50, backend=b)))[0] for b in ("torch", "dali")]
    for x in outs:
        assert x.min() >= 0 and x.max() <= 1
    diff = (outs[0] - outs[1]).abs() * 255
    assert diff.mean() <= 0.5, f"mean {diff.mean():.2f}/255"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cubic_is_cubic(backend, tmp_path):
    """interpolation='cubic' resizes with a cubic kernel, which overshoots beside a sharp edge (a
    step from 60 to 180 upscaled to 96 px goes past 180), where 'linear' stays within the step."""
    x = np.full((2, 32, 32, 3), 60, np.uint8)
    x[:, :, 16:] = 180
    peak = {}
    for interpolation in ("cubic", "linear"):
        spec = AugSpec(image_size=96, interpolation=interpolation)
        y, _ = next(iter(make_loader(ArrayStore(x, tmp_path), "test", spec, 2, backend=backend)))
        peak[interpolation] = y.float().max().item() * 255
    assert peak["cubic"] > 180 + 3 and peak["linear"] <= 180 + 1e-3, peak

def test_tutorial_batches_leave_the_workers_in_their_dtype(store, monkeypatch):
    """The tutorial path's workers cast to spec.dtype, so the copy to the device changes the device
    only: on a GPU it reads the batch the DataLoader pinned (a cast in that copy would convert
    through pageable memory). The CPU runs the same conversion code."""
    seen = []

    class Spy(torch.utils.data.DataLoader):
        def __iter__(self):
            for images, labels in super().__iter__():
                seen.append([x.dtype for x in images])
                yield images, labels

    monkeypatch.setattr(torch.utils.data, "DataLoader", Spy)
    spec = AugSpec(image_size=48, dtype="bfloat16", hflip=0.5)
    (x32, x48), _ = next(iter(make_loader(store, "train", spec, 16, backend="tutorial", sizes=(32, 48))))
    assert seen == [[torch.bfloat16, torch.bfloat16]]
    assert all(x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last) for x in (x32, x48))


@pytest.mark.parametrize("alb", [True, False], ids=["albumentations", "torch-fallback"])
def test_tutorial_both_paths(store, monkeypatch, alb):
    """The tutorial path with albumentations + cv2 (the bench extra) and without (CI): flips flip,
    OneOf changes every image but keeps the size, and with no augmentation it is the store."""
    from fastcifar.pipelines.tutorial import albumentations_available

    if alb and not albumentations_available():
        pytest.skip(reason="the bench extra (albumentations, opencv) is not installed")
    monkeypatch.setattr("fastcifar.pipelines.tutorial.albumentations_available", lambda: alb)
    out, src, _ = first_batch(store, AugSpec(hflip=1.0), "tutorial", batch_size=50)
    np.testing.assert_array_equal(out, src[:, :, ::-1])
    out, src, _ = first_batch(store, AugSpec(**tutorial_oneof(1.0)), "tutorial", batch_size=50)
    assert out.shape == src.shape and (out != src).any(axis=(1, 2, 3)).mean() > 0.9
    out, src, _ = first_batch(store, AugSpec(), "tutorial", batch_size=50)
    np.testing.assert_array_equal(out, src)


# ---- TF32: the trainer turns it on; the pipelines must give the same images with it on or off

def test_torch_backend_runs_no_matmul(store):
    """No op of the torch backend is a matmul or convolution, the ops TF32 rounds to 10 mantissa
    bits on a GPU: so its images cannot depend on the TF32 flags, on any device. (A CPU cannot
    show TF32 itself; which ops run is the same on every device.)"""
    spec = AugSpec(image_size=64, pad_crop=2, normalize="cifar", **tutorial_oneof(1.0))
    loader = make_loader(store, "train", spec, batch_size=100, backend="torch", seed=SEED)
    with OpRecorder() as rec:
        next(iter(loader))
    assert {"grid_sampler_2d", "upsample_bilinear2d", "mul"} <= rec.ops  # it did record the backend's work
    assert not [op for op in rec.ops if MATMUL_OPS.search(op)], sorted(rec.ops)


@pytest.mark.parametrize("backend", BATCHED)
def test_images_ignore_fast_math_flags(store, backend, fast_math):
    """The same batch with the trainer's TF32 flags and set_float32_matmul_precision('high' or
    'medium') as without them, bit for bit. What a CPU can show: the TF32 flags act on CUDA only;
    'medium' lets oneDNN round float32 matmuls differently on a CPU with bfloat16 units (on this
    project's CI machine a colour-jitter einsum then changes a few of the 1.5M values below). On a
    GPU the flags switch on TF32 (`fastcifar doctor`'s agreement check repeats it there), and
    test_torch_backend_runs_no_matmul shows on any machine that no op they act on runs."""
    spec = AugSpec(jitter_p=1.0, ssr_p=0.5)  # all 500 images: a CPU's changes are rare roundings of the last bit
    batch = lambda: next(iter(make_loader(store, "train", spec, batch_size=500, backend=backend, seed=SEED)))[0]
    ref = batch()
    for precision in ("high", "medium"):
        fast_math(precision)
        assert torch.equal(batch(), ref), f"set_float32_matmul_precision({precision!r}) changed the images"


# ---- OneOf means one, on every backend: read off the pixels of images drawn to make each op show

BLOBS = np.array([[200, 60, 60], [60, 180, 70], [60, 70, 200]], np.uint8)  # three 5x5 blobs ...
BACKGROUND, FILL = np.array([70, 90, 110], np.uint8), 255  # ... on a flat background; erasing fills 255


def _cross(u, v):
    return u[0] * v[1] - u[1] * v[0]


def blob_images(n: int, seed: int = 0) -> np.ndarray:
    """Three coloured blobs placed at random in the central 16x16 (inside the frame whatever
    shift-scale-rotate does), as a triangle whose orientation a flip reverses."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for img in out:
        while True:
            corners = rng.integers(8, 20, size=(3, 2))
            a, b, c = corners
            apart = all(np.abs(p - q).max() >= 6 for p, q in ((a, b), (a, c), (b, c)))
            if apart and abs(_cross(b - a, c - a)) >= 30:
                break
        img[:] = BACKGROUND
        for (y, x), colour in zip(corners, BLOBS):
            img[y:y + 5, x:x + 5] = colour
    return out


def _orientation(img):
    """Centroids of the blobs' exact colours: (sign of the triangle's orientation, angle of a-b),
    or None if a blob has fewer than 3 pixels of its colour."""
    pts = []
    for colour in BLOBS:
        yx = np.argwhere((img == colour).all(-1))
        if len(yx) < 3:
            return None
        pts.append(yx.mean(0)[::-1])  # (x, y)
    a, b, c = pts
    return np.sign(_cross(b - a, c - a)), np.arctan2(*(b - a)[::-1])


def single_ops(out: np.ndarray, src: np.ndarray) -> set[str]:
    """Which single op (or none) turns src into out, read from the pixels:
    flips are exact mirrors; erasing changes pixels only to the fill; colour jitter maps colours
    to colours (pixels alike before are alike after, different ones stay different) and changes
    them; shift-scale-rotate keeps the flat colours (interpolation only blends at edges), moves
    them, keeps the blobs' orientation (no mirror) and turns them by at most 45 degrees."""
    ops = set()
    if np.array_equal(out, src):
        ops.add("none")
    if np.array_equal(out, src[:, ::-1]):
        ops.add("hflip")
    if np.array_equal(out, src[::-1]):
        ops.add("vflip")
    changed = (out != src).any(-1)
    if changed.any() and (out[changed] == FILL).all():
        ops.add("coarse_dropout")
    _, before = np.unique(src.reshape(-1, 3), axis=0, return_inverse=True)
    _, after = np.unique(out.reshape(-1, 3), axis=0, return_inverse=True)
    pairs = len(np.unique(np.stack([before.ravel(), after.ravel()], 1), axis=0))
    if changed.any() and pairs == before.max() + 1 == after.max() + 1:
        ops.add("color_jitter")
    flat = np.ones((30, 30), bool)  # pixels whose 3x3 neighbourhood is one colour
    for dy in range(3):
        for dx in range(3):
            flat &= (out[dy:dy + 30, dx:dx + 30] == out[1:31, 1:31]).all(-1)
    palette = np.vstack([BLOBS, BACKGROUND, [0, 0, 0]])
    kept = (out[1:31, 1:31][flat][:, None] == palette).all(-1).any(-1).all()
    o, s = _orientation(out), _orientation(src)
    if changed.any() and kept and o is not None and o[0] == s[0]:
        turn = (o[1] - s[1] + np.pi) % (2 * np.pi) - np.pi
        if abs(turn) <= np.deg2rad(50):  # 45 and a margin for centroids of pixelated blobs
            ops.add("shift_scale_rotate")
    return ops


@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("backend", [*BATCHED, "tutorial-albumentations", "tutorial-fallback"])
def test_oneof_means_one_on_every_backend(backend, p, tmp_path, monkeypatch):
    """The tutorial's policy, OneOf(the five ops, p): every output is its source with exactly one
    of the five ops applied (or untouched, only when p < 1), each op shows up, on the batched
    backends and on the tutorial's path with albumentations and with its torch fallback. Read from
    the pixels (the tutorial path's draws are its own), so two ops on one image fail here."""
    if backend.startswith("tutorial"):
        from fastcifar.pipelines.tutorial import albumentations_available

        alb = backend == "tutorial-albumentations"
        if alb and not albumentations_available():
            pytest.skip(reason="the bench extra (albumentations, opencv) is not installed")
        monkeypatch.setattr("fastcifar.pipelines.tutorial.albumentations_available", lambda: alb)
        backend = "tutorial"
    src = blob_images(150)
    spec = AugSpec(**tutorial_oneof(p), erase_fill=FILL)
    loader = make_loader(ArrayStore(src, tmp_path), "train", spec, batch_size=150, backend=backend, seed=SEED)
    x, _ = next(iter(loader))
    out, src = as_uint8_nhwc(x), src[loader.batches(0)[0]]
    seen = [single_ops(o, s) for o, s in zip(out, src)]
    bad = [i for i, ops in enumerate(seen) if not ops or (p == 1 and ops == {"none"})]
    assert not bad, f"{len(bad)} images are not one op of their source, e.g. image {bad[0]}"
    shown = {next(iter(ops)) for ops in seen if len(ops) == 1}
    assert shown == set(tutorial_oneof()["oneof"]) | ({"none"} if p < 1 else set())
