"""The loader contract on every backend: shapes, dtypes, memory format, order, seeds, shards,
evaluation coverage, pure resize with augmentation off, two KD views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcifar.errors import BadInput
from helpers import BACKENDS, BATCHED, stored
from fastcifar.pipelines import AugSpec, make_loader
from fastcifar.pipelines.loader import dali_available
from fastcifar.pipelines.spec import tutorial_oneof


def _collect(loader, epoch=0):
    loader.set_epoch(epoch)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,dtype", [(32, "float32"), (48, "bfloat16"), (64, "float16")])
def test_shapes_dtypes_layout(store, backend, size, dtype):
    spec = AugSpec(image_size=size, dtype=dtype, pad_crop=4, hflip=0.5)
    loader = make_loader(store, "train", spec, batch_size=64, backend=backend, seed=1)
    assert len(loader) == len(store.labels("train")) // 64 and loader.num_samples == len(loader) * 64
    assert loader.backend.split("-")[0] == backend
    xs, ys = _collect(loader)
    assert len(xs) == len(loader)
    for x, y in zip(xs, ys):
        assert x.shape == (64, 3, size, size) and x.dtype == getattr(torch, dtype)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (64,) and y.dtype == torch.int64
        assert x.device.type == "cpu" and y.device.type == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_aug_off_epoch_is_the_store(store, backend):
    """With augmentation off (spec has no random op) a shuffled epoch holds each image exactly once,
    equal to the store (x / 255 at 32, exact up to float32 rounding) with its label."""
    n = len(store.labels("train"))
    loader = make_loader(store, "train", AugSpec(), batch_size=50, backend=backend, seed=3, drop_last=False)
    xs, ys = _collect(loader, epoch=2)
    rows = np.concatenate(loader.batches(2))
    assert sorted(rows) == list(range(n)) and list(rows) != list(range(n))  # a permutation, not the identity
    x, y = torch.cat(xs), torch.cat(ys)
    np.testing.assert_array_equal(y.numpy(), store.labels("train")[rows])
    np.testing.assert_allclose(x.numpy(), stored(store, "train", rows), atol=1e-6)


@pytest.mark.parametrize("backend", BATCHED)
def test_a_spec_with_no_random_op_draws_nothing(store, backend, monkeypatch):
    """A training loader whose spec has no random op is the pure resize of the store: it makes no
    augmentation draws (host work per batch) for images that no draw could change."""
    def refuse(*_):
        raise AssertionError("drew augmentation for a spec with no random op")

    monkeypatch.setattr(f"fastcifar.pipelines.{'dali' if backend == 'dali' else 'torch_backend'}.draw", refuse)
    loader = make_loader(store, "train", AugSpec(), batch_size=100, backend=backend, seed=1)
    assert len(list(loader)) == len(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_matches_reference(store, backend):
    """At 64 and 224 the evaluation loader equals a float bilinear resize (torch, align_corners=False)
    of the stored images within 1/255 + 1e-6 (DALI and torch resize floats; the tutorial path uint8)."""
    for size in (64, 224):
        loader = make_loader(store, "test", AugSpec(image_size=size), batch_size=100, backend=backend)
        x = torch.cat(_collect(loader)[0][:1])
        src = torch.from_numpy(np.array(store.images("test")[:len(x)])).permute(0, 3, 1, 2).float()
        ref = F.interpolate(src, size=(size, size), mode="bilinear", align_corners=False) / 255
        err = (x.float() - ref).abs().max().item()
        assert err <= 1 / 255 + 1e-6, f"{backend} resize to {size} is {err * 255:.2f}/255 from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_covers_every_image_once(store, backend):
    """Evaluation never pads or drops: shards together give each test image exactly once, and the
    last batch is smaller. Order is the store's (shuffle defaults off for evaluation)."""
    n = len(store.labels("test"))
    seen = []
    for rank in range(3):
        loader = make_loader(store, "test", AugSpec(), batch_size=32, backend=backend, shard=(rank, 3))
        xs, ys = _collect(loader)
        assert sum(len(y) for y in ys) == loader.num_samples
        rows = np.concatenate(loader.batches())
        np.testing.assert_array_equal(torch.cat(ys).numpy(), store.labels("test")[rows])
        np.testing.assert_allclose(torch.cat(xs).numpy(), stored(store, "test", rows), atol=1e-6)
        seen.append(rows)
    allrows = np.concatenate(seen)
    assert sorted(allrows) == list(range(n)) and list(allrows) == list(range(n))


def test_train_shards_disjoint_and_equal(store):
    n = len(store.labels("train"))
    for epoch in (0, 5):
        shards = []
        for rank in range(3):
            loader = make_loader(store, "train", AugSpec(), batch_size=16, backend="torch", seed=7, shard=(rank, 3))
            shards.append(np.concatenate(loader.batches(epoch)))
        assert len({len(s) for s in shards}) == 1, "training shards must be equally long"
        assert len(np.unique(np.concatenate(shards))) == sum(len(s) for s in shards), "shards overlap"
        assert len(shards[0]) == (n // 3) // 16 * 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches(store, backend):
    """Order and augmentation are functions of (seed, epoch): two loaders agree batch for batch,
    another epoch or seed differs, and shuffle=False keeps the store's order."""
    spec = AugSpec(pad_crop=4, hflip=0.5, **tutorial_oneof(1.0))
    make = lambda seed, **kw: make_loader(store, "train", spec, batch_size=100, backend=backend, seed=seed, **kw)
    a, b = make(5), make(5)
    xa, ya = _collect(a, epoch=1)
    xb, yb = _collect(b, epoch=1)
    for p, q in zip(xa + ya, xb + yb):
        assert torch.equal(p, q)
    xc, _ = _collect(b, epoch=2)
    assert not torch.equal(xa[0], xc[0])
    assert not np.array_equal(make(6).batches(1)[0], a.batches(1)[0])
    fixed = make(5, shuffle=False)
    assert list(np.concatenate(fixed.batches(3))) == list(range(fixed.num_samples))


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_are_one_draw(store, backend):
    """sizes=(32, 96): both views come from one augmentation draw, so the 96 view equals the 32 view
    resized (bilinear) within 1/255 + 1e-3 (the 32 view is exact uint8 / 255)."""
    spec = AugSpec(pad_crop=4, hflip=0.5, **tutorial_oneof(1.0))
    loader = make_loader(store, "train", spec, batch_size=50, backend=backend, seed=2, sizes=(32, 96))
    (small, big), _ = next(iter(loader))
    assert small.shape[-1] == 32 and big.shape[-1] == 96
    ref = F.interpolate(small.float() * 255, size=(96, 96), mode="bilinear", align_corners=False) / 255
    err = (big.float() - ref).abs().max().item()
    assert err <= 1 / 255 + 1e-3, f"the 96 view is {err * 255:.2f}/255 from the 32 view resized"


def test_bad_input(store):
    with pytest.raises(BadInput, match="split"):
        make_loader(store, "val", AugSpec(), 10, backend="torch")
    with pytest.raises(BadInput, match="backend"):
        make_loader(store, "train", AugSpec(), 10, backend="jax")
    with pytest.raises(BadInput, match="shard"):
        make_loader(store, "train", AugSpec(), 10, backend="torch", shard=(3, 3))
    with pytest.raises(BadInput, match="no batch; lower data.batch_size or set data.drop_last=false"):
        make_loader(store, "train", AugSpec(), 10_000, backend="torch")
    with pytest.raises(BadInput, match="drop_last"):
        make_loader(store, "test", AugSpec(), 10, backend="torch", drop_last=True)
    with pytest.raises(BadInput, match="aug.hflip"):
        make_loader(store, "train", AugSpec(hflip=2.0), 10, backend="torch")
    with pytest.raises(BadInput, match="indices"):
        make_loader(store, "train", AugSpec(), 10, backend="torch", indices=[0, 0, 1])


# each AugSpec range, refused just past its bound and accepted at it (a dropped or loosened check
# would let the value through to a backend, where it fails obscurely or silently does something else)
SPEC_BOUNDS = [
    ("image_size", 7, 8, "at least 8 px"), ("image_size", 1025, 1024, "at most 1024 px"),
    ("pad_crop", -1, 0, ">= 0"), ("mix_p", 1.01, 1.0, "probability"), ("erase_p", -0.1, 0.0, "probability"),
    ("vflip", 1.5, 1.0, "probability"), ("hue", 0.51, 0.5, r"\[0, 0\.5\] turns"), ("hue", -0.1, 0.0, "turns"),
    ("cutmix_alpha", -1.0, 0.0, ">= 0"), ("ssr_degrees", -1.0, 0.0, ">= 0"), ("saturation", -0.5, 0.0, ">= 0"),
    ("rrc_scale", (0.5, 0.4), (0.4, 0.4), "lo <= hi"), ("rrc_scale", (0.0, 0.5), (0.01, 1.0), "0 < lo"),
    ("rrc_scale", (0.5, 1.2), (0.5, 1.0), "hi <= 1"), ("erase_holes", (0, 2), (1, 1), "1 <= lo"),
    ("erase_holes", (3, 2), (2, 2), "lo <= hi"), ("erase_size", (0.0, 0.2), (0.01, 1.0), "0 < lo"),
    ("erase_size", (0.3, 0.2), (0.2, 0.2), "lo <= hi"), ("erase_fill", 256, 255, "0..255"),
    ("erase_fill", -1, 0, "0..255"), ("oneof", ("hflip", "blur"), ("hflip", "vflip"), "unknown op 'blur'"),
    ("interpolation", "nearest", "cubic", "one of linear, cubic"), ("normalize", "minmax", "imagenet", "one of"),
    ("dtype", "int8", "float16", "one of"),
    # the rest of the probabilities and non-negative ranges, one each
    ("hflip", -0.5, 1.0, "probability"), ("ssr_p", 1.5, 0.0, "probability"), ("jitter_p", 2.0, 1.0, "probability"),
    ("oneof_p", -1.0, 1.0, "probability"), ("brightness", -0.1, 0.0, ">= 0"), ("contrast", -0.1, 0.0, ">= 0"),
    ("ssr_shift", -0.1, 0.0, ">= 0"), ("ssr_scale", -0.1, 0.0, ">= 0"), ("mixup_alpha", -0.1, 0.0, ">= 0"),
]


@pytest.mark.parametrize("field,bad,good,says", SPEC_BOUNDS, ids=[f"{f}={b}" for f, b, _, _ in SPEC_BOUNDS])
def test_aug_spec_refuses_each_out_of_range_field_and_takes_its_bound(field, bad, good, says):
    with pytest.raises(BadInput, match=rf"aug\.{field} = .*{says}"):
        AugSpec(**{field: bad}).validate()
    AugSpec(**{field: good}).validate()


def test_aug_spec_crops_exclude_each_other_and_every_op_counts_as_augmenting():
    with pytest.raises(BadInput, match=r"aug\.pad_crop = 4: pad-and-crop and random resized crop exclude each other"):
        AugSpec(pad_crop=4, rrc_scale=(0.35, 1.0)).validate()
    assert not AugSpec().augments and not AugSpec(oneof=("hflip",), oneof_p=0.0).augments
    for on in [dict(pad_crop=4), dict(rrc_scale=(0.35, 1.0)), dict(hflip=0.5), dict(vflip=0.5), dict(ssr_p=0.5),
               dict(jitter_p=0.5), dict(erase_p=0.5), tutorial_oneof(0.5), dict(policy="trivialaugment")]:
        assert AugSpec(**on).augments, on  # a spec that augments must not be taken for a pure resize


def test_mean_std_for_each_normalize():
    from types import SimpleNamespace

    from fastcifar.pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, mean_std

    assert mean_std(AugSpec()) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert mean_std(AugSpec(normalize="imagenet")) == (IMAGENET_MEAN, IMAGENET_STD)
    assert IMAGENET_MEAN[0] == 0.485 and IMAGENET_STD[0] == 0.229
    store = SimpleNamespace(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    assert mean_std(AugSpec(normalize="cifar"), store) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    with pytest.raises(BadInput, match="needs the store's mean/std"):
        mean_std(AugSpec(normalize="cifar"))


def test_indices_subset(store):
    """indices picks rows of the split (a train/validation partition)."""
    val = np.arange(0, 120, 3)
    loader = make_loader(store, "train", AugSpec(), 16, backend="torch", indices=val, augment=False)
    xs, ys = _collect(loader)
    np.testing.assert_array_equal(torch.cat(ys).numpy(), store.labels("train")[val])
    assert sum(len(y) for y in ys) == len(val)


def test_auto_is_dali_where_it_imports(store, monkeypatch):
    loader = make_loader(store, "test", AugSpec(), 50, backend="auto")
    assert loader.backend == ("dali-cpu" if dali_available() else "torch")
    monkeypatch.setattr("fastcifar.pipelines.loader.dali_available", lambda: False)  # a machine without DALI
    assert make_loader(store, "test", AugSpec(), 50, backend="auto").backend == "torch"
    with pytest.raises(BadInput, match="needs NVIDIA DALI"):
        make_loader(store, "test", AugSpec(), 50, backend="dali")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["cifar", "imagenet"])
def test_normalisation_values(store, backend, normalize):
    """normalize='cifar' is (x/255 - mean)/std with meta.json's mean and std, 'imagenet' with the
    published ImageNet ones; the reference is computed here in float64, from the stored uint8
    images, not through the helper the backends share. float32 leaves errors near 1e-6."""
    if normalize == "cifar":
        meta = json.loads((Path(store.dir) / "meta.json").read_text())
        mean, std = np.array(meta["mean"]), np.array(meta["std"])
    else:
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    loader = make_loader(store, "test", AugSpec(normalize=normalize), batch_size=100, backend=backend)
    x, _ = next(iter(loader))
    src = np.array(store.images("test")[:100], dtype=np.float64)
    ref = ((src / 255 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_and_order_change_with_the_epoch(store, backend):
    """In a fixed order (shuffle=False) the same rows come in epochs 0 and 1, but with other crops
    and flips; shuffled, the order itself changes per epoch, and the labels follow the rows."""
    spec = AugSpec(pad_crop=4, hflip=0.5)
    fixed = make_loader(store, "train", spec, batch_size=100, backend=backend, seed=4, shuffle=False)
    (x0, y0), (x1, y1) = (_collect(fixed, epoch) for epoch in (0, 1))
    np.testing.assert_array_equal(np.concatenate(fixed.batches(0)), np.concatenate(fixed.batches(1)))
    assert torch.equal(torch.cat(y0), torch.cat(y1))
    moved = (torch.cat(x0) != torch.cat(x1)).flatten(1).any(1).float().mean().item()
    assert moved > 0.9, f"only {moved:.0%} of the images got another crop or flip in epoch 1"  # 1/162 stay alike

    shuffled = make_loader(store, "train", spec, batch_size=100, backend=backend, seed=4)
    rows = []
    for epoch in (0, 1):
        _, ys = _collect(shuffled, epoch)
        rows.append(np.concatenate(shuffled.batches(epoch)))
        np.testing.assert_array_equal(torch.cat(ys).numpy(), store.labels("train")[rows[-1]])
    assert not np.array_equal(rows[0], rows[1])


def test_loader_inputs_refused_at_their_bounds(store):
    """indices past the split's end, an output side under 8 px and a batch of 0 are BadInput at
    make_loader (each otherwise fails deep in a backend, or divides by zero)."""
    n = len(store.labels("train"))
    with pytest.raises(BadInput, match=rf"within 0\.\.{n - 1}"):
        make_loader(store, "train", AugSpec(), 10, backend="torch", indices=[0, n])
    make_loader(store, "train", AugSpec(), 10, backend="torch", indices=[0, n - 1], augment=False)
    with pytest.raises(BadInput, match="at least 8 px"):
        make_loader(store, "train", AugSpec(), 10, backend="torch", sizes=(32, 7))
    make_loader(store, "train", AugSpec(), 10, backend="torch", sizes=(32, 8))
    with pytest.raises(BadInput, match="batch_size = 0"):
        make_loader(store, "train", AugSpec(), 0, backend="torch")
    with pytest.raises(BadInput, match=r"shard=\(2, 2\)"):
        make_loader(store, "test", AugSpec(), 10, backend="torch", shard=(2, 2))
    make_loader(store, "test", AugSpec(), 10, backend="torch", shard=(1, 2))


def test_each_epoch_has_its_own_order_and_batches_names_an_epoch(store):
    """The shuffle is a function of (seed, epoch): epochs differ in order, not only in augmentation
    draws; batches(e) is epoch e's order whatever set_epoch last chose; with drop_last=False a
    training loader keeps the short last batch."""
    loader = make_loader(store, "train", AugSpec(), batch_size=64, backend="torch", seed=4)
    assert not np.array_equal(np.concatenate(loader.batches(1)), np.concatenate(loader.batches(2)))
    loader.set_epoch(1)
    two = loader.batches(2)
    loader.set_epoch(2)
    assert all(np.array_equal(a, b) for a, b in zip(two, loader.batches()))
    n = len(store.labels("train"))
    assert n % 64, "the store must not be a multiple of the batch for the short last batch to exist"
    keep = make_loader(store, "train", AugSpec(), batch_size=64, backend="torch", seed=4, drop_last=False)
    assert (len(keep), keep.num_samples) == (-(-n // 64), n)
    assert sorted(np.concatenate(keep.batches(0))) == list(range(n))


def test_an_evaluation_batch_never_outgrows_its_shard(store):
    """batch_size above the shard's images is cut to it (the same batches; no giant DALI buffer)."""
    n = len(store.labels("test"))
    loader = make_loader(store, "test", AugSpec(), batch_size=10 ** 6, backend="torch", shard=(0, 2))
    assert loader.batch_size == -(-n // 2) and len(loader) == 1


def test_epoch_rows_cuts_disjoint_equal_training_shards():
    """Training shards are equal, disjoint blocks of one permutation (the n % world left over sit
    out), whatever the batch size later drops; evaluation shards cover every row once."""
    from fastcifar.pipelines.loader import epoch_rows

    rows = np.arange(10)
    train = [epoch_rows(rows, 3, 1, True, (r, 3), True) for r in range(3)]
    assert [len(s) for s in train] == [3, 3, 3]
    assert len(np.unique(np.concatenate(train))) == 9
    evals = [epoch_rows(rows, 3, 1, True, (r, 3), False) for r in range(3)]
    assert sorted(np.concatenate(evals)) == list(range(10)) and [len(s) for s in evals] == [4, 3, 3]
