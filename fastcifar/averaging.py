"""Averages that give a better classifier at no training cost: an EMA of the weights
(`EMA(model, decay).update(step)` after each optimizer step), and test-time augmentation (TTA:
`predict(net, images, tta="flip")` averages each image's logits over views of it)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastcifar.errors import BadInput


class EMA:
    """An EMA of a model's weights in `module` (a copy in eval mode). `decay` is per optimizer step (an update
    every `every` steps moves by 1 - decay**every); `warmup` caps it at (1 + s) / (10 + s) after s steps
    (TensorFlow's rule: the init is forgotten early). BatchNorm statistics are averaged like the weights
    (timm's use_buffers=True: the raw model's fit its latest weights only); integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = True):
        # requires_grad stays as the model's: a compiled evaluation graph then serves both nets
        # (a flag that differs is a guard that fails: one more compile of the whole net)
        self.module = copy.deepcopy(model).eval()
        self.decay, self.every, self.warmup = decay, every, warmup
        # the same traversal of a deep copy pairs each tensor with its twin (shared tensors once each)
        pairs = [*zip(self.module.parameters(), model.parameters()), *zip(self.module.buffers(), model.buffers())]
        self._avg = ([e for e, m in pairs if e.is_floating_point()], [m.detach() for e, m in pairs if e.is_floating_point()])
        self._copy = ([e for e, m in pairs if not e.is_floating_point()], [m for e, m in pairs if not e.is_floating_point()])

    def decay_at(self, step: int) -> float:
        """The per-step decay after `step` optimizer steps."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step` (1 = the first): device kernels, no sync."""
        if step % self.every:
            return
        torch._foreach_lerp_(self._avg[0], self._avg[1], 1.0 - self.decay_at(step) ** self.every)
        if self._copy[0]:
            torch._foreach_copy_(self._copy[0], self._copy[1])

    def state_dict(self) -> dict:
        """The averaged weights: a state dict of the same network (plain keys), loadable into it."""
        return self.module.state_dict()


def hflip(images: torch.Tensor) -> torch.Tensor:
    """NCHW images mirrored left-right, in their own memory format (a compiled net sees one layout)."""
    fmt = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return images.flip(3).contiguous(memory_format=fmt)


# Test-time augmentation: the views of a batch whose logits are averaged (flip: the image and its
# mirror, the flip every CIFAR recipe trains with). Logits, not probabilities (as airbench does): one
# average, no softmax, and for a margin head an average of its scaled cosines.
TTA = {"none": (), "flip": (hflip,)}


def predict(net: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """fp32 logits of net on images, averaged over the image and the views TTA[tta] makes of it."""
    logits = net(images).float()  # the heads give fp32 logits: bf16 would tie near top-1/5
    for view in TTA[tta]:
        logits = logits + net(view(images)).float()
    return logits / (1 + len(TTA[tta]))


def pick_weights(ck: dict, weights: str = "auto") -> tuple[dict, str]:
    """(checkpoint whose "model" is the chosen weights, "raw" or "ema"); auto: the EMA's if it has them."""
    if weights not in ("auto", "raw", "ema"):
        raise BadInput(f"--weights {weights!r}: use auto (the EMA weights when the checkpoint has them), raw or ema.")
    if weights == "ema" and "ema" not in ck:
        raise BadInput("--weights ema: this checkpoint holds no EMA weights (its run had train.ema_decay = 0); "
                       "use --weights raw.")
    if weights == "raw" or "ema" not in ck:
        return ck, "raw"
    if not isinstance(ck["ema"], dict):
        raise BadInput(f"The checkpoint's EMA weights are a {type(ck['ema']).__name__}, not a state dict: it is "
                       f"damaged. Use --weights raw, or another checkpoint of the run (last.pt, best.pt).")
    return {**ck, "model": ck["ema"]}, "ema"
