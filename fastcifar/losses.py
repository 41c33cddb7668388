"""Loss functions. Each returns a dict of parts: `loss` (what backward() sees) plus its terms,
all computed in fp32 whatever precision the logits come in."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict:
    """Cross-entropy with label smoothing, on hard labels (int64 (N,)) or soft targets
    (float (N, C) rows that sum to 1, as MixUp/CutMix give)."""
    logits = logits.float()
    if targets.is_floating_point():
        ce = soft_cross_entropy(logits, targets, label_smoothing)
    else:
        ce = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return {"loss": ce, "ce": ce}


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of -sum_c q_c log p_c, with q = targets smoothed towards uniform."""
    q = targets.float()
    if label_smoothing:
        q = q * (1 - label_smoothing) + label_smoothing / q.shape[1]
    return -(q * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def distillation(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                 alpha: float = 0.7, temperature: float = 4.0, label_smoothing: float = 0.0) -> dict:
    """(1 - alpha) * CE(targets, student) + alpha * T^2 * KL(teacher_T || student_T).
    T^2 keeps the KD gradients on the scale of the CE ones as T grows (Hinton et al. 2015)."""
    ce = cross_entropy(logits, targets, label_smoothing)["ce"]
    t = temperature
    log_student = F.log_softmax(logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    # KL(p_t || p_s) = sum p_t (log p_t - log p_s), averaged over the batch
    kd = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * t * t
    return {"loss": (1 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}


# ---- Objectives: what a training step optimises, chosen once per run. Each takes the batch as
# (images, labels, targets) - targets are the labels, or soft (N, C) rows after MixUp/CutMix - runs
# the forward passes under autocast and returns the loss parts plus the student's logits.


class Classify:
    """Cross-entropy (with label smoothing) of the net's logits; margin heads use the labels."""

    def __init__(self, net, autocast, label_smoothing: float = 0.0):
        self.net, self.autocast, self.label_smoothing = net, autocast, label_smoothing

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> dict:
        with self.autocast():
            logits = self.net(images, labels)  # a margin head puts its margin on the labelled class
        return {**cross_entropy(logits, targets, self.label_smoothing), "logits": logits}


class Distill:
    """Distillation from a frozen teacher: images is the pair (student view, teacher view) of one
    augmented batch, each at its own size."""

    def __init__(self, net, teacher, autocast, alpha: float, temperature: float, label_smoothing: float = 0.0):
        self.net, self.teacher, self.autocast = net, teacher, autocast
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing

    def __call__(self, images: tuple, labels: torch.Tensor, targets: torch.Tensor) -> dict:
        student_view, teacher_view = images
        with self.autocast():
            logits = self.net(student_view, labels)
            with torch.no_grad():
                teacher_logits = self.teacher(teacher_view)
        parts = distillation(logits, targets, teacher_logits, self.alpha, self.temperature, self.label_smoothing)
        return {**parts, "logits": logits}
