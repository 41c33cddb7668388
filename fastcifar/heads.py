"""Classification heads on the backbone's pooled features: `HEADS[kind](in_features, num_classes, cfg)`
maps (N, C) features to (N, num_classes) logits. Margin heads put their margin on the target class
when given int64 targets (training); without (evaluation) they give s * cosine, or the plain cosine
with `head.eval_logits = "cosine"` (the tutorial's: the same ranking, only the reported loss changes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# acos has an infinite slope at +-1: keep the cosine this far inside so gradients stay finite
COS_EPS = 1e-6
# head.margin_grad: the target logit's gradient. exact: through the margin's formula; straight_through
# (the tutorial's margin set under no_grad): the value with the margin, the plain cosine's gradient
MARGIN_GRADS = ("exact", "straight_through")
EVAL_LOGITS = ("scaled", "cosine")  # head.eval_logits: s * cos | the plain cosine (the tutorial's)


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
    """The tutorial's MarginHead: Linear(C -> embed, no bias) -> BatchNorm1d -> cosine to L2-normalised
    class weights; with targets s * the cosines, the target's with the subclass's `margin(cos_t)`."""

    def __init__(self, in_features: int, num_classes: int, cfg):
        super().__init__()
        self.s, self.m = float(cfg.s), float(cfg.m)
        self.straight_through = cfg.margin_grad == "straight_through"
        self.eval_scale = self.s if cfg.eval_logits == "scaled" else 1.0
        self.embed = nn.Linear(in_features, cfg.embed_dim, bias=False)
        self.bn = nn.BatchNorm1d(cfg.embed_dim)
        self.weight = nn.Parameter(torch.randn(num_classes, cfg.embed_dim) * 0.01)  # class centres

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(N, num_classes) cosines in fp32, whatever autocast says: normalising and the margin
        need fp32 (a bf16 cosine is off by up to 0.004, and s=64 amplifies that 64 times)."""
        e = self.bn(self.embed(features))
        with torch.autocast(e.device.type, enabled=False):
            return F.linear(F.normalize(e.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def with_margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        """margin(cos_t) (N, 1); its gradient exact or straight through to the cosine (head.margin_grad)."""
        new = self.margin(cos_t)
        return cos_t + (new - cos_t).detach() if self.straight_through else new

    def forward(self, features: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(features)
        if targets is None:
            return cos * self.eval_scale
        t = targets[:, None]
        return cos.scatter(1, t, self.with_margin(cos.gather(1, t))) * self.s


class ArcFaceHead(MarginHead):
    """ArcFace: the target logit becomes s * cos(theta + m), theta = the angle to its class centre. Past
    theta = pi - m, cos(theta + m) would rise again (a worse embedding scoring better): there it gets
    cos(theta) - m * sin(m), which keeps falling (the usual ArcFace fallback, a CosFace-like margin)."""

    def margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_t.clamp(-1 + COS_EPS, 1 - COS_EPS))
        fallback = cos_t - self.m * math.sin(self.m)
        return torch.where(theta < math.pi - self.m, torch.cos(theta + self.m), fallback)


class CosFaceHead(MarginHead):
    """CosFace: the target logit becomes s * (cos(theta) - m) (a constant: both gradient modes agree)."""

    def margin(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.m


HEADS = {"linear": LinearHead, "arcface": ArcFaceHead, "cosface": CosFaceHead}
