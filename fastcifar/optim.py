"""Optimizer with parameter groups, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastcifar import BadInput


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool = False) -> list[dict]:
    """Two groups: weights that decay, and norm scales/shifts and biases (1-D tensors) that do not,
    since shrinking them towards 0 fights BatchNorm rather than regularising. decay_norm_bias=True
    decays everything, as the tutorial's AdamW did."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_norm_bias or p.ndim > 1 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def peak_lr(cfg, batch_size: int) -> float:
    """optim.lr, or, with optim.lr_ref_batch > 0, lr scaled from that batch to this one."""
    if not cfg.lr_ref_batch:
        return cfg.lr
    ratio = batch_size / cfg.lr_ref_batch
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


def build_optimizer(model: nn.Module, cfg, batch_size: int, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD from the recipe's optim section; the fused kernels where this torch has them."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_bias)
    lr = peak_lr(cfg, batch_size)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), **fused)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    raise BadInput(f"optim.name = {cfg.name!r}: must be adamw or sgd.")


def lr_factor(step: int, total_steps: int, s) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) of `total_steps`, from the
    recipe's schedule section: a linear warmup over the first `s.warmup` fraction of the steps,
    then constant, step (x gamma at each milestone fraction), cosine or linear (onecycle) decay
    to `s.final_lr`."""
    warm = round(s.warmup * total_steps)
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total_steps - warm))  # progress after warmup, 0..1
    if s.kind == "constant":
        return 1.0
    if s.kind == "step":
        return s.gamma ** sum(step >= m * total_steps for m in s.milestones)
    if s.kind == "cosine":
        return s.final_lr + (1 - s.final_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if s.kind == "onecycle":
        return 1 - (1 - s.final_lr) * t
    raise BadInput(f"schedule.kind = {s.kind!r}: must be constant, step, cosine or onecycle.")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, s) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_factor (stepped once per optimizer step; its state goes in checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, s))
