"""The loss functions, and the objectives a training step calls (`Classify`, `Distill`, `MultiScale`:
one per run). Each returns a dict of parts: `loss` (what backward() sees) and its terms, in fp32."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> dict:
    """Cross-entropy with label smoothing, of int64 (N,) labels or (N, C) soft targets (MixUp/CutMix)."""
    ce = (soft_cross_entropy(logits, targets, label_smoothing) if targets.is_floating_point()
          else F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing))
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
    """KD from a frozen teacher; images: (student view, teacher view) of one augmented batch. teacher_margin:
    its logits get its margin on the labels too (the tutorial's KD); teacher_bn "train": its BatchNorm on
    batch statistics, moving its running ones (the tutorial never put its teacher in eval mode)."""

    def __init__(self, net, teacher, autocast, alpha: float, temperature: float, label_smoothing: float = 0.0,
                 teacher_margin: bool = False, teacher_bn: str = "eval"):
        self.net, self.teacher, self.autocast, self.teacher_margin = net, teacher, autocast, teacher_margin
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        teacher.train(teacher_bn == "train")  # its parameters stay frozen either way (requires_grad False)

    def __call__(self, images: tuple, labels: torch.Tensor, targets: torch.Tensor) -> dict:
        student_view, teacher_view = images
        with self.autocast():
            logits = self.net(student_view, labels)
            with torch.no_grad():
                teacher_logits = self.teacher(teacher_view, labels if self.teacher_margin else None)
        parts = distillation(logits, targets, teacher_logits, self.alpha, self.temperature, self.label_smoothing)
        return {**parts, "logits": logits}


class MultiScale:
    """Multi-scale training (the tutorial's resnet18_pretrained_arcface_mst): images holds one view per
    scale of one augmentation draw; each image trains at a scale drawn from (seed, step, rank) on the
    host (a resume draws the same): a forward per scale (own BatchNorm statistics), one CE in batch order."""

    def __init__(self, net, autocast, seed: int, rank: int, step, label_smoothing: float = 0.0):
        self.net, self.autocast, self.label_smoothing = net, autocast, label_smoothing
        self.seed, self.rank, self.step = seed, rank, step  # step(): optimizer steps done, a host int

    def scale_of(self, n: int, scales: int) -> np.ndarray:
        """The scale index (0..scales-1) of each of n images; a scale one image drew goes to the most drawn
        one: BatchNorm cannot train on one image (at batch 250 and two scales, once in 1e73 batches)."""
        pick = np.random.default_rng([self.seed, self.step(), self.rank, 0x5CA1E]).integers(scales, size=n)
        counts = np.bincount(pick, minlength=scales)
        for lone in np.flatnonzero(counts == 1):
            pick[pick == lone] = counts.argmax()
        return pick

    def __call__(self, images: tuple, labels: torch.Tensor, targets: torch.Tensor) -> dict:
        pick = self.scale_of(labels.shape[0], len(images))
        rows = [np.flatnonzero(pick == k) for k in range(len(images))]
        to_dev = lambda a: torch.from_numpy(a).to(labels.device, non_blocking=True)
        parts = []
        with self.autocast():
            for view, idx in zip(images, rows):
                if len(idx):  # host-side counts: no device sync
                    idx = to_dev(idx)
                    parts.append(self.net(view.index_select(0, idx), labels.index_select(0, idx)))
        logits = torch.cat(parts).index_select(0, to_dev(np.argsort(np.concatenate(rows))))  # back in batch order
        return {**cross_entropy(logits, targets, self.label_smoothing), "logits": logits}
