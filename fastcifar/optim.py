"""Optimizer with parameter groups, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn


# optim.decay_groups -> whether a parameter decays, given its name and the module that owns it
DECAY_GROUPS = {
    # 1-D tensors (norm scales and shifts, biases) do not decay: shrinking them towards 0 fights
    # BatchNorm rather than regularising
    "no_bias_norm": lambda name, p, owner: p.ndim > 1,
    # the tutorial's groups: biases and LayerNorm weights do not decay; everything else does,
    # BatchNorm weights and the margin head's class centres included
    "tutorial": lambda name, p, owner: name.rsplit(".", 1)[-1] != "bias" and not isinstance(owner, nn.LayerNorm),
    "all": lambda name, p, owner: True,
}


def param_groups(model: nn.Module, weight_decay: float, decay_groups: str = "no_bias_norm") -> list[dict]:
    """The parameters DECAY_GROUPS[decay_groups] decays (weight_decay), then the rest (0), if any."""
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    rule = DECAY_GROUPS[decay_groups]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if rule(name, p, owner[id(p)]) else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def peak_lr(cfg, batch_size: int) -> float:
    """optim.lr, or, with optim.lr_ref_batch > 0, lr scaled from that batch to this one."""
    if not cfg.lr_ref_batch:
        return cfg.lr
    ratio = batch_size / cfg.lr_ref_batch
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


# optim.name -> the optimizer over param groups (fused kernels: one launch for all parameters)
OPTIMIZERS = {
    "adamw": lambda groups, lr, cfg: torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), fused=True),
    "sgd": lambda groups, lr, cfg: torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True,
                                                   nesterov=cfg.nesterov and cfg.momentum > 0),
}
LR_SCALING = ("linear", "sqrt")  # how optim.lr scales from optim.lr_ref_batch to the batch (peak_lr)


def build_optimizer(model: nn.Module, cfg, batch_size: int) -> torch.optim.Optimizer:
    """The optimizer of the recipe's optim section over param_groups(model), at peak_lr."""
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay, cfg.decay_groups), peak_lr(cfg, batch_size), cfg)


def _after_warmup(step: int, total_steps: int, s) -> float:
    """Progress through the steps after warmup, 0..1 (1 from total_steps on: the final value stays)."""
    warm = round(s.warmup * total_steps)
    return min(1.0, (step - warm) / (total_steps - warm)) if total_steps > warm else 1.0


# schedule.kind -> multiplier of the peak LR at optimizer step `step` (0-based) of `total_steps`,
# after the warmup; milestones are fractions of all steps, final_lr a fraction of the peak
SCHEDULES = {
    "constant": lambda step, total, s: 1.0,
    "step": lambda step, total, s: s.gamma ** sum(step >= m * total for m in s.milestones),
    "cosine": lambda step, total, s: s.final_lr + (1 - s.final_lr) * 0.5 * (1 + math.cos(math.pi * _after_warmup(step, total, s))),
    "onecycle": lambda step, total, s: 1 - (1 - s.final_lr) * _after_warmup(step, total, s),  # linear down
}


def lr_factor(step: int, total_steps: int, s) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based) of `total_steps`: a linear warmup over
    the first `s.warmup` fraction, then SCHEDULES[s.kind] (past total_steps: its final value)."""
    warm = round(s.warmup * total_steps)
    if step < warm:
        return (step + 1) / warm
    return SCHEDULES[s.kind](step, total_steps, s)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, s) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_factor (stepped once per optimizer step; its state goes in checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, s))
