"""MixUp / CutMix: soft targets that match the pixels, the same mix on both KD views, seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.mix import mix
from pipelines.spec import AugSpec

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
