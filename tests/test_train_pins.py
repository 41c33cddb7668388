"""Behaviours of the training loop that a refactor could silently break, each pinned by a test
that fails when it breaks: model selection, when best.pt is written, the RNG and the DALI backend
across a resume, gradient clipping, the weight-decay groups, the train/validation partition."""

import json

import numpy as np
import pytest
import torch

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.errors import BadInput
from fastcifar.models import build_model
from fastcifar.optim import build_optimizer
from fastcifar.pipelines.loader import dali_available
from test_train import QUIET, fit, info, metrics, resume_matches_straight, store, tiny  # noqa: F401 (store: the fixture)

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="DALI is not installed here")


def fixed_scores(val: list[float], test: list[float]):
    """A setup(trainer) that makes evaluation return val[e] / test[e] at epoch e (0-based)."""
    def setup(trainer):
        seen = {"val": 0, "test": 0}

        def evaluate(loader):
            kind = "test" if loader is trainer.test_loader else "val"
            assert kind == "test" or loader is trainer.val_loader
            acc = (test if kind == "test" else val)[seen[kind]]
            seen[kind] += 1
            return {"acc": acc, "top5": min(100.0, acc + 10), "loss": 5 - acc / 100, "images": loader.num_samples}

        trainer.evaluate = evaluate

    return setup


def test_selection_follows_validation_and_best_pt_only_on_improvement(store, tmp_path):
    # val peaks at epoch 2 (epoch 4 only ties it: not an improvement); test peaks at epoch 4
    val, test = [10.0, 30.0, 20.0, 30.0], [11.0, 12.0, 13.0, 40.0]
    run = tmp_path / "run"
    s = fit(tiny(train__epochs=4, data__val_split=0.2), info(), out=run, data_dir=store, setup=fixed_scores(val, test))
    assert [m["val_acc"] for m in metrics(run)] == val and [m["test_acc"] for m in metrics(run)] == test
    assert s["selection"] == "val" and s["best_epoch"] == s["best_val_epoch"] == 2
    assert s["best_val_acc"] == 30.0 and s["best_acc"] == s["test_acc_at_best_val"] == 12.0
    assert s["final_acc"] == 40.0
    assert checkpoint.load(run / "best.pt")["epoch"] == 2   # written at epoch 2, not again at the tie
    assert checkpoint.load(run / "last.pt")["epoch"] == 4
    assert json.loads((run / "summary.json").read_text()) == s


def test_selection_on_test_without_a_validation_split(store, tmp_path):
    run = tmp_path / "run"
    s = fit(tiny(), info(), out=run, data_dir=store, setup=fixed_scores([], [10.0, 25.0, 20.0]))
    assert s["selection"] == "test" and s["best_epoch"] == 2 and s["best_acc"] == 25.0
    assert "best_val_acc" not in s
    assert checkpoint.load(run / "best.pt")["epoch"] == 2


# ---- resume: the global RNG (dropout) and the DALI backend continue exactly


@pytest.mark.parametrize("fields", [
    pytest.param(dict(model__drop_rate=0.5, model__drop_path=0.2), id="dropout_droppath"),
    pytest.param(dict(data__backend="dali"), id="dali", marks=NEEDS_DALI),
])
def test_mid_epoch_resume_matches_a_straight_run(store, tmp_path, fields):
    """Dropout and drop path (stochastic depth) draw from torch's global RNG, which only a restored
    RNG state reproduces; the DALI
    backend (CPU mode) must train, stop mid-epoch, resume and evaluate like the torch one."""
    s = resume_matches_straight(tiny(train__epochs=2, **fields), store, tmp_path, batch=6)
    assert s["backend"] == ("dali-cpu" if fields.get("data__backend") == "dali" else "torch")


def test_auto_backend_trains_on_dali_where_it_imports(store, tmp_path):
    s = T.train(tiny(train__epochs=1, data__backend="auto"), info(), out=tmp_path / "run", data_dir=store, **QUIET)
    assert s["backend"] == ("dali-cpu" if dali_available() else "torch")
    assert s["finished"] and s["best_acc"] > 5  # 100 classes: it learned something on either backend


# ---- gradient clipping: the clipped norm is what the optimizer steps on, in fp32 and fp16


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_gradient_clipping_bounds_the_stepped_gradient(store, tmp_path, amp):
    """grad_clip=0.05 is far below this model's gradient norm, so every step the optimizer takes sees
    a global norm of exactly 0.05: the true gradient clipped (under fp16, unscaled before clipping)."""
    norms = []

    def record(opt, args, kwargs):  # runs inside optimizer.step(), on the gradients it steps with
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        # a fused optimizer handed still-scaled gradients by GradScaler divides by this in its kernel
        scale = getattr(opt, "grad_scale", None)
        norms.append(norm / (scale.item() if scale is not None else 1.0))

    fit(tiny(train__epochs=1, train__amp=amp, optim__grad_clip=0.05, train__deterministic=amp == "none"),
        info(), out=tmp_path / "run", data_dir=store, setup=lambda t: t.optimizer.register_step_pre_hook(record))
    assert len(norms) >= 10  # fp16 may skip a few overflowing first steps, never most of them
    assert norms == pytest.approx([0.05] * len(norms), rel=1e-3)


# ---- weight decay: which parameters decay is the recipe's choice


NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


@pytest.mark.parametrize("decay_groups", ["no_bias_norm", "tutorial", "all"])
@pytest.mark.parametrize("head", ["linear", "arcface"])
def test_weight_decay_groups_follow_the_recipe(decay_groups, head):
    """Which parameters decay, by the type of the module that owns them: no_bias_norm spares every
    norm layer and bias; the tutorial's groups spare biases and LayerNorm only (BatchNorm weights
    and the margin head's class centres decay); all spares nothing."""
    r = tiny(optim__weight_decay=0.05, optim__decay_groups=decay_groups, head__kind=head)
    net = build_model(r.model, r.head, 100)
    net.backbone.extra_ln = torch.nn.LayerNorm(4)  # timm ResNets have none: the tutorial's rule names it
    opt = build_optimizer(net, r.optim, r.data.batch_size)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(net.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every parameter is optimised once
    owner = {f"{m_name}.{p_name}": m for m_name, m in net.named_modules() for p_name, _ in m.named_parameters(recurse=False)}
    bias = {n for n in names if n.endswith(".bias")}
    bn = {n for n, m in owner.items() if isinstance(m, torch.nn.modules.batchnorm._NormBase)}
    ln = {n for n, m in owner.items() if isinstance(m, torch.nn.LayerNorm)}
    spared = {"no_bias_norm": bias | {n for n, m in owner.items() if isinstance(m, NORMS)},
              "tutorial": bias | ln, "all": set()}[decay_groups]
    assert {"backbone.bn1.weight", "backbone.extra_ln.weight", "backbone.conv1.1.weight"} <= set(names)
    assert "backbone.bn1.weight" in bn and "backbone.extra_ln.weight" in ln and "backbone.bn1.bias" in bias
    if head == "arcface":
        assert {"head.weight", "head.bn.weight", "head.embed.weight"} <= set(names)
    for n, p in names.items():
        assert decay_of[id(p)] == (0.0 if n in spared else 0.05), n
    if decay_groups == "tutorial":  # the tutorial's groups, spelt out
        assert decay_of[id(names["backbone.bn1.weight"])] == 0.05 and decay_of[id(names["backbone.bn1.bias"])] == 0.0
        assert decay_of[id(names["backbone.extra_ln.weight"])] == 0.0
        if head == "arcface":
            assert decay_of[id(names["head.weight"])] == 0.05  # the class centres
            assert decay_of[id(names["head.bn.weight"])] == 0.05


# ---- the train / validation partition


def test_validation_rows_are_disjoint_from_training_and_the_same_for_every_seed(store, tmp_path):
    rows = []
    for seed in (0, 7):
        fit(tiny(train__epochs=1, train__seed=seed, data__val_split=0.2), info(), out=tmp_path / f"run{seed}",
            data_dir=store, setup=lambda t: rows.append((t.train_loader.rows, t.val_loader.rows)))
    for train, val in rows:
        assert len(train) == 800 and len(val) == 200 and not set(train) & set(val)
        assert sorted(np.concatenate([train, val])) == list(range(1000))
    np.testing.assert_array_equal(rows[0][0], rows[1][0])  # train.seed does not move them
    np.testing.assert_array_equal(rows[0][1], rows[1][1])


def test_split_rows_takes_subsets_and_holds_validation_out_of_the_subset():
    """data.subset keeps a fraction of the train rows (validation included), data.val_split holds a
    fraction of those out, data.test_subset keeps a fraction of the test rows; all sorted, no row twice."""
    from types import SimpleNamespace as D

    assert T.split_rows(1000, 300, D(subset=1.0, val_split=0.0, test_subset=1.0)) == (None, None, None)
    train, val, test = T.split_rows(1000, 300, D(subset=0.2, val_split=0.0, test_subset=1.0))
    assert len(train) == 200 and val is None and test is None
    train, val, test = T.split_rows(1000, 300, D(subset=0.5, val_split=0.2, test_subset=0.3))
    assert (len(train), len(val), len(test)) == (400, 100, 90)
    assert not set(train) & set(val) and len(set(train) | set(val)) == 500
    for rows, n in ((train, 1000), (val, 1000), (test, 300)):
        assert list(rows) == sorted(set(rows)) and 0 <= rows[0] and rows[-1] < n
    whole, held, _ = T.split_rows(1000, 300, D(subset=1.0, val_split=0.2, test_subset=1.0))
    assert (len(whole), len(held)) == (800, 200)
    with pytest.raises(BadInput, match="leaves no validation"):
        T.split_rows(10, 10, D(subset=1.0, val_split=0.01, test_subset=1.0))
