"""The optimizer side of a recipe (fastcifar/optim.py): the LR schedule as a pure function and the
scheduler that steps it, peak LR scaling, the optimizer's hyperparameters, which parameters decay,
and gradient clipping as the optimizer sees it."""

import pytest
import torch

from fastcifar.config import Schedule
from fastcifar.models import build_model
from fastcifar.optim import build_optimizer, lr_factor, param_groups, peak_lr
from helpers import fit, info, tiny


# ---- the LR schedule and parameter groups (pure functions)


def test_lr_schedule_shapes():
    total = 100
    warm = Schedule(kind="cosine", warmup=0.1, final_lr=0.0)
    assert [lr_factor(i, total, warm) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(10, total, warm) == pytest.approx(1.0) and lr_factor(99, total, warm) < 0.001
    assert lr_factor(55, total, warm) == pytest.approx(0.5)  # cosine: half way after warmup
    one = Schedule(kind="onecycle", warmup=0.2, final_lr=0.1)
    assert lr_factor(20, total, one) == 1.0 and lr_factor(60, total, one) == pytest.approx(0.55)
    step = Schedule(kind="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(i, total, step) for i in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert all(lr_factor(i, total, Schedule()) == 1.0 for i in range(total))


def test_param_groups_and_lr_scaling():
    net = build_model(tiny().model, tiny().head)
    groups = param_groups(net, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all((p.ndim > 1) == (id(p) in decayed) for p in net.parameters())  # norms and biases: no decay
    assert len(param_groups(net, 0.05, "all")) == 1
    r = tiny(optim__lr=0.1, optim__lr_ref_batch=256)
    assert peak_lr(r.optim, 512) == pytest.approx(0.2)
    r.optim.lr_scaling = "sqrt"
    assert peak_lr(r.optim, 1024) == pytest.approx(0.2)


def test_optimizer_gets_the_recipes_hyperparameters_and_the_scheduler_steps_lr_factor():
    """build_optimizer hands the optimizer optim.betas / momentum / nesterov and peak_lr (not
    optim.lr); nesterov needs momentum (torch refuses it at 0); the scheduler's LR at optimizer
    step k is the peak times lr_factor(k), from k = 0; cosine ends at final_lr of the peak."""
    from fastcifar.optim import build_optimizer, build_scheduler

    net = torch.nn.Linear(3, 2)
    adam = build_optimizer(net, tiny(optim__betas=(0.8, 0.95), optim__lr=0.1, optim__lr_ref_batch=25).optim, 50)
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["lr"] == pytest.approx(0.2)
    sgd = build_optimizer(net, tiny(optim__name="sgd", optim__momentum=0.7, optim__nesterov=True).optim, 50)
    assert sgd.defaults["momentum"] == 0.7 and sgd.defaults["nesterov"] is True
    flat = build_optimizer(net, tiny(optim__name="sgd", optim__momentum=0.0, optim__nesterov=True).optim, 50)
    assert flat.defaults["nesterov"] is False
    s = Schedule(kind="cosine", warmup=0.1, final_lr=0.2)
    assert lr_factor(10, 100, s) == pytest.approx(1.0) and lr_factor(99, 100, s) == pytest.approx(0.2, abs=1e-3)
    sched, lrs = build_scheduler(adam, 100, s), []
    for _ in range(12):
        lrs.append(adam.param_groups[0]["lr"])
        adam.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * lr_factor(k, 100, s) for k in range(12)])


# ---- gradient clipping: the clipped norm is what the optimizer steps on, in fp32 and fp16


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_gradient_clipping_bounds_the_stepped_gradient(store_dir, tmp_path, amp):
    """grad_clip=0.05 is far below this model's gradient norm, so every step the optimizer takes sees
    a global norm of exactly 0.05: the true gradient clipped (under fp16, unscaled before clipping)."""
    norms = []

    def record(opt, args, kwargs):  # runs inside optimizer.step(), on the gradients it steps with
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        # a fused optimizer handed still-scaled gradients by GradScaler divides by this in its kernel
        scale = getattr(opt, "grad_scale", None)
        norms.append(norm / (scale.item() if scale is not None else 1.0))

    # 20 steps of 25 images (fp16 runs emulated on a CPU: small batches), a fifth of the test images
    fit(tiny(train__epochs=1, train__amp=amp, optim__grad_clip=0.05, train__deterministic=amp == "none",
             data__batch_size=25, data__subset=0.5, data__test_subset=0.2),
        info(), out=tmp_path / "run", data_dir=store_dir, setup=lambda t: t.optimizer.register_step_pre_hook(record))
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
