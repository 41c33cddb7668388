"""TrivialAugment-wide and RandAugment (`aug.policy`): each op as torchvision defines it (equalize
as OpenCV's, which DALI computes), the same images from DALI and torch, draws that are uniform,
change per epoch and repeat on resume, N ops per image, and policy "none" exactly as before."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

import golden_aug
from fastcifar.errors import BadInput
from helpers import BATCHED, MATMUL_OPS, ArrayStore, OpRecorder, as_uint8_nhwc, cli, needs_dali
from fastcifar.pipelines import AugSpec, make_loader
from fastcifar.pipelines import torch_backend as tb
from fastcifar.pipelines.draw import BINS, COLOUR_STEPS, batch_rng, draw, policy_params, policy_space
from fastcifar.pipelines.loader import dali_available
from fastcifar.pipelines.spec import POLICY_OPS, tutorial_oneof

POLICIES = ("trivialaugment", "randaugment")
TORCHVISION = {"trivialaugment": T2.TrivialAugmentWide, "randaugment": T2.RandAugment}
TV_NAMES = dict(zip(POLICY_OPS, ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                 "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize",
                                 "AutoContrast", "Equalize")))


def pictures(n: int, seed: int = 0) -> np.ndarray:
    """n 32x32 uint8 pictures: 4x4 px blocks of random colour plus noise, each image in its own
    range of values (so that autocontrast and equalize have work to do)."""
    rng = np.random.default_rng(seed)
    x = np.repeat(np.repeat(rng.random((n, 8, 8, 3)), 4, 1), 4, 2) + rng.normal(0, 0.08, (n, 32, 32, 3))
    lo, hi = rng.uniform(0, 120, (n, 1, 1, 1)), rng.uniform(140, 255, (n, 1, 1, 1))
    return np.clip(lo + x * (hi - lo), 0, 255).astype(np.uint8)


def with_flat(x: np.ndarray) -> np.ndarray:
    """x plus a flat picture and one of two values (autocontrast and equalize keep a one-value channel)."""
    flat = np.full((1, 32, 32, 3), 77, np.uint8)
    two = np.where(np.arange(32)[None, None, :, None] < 12, 40, 200).repeat(32, 1).repeat(3, 3).astype(np.uint8)
    return np.concatenate([x, flat, two])


PICTURES = torch.from_numpy(with_flat(pictures(30)))


def magnitudes(op: str) -> list[float]:
    """Every signed magnitude TrivialAugment can draw for op, and RandAugment's at M = 0, 9, 20, 30."""
    i = POLICY_OPS.index(op)
    ms = {float(m) for m in policy_space("trivialaugment")[i]} | {float(policy_space("randaugment")[i, b])
                                                                  for b in (0, 9, 20, 30)}
    signed = TORCHVISION["trivialaugment"]._AUGMENTATION_SPACE[TV_NAMES[op]][1]
    return sorted(ms | ({-m for m in ms} if signed else set()))


def one_op(x: torch.Tensor, op: str, mag: float) -> torch.Tensor:
    """The torch backend's output (tb.augment) when every image of x (uint8 NHWC) drew op at mag."""
    n = len(x)
    params = policy_params(np.full((1, n), POLICY_OPS.index(op)), np.full((1, n), float(mag)))
    geometry = params.pop("geometry")
    p = {**draw(AugSpec(), n, batch_rng(0, 0, 0, 0)), **params,  # no other op: nothing moved, jittered or erased
         "moved": ~np.all(np.isclose(geometry, np.eye(3)), axis=(1, 2)), "affine": geometry[:, :2].astype(np.float32)}
    return tb.augment(x, p, AugSpec(policy="randaugment", ra_n=1))


def torchvision_op(x: torch.Tensor, op: str, m: float) -> torch.Tensor:
    """op at signed magnitude m as torchvision's TrivialAugmentWide / RandAugment apply it
    (transforms.v2.functional on uint8), with bilinear resampling and fill 0."""
    img, linear = x.permute(0, 3, 1, 2), InterpolationMode.BILINEAR
    shear = lambda sx, sy: TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[sx, sy], interpolation=linear,
                                     center=[0, 0])
    move = lambda tx, ty: TF.affine(img, angle=0.0, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0],
                                    interpolation=linear)
    out = {"identity": lambda: img,
           "shear_x": lambda: shear(math.degrees(math.atan(m)), 0.0),
           "shear_y": lambda: shear(0.0, math.degrees(math.atan(m))),
           "translate_x": lambda: move(int(m), 0),
           "translate_y": lambda: move(0, int(m)),
           "rotate": lambda: TF.rotate(img, m, interpolation=linear),
           "brightness": lambda: TF.adjust_brightness(img, 1 + m),
           "color": lambda: TF.adjust_saturation(img, 1 + m),
           "contrast": lambda: TF.adjust_contrast(img, 1 + m),
           "sharpness": lambda: TF.adjust_sharpness(img, 1 + m),
           "posterize": lambda: TF.posterize(img, int(m)),
           "solarize": lambda: TF.solarize(img, m),
           "autocontrast": lambda: TF.autocontrast(img)}[op]()
    return out.permute(0, 2, 3, 1)


# ---- the ops and their magnitudes, against torchvision

@pytest.mark.parametrize("policy", POLICIES)
def test_bins_and_signs_are_torchvisions(policy):
    """Each op's 31 magnitude bins and whether its sign is drawn are torchvision's at 32x32 (its
    TrivialAugmentWide and RandAugment augmentation spaces, as they are applied: translations in
    whole px, truncated; solarize at 255 times the magnitude)."""
    space = TORCHVISION[policy]._AUGMENTATION_SPACE
    ours = policy_space(policy)
    for i, op in enumerate(POLICY_OPS):
        fn, signed = space[TV_NAMES[op]]
        bins = fn(BINS, 32, 32)
        want = np.zeros(BINS) if bins is None else bins.double().numpy()  # None: the op has no magnitude
        got = ours[i]
        if op.startswith("translate"):  # applied as int(magnitude)
            want, got = np.trunc(want), np.trunc(got)
        if op == "solarize":  # applied as a threshold of 255 * magnitude
            want = 255 * want
        np.testing.assert_array_equal(got, want, err_msg=op)
        draws = draw(AugSpec(policy=policy, ra_m=30), 4000, batch_rng(0, 0, 0, 0))
        negative = draws["magnitude"][draws["policy"] == i] < 0
        assert negative.any() == (signed and op != "identity"), op


# |ours - torchvision| per op in levels of 255: (max, mean). Geometry: both bilinear with the same
# pixel-centre convention and fill 0, so only rounding ties differ (the mean is the fraction that
# does). Brightness, sharpness, autocontrast: torchvision truncates to uint8, fastcifar rounds.
# Colour and contrast also blend with torchvision's grey level truncated per pixel.
TOLERANCE = {"identity": (0, 0), "translate_x": (0, 0), "translate_y": (0, 0), "posterize": (0, 0), "solarize": (0, 0),
             "shear_x": (1, 1e-3), "shear_y": (1, 1e-3), "rotate": (1, 1e-3), "brightness": (1, 0.6),
             "sharpness": (1, 0.6), "autocontrast": (1, 0.6), "color": (2, 1.1), "contrast": (2, 1.1)}


@pytest.mark.parametrize("op", TOLERANCE)
def test_each_op_matches_torchvision(op):
    """Every magnitude of `magnitudes(op)`, on 32 pictures: the torch backend's output against
    torchvision's within TOLERANCE, and the op does change the pictures."""
    changed = False
    for m in magnitudes(op):
        ours, ref = one_op(PICTURES, op, m), torchvision_op(PICTURES, op, m)
        d = (ours.int() - ref.int()).abs()
        assert d.max() <= TOLERANCE[op][0] and d.float().mean() <= TOLERANCE[op][1] + 1e-9, \
            f"{op} at {m:.3f}: max {d.max()}, mean {d.float().mean():.4f}"
        changed |= not torch.equal(ours, PICTURES)
    assert changed == (op != "identity")


def opencv_equalize(channel: np.ndarray) -> np.ndarray:
    """OpenCV's equalizeHist of one uint8 channel, written out with numpy: lut[v] = round((cdf[v] -
    count of the lowest value) * s) with s = 255 / (pixels - that count), in float32, ties to even."""
    hist = np.bincount(channel.ravel(), minlength=256)
    lowest = hist[np.flatnonzero(hist)[0]]
    if lowest == channel.size:
        return channel
    scale = np.float32(255) / np.float32(channel.size - lowest)
    lut = np.clip(np.round((np.cumsum(hist) - lowest).astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return lut[channel]


def test_equalize_is_opencvs():
    """equalize is OpenCV's equalizeHist per channel (what DALI's fn.equalize computes), bit for
    bit; a one-value channel stays as it is, one of two values goes to 0 and 255."""
    x = PICTURES.numpy()
    ours = one_op(PICTURES, "equalize", 0).numpy()
    ref = np.stack([np.stack([opencv_equalize(img[..., c]) for c in range(3)], -1) for img in x])
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(ours[:-2], x[:-2]) and np.array_equal(ours[-2], x[-2])
    assert set(np.unique(ours[-1])) == {0, 255}


def test_opencv_reference_is_opencv():
    """The numpy reference above is cv2.equalizeHist itself (OpenCV is in the dev and bench extras)."""
    cv2 = pytest.importorskip("cv2")
    for img in PICTURES.numpy():
        for c in range(3):
            ch = np.ascontiguousarray(img[..., c])
            np.testing.assert_array_equal(opencv_equalize(ch), cv2.equalizeHist(ch))


def test_equalize_differs_from_torchvisions_by_design():
    """torchvision's equalize follows PIL (a lookup table from the cumulative count below each value,
    rounded by steps of pixels / 255); on 500 of these pictures the two differ by 5.9 levels on
    average, at most 66 (the README's figures): a known, bounded difference."""
    x = torch.from_numpy(pictures(500, seed=9))
    d = (one_op(x, "equalize", 0).int() - TF.equalize(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).int()).abs()
    assert 4.5 <= d.float().mean() <= 6.5 and d.max() <= 80


# ---- draws: uniform, N per image, from (seed, epoch, rank, batch), last in the stream

CHI2_001 = {13: 34.53, 30: 59.70}  # chi-square critical values at p = 0.001 by degrees of freedom


def chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("policy", POLICIES)
def test_draws_are_uniform(policy):
    """With a fixed seed, over 28000 ops: each of the 14 ops equally likely (chi-square at p=0.001),
    each sign of a signed op half the time, TrivialAugment's 31 bins equally likely and
    RandAugment always at bin M."""
    spec = AugSpec(policy=policy, ra_m=17)
    p = draw(spec, 28_000 // spec.policy_steps, batch_rng(0, 0, 0, 0))
    ops, mag = p["policy"], p["magnitude"]
    assert chi2(np.bincount(ops.ravel(), minlength=len(POLICY_OPS))) < CHI2_001[13]
    space = policy_space(policy)
    bins = []
    for i, op in enumerate(POLICY_OPS):
        m = mag[ops == i]
        if not space[i].any():
            assert (m == 0).all(), op
            continue
        if (m < 0).any():  # signed: each sign about half the time (4 standard deviations)
            assert abs((m < 0).mean() - 0.5) < 4 * 0.5 / math.sqrt(len(m)), op
        if policy == "randaugment":
            np.testing.assert_allclose(np.abs(m), space[i, 17], err_msg=op)
        elif (np.diff(space[i]) != 0).all():  # a ramp: the bin can be read back from the magnitude
            bins.append(np.abs(np.abs(m)[:, None] - space[i][None]).argmin(1))
    if policy == "trivialaugment":
        assert chi2(np.bincount(np.concatenate(bins), minlength=BINS)) < CHI2_001[30]


@pytest.mark.parametrize("n_ops", [1, 2, 3])
def test_randaugment_applies_exactly_n_ops(n_ops, tmp_path):
    """Each image gets N ops (drawn with replacement, identity among them): the loader's images
    equal each image put through its own N draws one op at a time (the colour ops in the order
    drawn, the geometric ops' maps multiplied in that order and applied as one warp), bit for bit."""
    spec = AugSpec(policy="randaugment", ra_n=n_ops, ra_m=20)
    src = pictures(40, seed=n_ops)
    loader = make_loader(ArrayStore(src, tmp_path), "train", spec, batch_size=40, backend="torch", seed=2)
    out = next(iter(loader))[0]
    p = draw(spec, 40, batch_rng(2, 0, 0, 0))
    assert p["policy"].shape == p["magnitude"].shape == (n_ops, 40)
    for i, row in enumerate(loader.batches(0)[0]):
        y, geometry = torch.from_numpy(src[row:row + 1]), np.eye(3)
        for op, m in zip(p["policy"][:, i], p["magnitude"][:, i]):
            single = policy_params(np.array([[op]]), np.array([[m]]))
            geometry = geometry @ single.pop("geometry")[0]
            code = COLOUR_STEPS[single["op0"][0]]
            if code != "none":
                f, args = tb.POLICY_COLOUR[code]
                y = f(y, *(torch.from_numpy(single[f"{a}0"]) for a in args))
        if not np.allclose(geometry, np.eye(3)):
            y = tb.warp(y, torch.from_numpy(tb.theta(geometry[None, :2].astype(np.float32))))
        np.testing.assert_array_equal(as_uint8_nhwc(out[i:i + 1]), y.numpy(), err_msg=f"image {i}")


def test_policy_draws_come_last():
    """Switching a policy on changes no other draw (they come first in the stream): only the
    geometry, which gains the policy's map after the crop, flips and shift-scale-rotate."""
    base = dict(pad_crop=4, hflip=0.5, vflip=0.2, ssr_p=0.3, jitter_p=0.5, erase_p=0.5)
    rng = lambda: batch_rng(1, 2, 0, 3)
    a, b = draw(AugSpec(**base), 100, rng()), draw(AugSpec(**base, policy="randaugment"), 100, rng())
    for key in a:
        if key not in ("affine", "moved", "warp"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    geometry = policy_params(b["policy"], b["magnitude"])["geometry"]
    full = np.concatenate([a["affine"], np.tile([[[0, 0, 1]]], (100, 1, 1))], 1)
    np.testing.assert_allclose(b["affine"], (full @ geometry)[:, :2], atol=1e-4)


def test_policy_geometry_always_warps():
    """An image whose policy moves it takes the warp branch even when its crop undoes the move
    (the whole-pixel branch knows only the crop and flips: DALI once shifted such an image by its
    crop). Such images do occur in 20000 draws."""
    spec = AugSpec(policy="randaugment", pad_crop=4)
    p = draw(spec, 20_000, batch_rng(0, 0, 0, 0))
    geometry = policy_params(p["policy"], p["magnitude"])["geometry"]
    bent = ~np.all(np.isclose(geometry, np.eye(3), atol=1e-9), axis=(1, 2))
    assert p["warp"][bent].all() and bent.mean() > 0.5
    undone = bent & np.all(np.isclose(p["affine"], np.eye(3)[:2], atol=1e-6), axis=(1, 2))
    assert undone.sum() >= 3


@pytest.mark.parametrize("backend", BATCHED)
@pytest.mark.parametrize("policy", POLICIES)
def test_draws_change_per_epoch_and_resume_exactly(backend, policy, tmp_path):
    """The same rows (shuffle off) get other ops in another epoch and with another seed; an epoch
    resumed at batch 3 (set_epoch(epoch, start_batch=3)) gives that epoch's batches 3.. exactly."""
    spec = AugSpec(policy=policy, pad_crop=2)
    store = ArrayStore(pictures(300, seed=4), tmp_path)
    loader = make_loader(store, "train", spec, batch_size=50, backend=backend, seed=7, shuffle=False)
    epoch = lambda e, start=0: (loader.set_epoch(e, start), [x for x, _ in loader])[1]
    one, two = epoch(1), epoch(2)
    assert len(one) == 6
    differ = (torch.cat(one) != torch.cat(two)).flatten(1).any(1).float().mean().item()
    assert differ > 0.9, f"only {differ:.0%} of the images differ between epochs 1 and 2"
    rest = epoch(1, start=3)
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, one[3:]))
    other = make_loader(store, "train", spec, batch_size=50, backend=backend, seed=8, shuffle=False)
    other.set_epoch(1)
    assert not torch.equal(next(iter(other))[0], one[0])
    ops = lambda seed, e: draw(spec, 50, batch_rng(seed, e, 0, 0))["policy"]
    assert not np.array_equal(ops(7, 1), ops(7, 2)) and not np.array_equal(ops(7, 1), ops(8, 1))


# ---- DALI and torch: the same images

@needs_dali
@pytest.mark.parametrize("spec", [AugSpec(policy="trivialaugment", pad_crop=4, hflip=0.5),
                                  AugSpec(policy="randaugment", pad_crop=4, hflip=0.5),
                                  AugSpec(policy="randaugment", ra_n=3, ra_m=30)], ids=["ta", "ra", "ra-n3-m30"])
def test_dali_matches_torch(spec, tmp_path):
    """600 pictures, every op drawn and (with a crop) an image whose policy translation undoes its
    crop: DALI's graph gives torch's images within 1/255 at 32 px. Images that do not warp
    (colour ops, whole-pixel crops and flips) agree bit for bit; in warped ones the two bilinear
    warps round near-halves either way (DALI's weights are good to about 0.006, measured, and fixed
    shears put many samples exactly halfway): at most 2% of values. (The policy's colour ops run
    before the warp, so no such tie reaches a solarize threshold.)"""
    def batches(seed):
        p = [draw(spec, 200, batch_rng(seed, 0, 0, b)) for b in range(3)]
        ops, warp = np.concatenate([q["policy"] for q in p], 1), np.concatenate([q["warp"] for q in p])
        undone = warp & np.all(np.isclose(np.concatenate([q["affine"] for q in p]), np.eye(3)[:2], atol=1e-6), (1, 2))
        return ops, warp, set(ops.ravel()) == set(range(len(POLICY_OPS))) and (undone.any() or not spec.pad_crop)

    seed = next(s for s in range(100) if batches(s)[2])
    ops, warp, _ = batches(seed)
    src = pictures(600, seed=1)
    outs = {}
    for backend in ("torch", "dali"):
        loader = make_loader(ArrayStore(src, tmp_path), "train", spec, batch_size=200, backend=backend, seed=seed)
        outs[backend] = np.concatenate([as_uint8_nhwc(x) for x, _ in loader]).astype(int)
    d = np.abs(outs["torch"] - outs["dali"])
    assert d.max() <= 1, f"max {d.max()}/255"
    assert (d[~warp] == 0).all() and (~warp).sum() > 50
    assert (d[warp] > 0).mean() <= 0.02, f"{(d[warp] > 0).mean():.2%} of warped values differ"


COLOUR_OPS = ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")


@needs_dali
def test_dali_colour_ops_are_torchs_one_by_one(monkeypatch, tmp_path):
    """Each colour op alone, at a spread of its magnitudes (both signs) from smallest to largest,
    on the pictures plus a one-value and a two-value picture (the cases autocontrast and equalize
    must keep or stretch exactly): DALI's graph gives torch's images bit for bit. The graph's draws
    are made to pick that op for every image, so no op hides behind another or behind a warp."""
    from fastcifar.pipelines import dali as pd

    ms = {op: magnitudes(op) for op in COLOUR_OPS}  # about 10 of each op's, posterize's 7 all
    combos = [(op, m) for op in COLOUR_OPS for m in sorted(set(ms[op][::len(ms[op]) // 8 + 1]) | {max(ms[op])})]
    n = len(PICTURES)
    real = pd.draw

    def forced(spec, size, rng):  # the real draws, with step 0 of image i set to its combo
        p = real(spec, size, rng)
        ops = np.repeat([POLICY_OPS.index(op) for op, _ in combos], n)[None]
        params = policy_params(ops, np.repeat([m for _, m in combos], n)[None].astype(float))
        params.pop("geometry")  # colour ops only: nothing moves
        return {**p, **params, "warp": np.zeros(size, bool)}

    monkeypatch.setattr(pd, "draw", forced)
    src = np.tile(PICTURES.numpy(), (len(combos), 1, 1, 1))
    loader = make_loader(ArrayStore(src, tmp_path), "train", AugSpec(policy="randaugment", ra_n=1), len(src),
                         backend="dali", shuffle=False)
    out = as_uint8_nhwc(next(iter(loader))[0])
    for i, (op, m) in enumerate(combos):
        np.testing.assert_array_equal(out[i * n:(i + 1) * n], one_op(PICTURES, op, m).numpy(), err_msg=f"{op} at {m}")


# ---- policy none, bad input, the tutorial path, TF32, the CLI

def test_policy_none_is_the_output_before_policies():
    """Policy none (the default) gives exactly what fastcifar gave before policies existed (the
    batches pinned in tests/data by tests/golden_aug.py): the draws, torch's images and, where DALI
    imports, DALI's, bit for bit, for crop+flip, OneOf and every other op."""
    want = np.load(golden_aug.FILE)
    got = golden_aug.batches(("torch", "dali") if dali_available() else ("torch",))
    assert {k for k in want.files if not k.endswith("/dali")} <= set(got) <= set(want.files)
    for key, a in got.items():
        np.testing.assert_array_equal(a, want[key], err_msg=key)


@pytest.mark.parametrize("field,value,says", [
    ("policy", "autoaugment", "must be one of none, trivialaugment, randaugment"), ("policy", "", "must be one of"),
    ("ra_n", 0, r"whole number in 1\.\.10"), ("ra_n", 11, r"1\.\.10"), ("ra_n", 2.0, "whole number"),
    ("ra_m", 31, r"whole number in 0\.\.30"), ("ra_m", -1, r"0\.\.30"), ("ra_m", True, "whole number")])
def test_bad_values(field, value, says):
    with pytest.raises(BadInput, match=rf"aug\.{field} = .*{says}"):
        AugSpec(**{field: value}).validate()


def test_policy_and_oneof_exclude_each_other():
    """Two policies on one image is no policy anyone asked for: a spec takes OneOf or aug.policy."""
    with pytest.raises(BadInput, match=r"cannot run beside the OneOf policy.*aug\.oneof_p=0"):
        AugSpec(policy="trivialaugment", **tutorial_oneof(1.0)).validate()
    AugSpec(policy="trivialaugment", **tutorial_oneof(0.0)).validate()  # OneOf listed but off: fine
    assert AugSpec(policy="trivialaugment").augments and AugSpec(policy="randaugment", ra_n=3).policy_steps == 3


def test_tutorial_path(store, monkeypatch, tmp_path):
    """The tutorial's albumentations path has no policy: a training loader asking for one is
    refused clearly (an evaluation loader runs no augmentation and is fine); its torch fallback
    runs the policy one image at a time."""
    spec = AugSpec(policy="randaugment", ra_m=30)
    monkeypatch.setattr("fastcifar.pipelines.tutorial.albumentations_available", lambda: True)
    with pytest.raises(BadInput, match=r"backend 'tutorial' runs albumentations.*no TrivialAugment or RandAugment"):
        make_loader(store, "train", spec, 50, backend="tutorial")
    make_loader(store, "test", spec, 50, backend="tutorial")
    monkeypatch.setattr("fastcifar.pipelines.tutorial.albumentations_available", lambda: False)
    src = pictures(60, seed=5)
    loader = make_loader(ArrayStore(src, tmp_path), "train", spec, 60, backend="tutorial", seed=1)
    out = as_uint8_nhwc(next(iter(loader))[0])
    assert out.shape == (60, 32, 32, 3) and (out != src[loader.batches(0)[0]]).any(axis=(1, 2, 3)).mean() > 0.8


def test_policy_ops_run_no_matmul(tmp_path):
    """No op of the policies is a matmul or convolution (the sharpness blur is shifted adds), so
    TF32 cannot change their images: every op recorded over a batch where all 14 were drawn."""
    spec = AugSpec(policy="randaugment", ra_n=3, ra_m=30, pad_crop=2)
    loader = make_loader(ArrayStore(pictures(200, seed=6), tmp_path), "train", spec, 200, backend="torch", seed=1)
    assert set(draw(spec, 200, batch_rng(1, 0, 0, 0))["policy"].ravel()) == set(range(len(POLICY_OPS)))
    with OpRecorder() as rec:
        next(iter(loader))
    assert {"scatter_add_", "gather", "amin", "grid_sampler_2d", "floor_"} <= rec.ops  # it did record the policy's work
    assert not [op for op in rec.ops if MATMUL_OPS.search(op)], sorted(rec.ops)


def test_cli_sets_the_policy_and_recipe_json_keeps_it(store, tmp_path):
    """`--set aug.policy=randaugment --set aug.ra_n=3` trains (a few steps of smoke) and lands in
    recipe.json; a bad value exits 2 with the one-paragraph message, no traceback."""
    run = tmp_path / "run"
    base = ["train", "smoke", "--data-dir", store.dir, "--set", "data.subset=1", "--set", "data.test_subset=1",
            "--set", "train.epochs=1", "--set", "data.backend=torch"]
    code, _, err = cli(*base, "--out", run, "--set", "aug.policy=randaugment", "--set", "aug.ra_n=3")
    assert code == 0, err[-2000:]
    aug = json.loads((run / "recipe.json").read_text())["aug"]
    assert (aug["policy"], aug["ra_n"], aug["ra_m"]) == ("randaugment", 3, 9)
    assert json.loads((run / "summary.json").read_text())["finished"]
    code, _, err = cli(*base, "--out", tmp_path / "bad", "--set", "aug.ra_m=31")
    assert code == 2 and "aug.ra_m = 31: must be a whole number in 0..30" in err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()
