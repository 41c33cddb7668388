"""Classification heads on the backbone's pooled features: `HEADS[kind](in_features, num_classes, cfg)`.

Every head maps (N, C) features to (N, num_classes) logits and takes optional int64 targets;
only the margin heads use them, and only in training mode, so evaluation always sees plain
(scaled) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# acos has an infinite slope at +-1: keep the cosine this far inside so gradients stay finite
COS_EPS = 1e-6


class LinearHead(nn.Module):
    """The tutorial's `Baseline` head: one Linear layer on the pooled features."""

    def __init__(self, in_features: int, num_classes: int, cfg=None):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        # fp32 logits whatever autocast says (as the margin heads): bf16's 8-bit mantissa ties logits
        # that differ by under 1/256 of their size, and top-1/top-5 would break ties by class index
        with torch.autocast(features.device.type, enabled=False):
            return self.fc(features.float())


class MarginHead(nn.Module):
    """The tutorial's MarginHead: Linear(C -> embed, no bias) -> BatchNorm1d -> cosine to
    L2-normalised class weights, times s. Subclasses change the target class's cosine in training."""

    def __init__(self, in_features: int, num_classes: int, cfg):
        super().__init__()
        self.s, self.m = float(cfg.s), float(cfg.m)
        self.embed = nn.Linear(in_features, cfg.embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(cfg.embed_dim)
        self.weight = nn.Parameter(torch.randn(num_classes, cfg.embed_dim) * 0.01)  # class centres

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(N, num_classes) cosines in fp32, whatever autocast says: normalising and the margin
        need fp32 (a bf16 cosine is off by up to 0.004, and s=64 amplifies that 64 times)."""
        e = self.bn(self.embed(features))
        with torch.autocast(e.device.type, enabled=False):
            return F.linear(F.normalize(e.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def margin(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(features)
        if self.training and targets is not None:
            cos = self.margin(cos, targets)
        return cos * self.s


class ArcFaceHead(MarginHead):
    """ArcFace: the target logit becomes s * cos(theta + m), theta = the angle to its class centre."""

    def margin(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        target = cos.gather(1, targets[:, None])
        theta = torch.acos(target.clamp(-1 + COS_EPS, 1 - COS_EPS))
        return cos.scatter(1, targets[:, None], torch.cos(theta + self.m))


class CosFaceHead(MarginHead):
    """CosFace: the target logit becomes s * (cos(theta) - m)."""

    def margin(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        target = cos.gather(1, targets[:, None])
        return cos.scatter(1, targets[:, None], target - self.m)


HEADS = {"linear": LinearHead, "arcface": ArcFaceHead, "cosface": CosFaceHead}
