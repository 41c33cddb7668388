"""MixUp and CutMix: batch-level, on the device, with soft targets. The train loop calls

    images, targets = mix(images, labels, spec, num_classes, generator)

after the loader. One draw per batch (a partner permutation and a weight lam ~ Beta(a, a)), all
on the host from a CPU torch.Generator, so there is no device sync and a resumed run that seeds
the generator from (seed, epoch) mixes identically. With two views (a KD tuple), both get the
same partners and the same lam; CutMix's box is drawn in relative coordinates and cut from each
view at its own size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from fastcifar.pipelines.spec import AugSpec
from fastcifar.pipelines.torch_backend import host_to_device


def cutmix_box(lam: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A box (y0, x0, y1, x1) in relative [0, 1] coordinates covering about 1 - lam of the image."""
    cut = math.sqrt(1 - lam)  # side of the box, fraction of the image side
    cy, cx = rng.random(2)
    return (max(cy - cut / 2, 0.0), max(cx - cut / 2, 0.0), min(cy + cut / 2, 1.0), min(cx + cut / 2, 1.0))


def mix(images, labels: torch.Tensor, spec: AugSpec, num_classes: int, generator: torch.Generator):
    """(images, soft targets (N, num_classes) float32): MixUp or CutMix per spec, else one-hot.

    images is an NCHW tensor or a tuple of them (views of the same batch); the mix is the same for
    every view, and lam (the weight of each image's own label) is the area actually kept in the first view.
    """
    views = images if isinstance(images, tuple) else (images,)
    targets = F.one_hot(labels, num_classes).float()
    modes = [(m, a) for m, a in (("mixup", spec.mixup_alpha), ("cutmix", spec.cutmix_alpha)) if a > 0]
    # a numpy generator derived from the torch one (numpy has Beta; torch's takes no generator)
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    if not modes or len(labels) < 2 or rng.random() >= spec.mix_p:
        return images, targets
    mode, alpha = modes[rng.integers(len(modes))]  # with both on, each mixed batch picks one, evenly
    lam = float(rng.beta(alpha, alpha))
    perm = host_to_device(rng.permutation(len(labels)), labels.device)

    if mode == "mixup":
        out = tuple(torch.lerp(x, x[perm], 1 - lam) for x in views)  # lam x + (1 - lam) x[perm]
    else:
        box = cutmix_box(lam, rng)
        out = []
        for i, x in enumerate(views):
            h, w = x.shape[-2:]
            y0, x0, y1, x1 = round(box[0] * h), round(box[1] * w), round(box[2] * h), round(box[3] * w)
            x = x.clone()  # keeps channels_last
            x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
            out.append(x)
            if i == 0:  # the label weight follows the pixels the first (student) view really kept
                lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        out = tuple(out)
    targets = torch.lerp(targets, targets[perm], 1 - lam)
    return (out if isinstance(images, tuple) else out[0]), targets
