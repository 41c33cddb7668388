"""MixUp / CutMix: soft targets that match the pixels, the same mix on both KD views, seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcifar.pipelines.mix import mix
from fastcifar.pipelines.spec import AugSpec

N, C = 16, 20


def _batch(size=32):
    """Image i is the constant i / N (channels_last) and has label i: a pixel's value says whose it is."""
    values = torch.arange(N, dtype=torch.float32) / N
    x = values.view(N, 1, 1, 1).expand(N, 3, size, size).contiguous(memory_format=torch.channels_last)
    return x, torch.arange(N), values


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_off_is_one_hot():
    x, y, _ = _batch()
    for spec in (AugSpec(), AugSpec(mixup_alpha=1.0, mix_p=0.0)):
        out, t = mix(x, y, spec, C, _gen())
        assert out is x and torch.equal(t, F.one_hot(y, C).float())


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_targets_match_pixels(mode):
    """Each image's mean pixel equals targets @ (class value), so the label weights are exactly the
    share of each source image (MixUp: blend weight; CutMix: pixel area kept). Tolerance 1e-5."""
    x, y, values = _batch()
    spec = AugSpec(**{f"{mode}_alpha": 1.0})
    out, t = mix(x, y, spec, C, _gen(3))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert t.shape == (N, C) and torch.allclose(t.sum(1), torch.ones(N))
    assert (t.max(1).values < 1).any(), "nothing was mixed"
    class_value = torch.zeros(C)
    class_value[:N] = values
    torch.testing.assert_close(out.mean((1, 2, 3)), t @ class_value, atol=1e-5, rtol=0)
    if mode == "cutmix":  # pixels come whole from one of two images: a pasted rectangle
        pasted = out[0, 0] != x[0, 0]
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        if len(rows):
            box = pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all(), "CutMix pasted region is not a rectangle"


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_two_views_same_mix(mode):
    """With (32, 64) views, both get the same partners and weight; CutMix's box is the same in relative
    coordinates (within 1 px of the 64 view from rounding each view's box to whole pixels)."""
    (a, y, _), (b, _, _) = _batch(32), _batch(64)
    spec = AugSpec(**{f"{mode}_alpha": 1.0})
    (oa, ob), t = mix((a, b), y, spec, C, _gen(5))
    if mode == "mixup":
        torch.testing.assert_close(oa.mean((1, 2, 3)), ob.mean((1, 2, 3)), atol=1e-6, rtol=0)
    else:
        ma = (oa != a)[:, 0].float()
        mb = (ob != b)[:, 0].float()
        up = F.interpolate(ma[:, None], scale_factor=2, mode="nearest")[:, 0]
        assert (up != mb).sum(dim=(1, 2)).max() <= 2 * 64, "boxes differ by more than a 1 px border"
        assert ma.sum() > 0


def test_seeded_and_both_modes():
    """Same generator seed, same mix; with both alphas on, batches pick MixUp or CutMix."""
    x, y, _ = _batch()
    spec = AugSpec(mixup_alpha=0.4, cutmix_alpha=1.0)
    a, ta = mix(x, y, spec, C, _gen(7))
    b, tb = mix(x, y, spec, C, _gen(7))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    kinds = set()
    for seed in range(20):
        out, _ = mix(x, y, spec, C, _gen(seed))
        # CutMix leaves whole pixels of one image; MixUp blends them into new values
        kinds.add("cutmix" if torch.isin(out[:, 0], x[:, 0, 0, 0]).all() else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_cutmix_box_covers_one_minus_lam_and_stays_in_the_image():
    """The box's side is sqrt(1 - lam) of the image's, so an unclipped box covers 1 - lam of it; a
    box that would cross an edge is clipped to [0, 1] (its area is then less)."""
    import numpy as np

    from fastcifar.pipelines.mix import cutmix_box

    rng, inside, clipped = np.random.default_rng(0), 0, 0
    for lam in np.linspace(0.05, 0.95, 200):
        y0, x0, y1, x1 = cutmix_box(float(lam), rng)
        assert 0.0 <= y0 <= y1 <= 1.0 and 0.0 <= x0 <= x1 <= 1.0
        side = (1 - lam) ** 0.5
        if y1 - y0 < side - 1e-9 or x1 - x0 < side - 1e-9:
            clipped += 1
        else:
            inside += 1
            assert (y1 - y0) * (x1 - x0) == pytest.approx(1 - lam)
    assert inside > 20 and clipped > 20


def test_cutmix_targets_match_pixels_for_every_draw_and_follow_the_first_view():
    """Over many draws (boxes clipped at the edges included) each image's mean pixel equals its
    targets' share; with two views the targets follow the first (student) view's pixels exactly,
    whose whole-pixel rounding differs from the second's."""
    (a, y, values), (b, _, _) = _batch(8), _batch(13)
    class_value = torch.zeros(C)
    class_value[:N] = values
    differs = 0
    for seed in range(30):
        (oa, ob), t = mix((a, b), y, AugSpec(cutmix_alpha=1.0), C, _gen(seed))
        torch.testing.assert_close(oa.mean((1, 2, 3)), t @ class_value, atol=1e-5, rtol=0)
        differs += not torch.allclose(ob.mean((1, 2, 3)), t @ class_value, atol=1e-5)
        out, t1 = mix(a, y, AugSpec(cutmix_alpha=1.0), C, _gen(seed))
        torch.testing.assert_close(out.mean((1, 2, 3)), t1 @ class_value, atol=1e-5, rtol=0)
    assert differs > 5  # the second view's rounding really keeps other areas


def test_with_both_on_each_mode_draws_lam_with_its_own_alpha():
    """mixup_alpha = 50 puts MixUp's lam near 0.5; cutmix_alpha = 0.1 puts CutMix's near 0 or 1, so
    often a box too small to cut a pixel (kept area > 0.95), which CutMix at alpha 50 (a box of
    side about 0.7, kept area 0.5 to 0.9) never gives."""
    x, y, _ = _batch()
    spec = AugSpec(mixup_alpha=50.0, cutmix_alpha=0.1)
    spread = {"mixup": [], "cutmix": []}
    for seed in range(40):
        out, t = mix(x, y, spec, C, _gen(seed))
        kind = "cutmix" if torch.isin(out[:, 0], x[:, 0, 0, 0]).all() else "mixup"
        lam = t[torch.arange(N), y].median().item()  # own-label weight (a partner that is itself: 1)
        spread[kind].append(abs(lam - 0.5))
    assert len(spread["mixup"]) >= 5 and len(spread["cutmix"]) >= 5
    assert max(spread["mixup"]) < 0.2
    assert sum(s > 0.45 for s in spread["cutmix"]) >= 3
