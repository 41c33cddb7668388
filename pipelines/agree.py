"""Whether two loader backends give the same images for one seed: DALI on the device (and in its
CPU mode, beside a GPU) against the torch backend, with the tolerances of the CPU tests.
`fastcifar doctor` runs these checks on the machine at hand; tests/test_pipelines_dali.py runs
`branches` on the CPU.

Checks, each a row {check, a, b, size, max, mean, ties, bound, ok} in units of 1/255:
- agreement: one epoch of training images, pad-crop and OneOf(p=1), TrivialAugment or
  RandAugment (N=2, M=9), views at 32 and 224, every batch held until the epoch ends (so a reused
  output buffer would show). At 32 every value within 1/255 and at most 0.05% of them differing at
  all (rounding ties of two float implementations); 0.5% with a policy, whose fixed shears put
  many samples halfway between two pixels, where DALI's warp (weights good to about 0.006/255,
  measured) and torch's round either way. At 224 both resize floats (torch on a CPU as on a GPU):
  within 1/255.
- branches: batches of 1-4 where a conditional branch is taken by no image of the batch (DALI
  runs it on an empty batch), DALI against torch at 32, within 1/255.
- tf32: the torch backend's batch with the trainer's TF32 flags on equals the batch with them off.
"""

from __future__ import annotations

import numpy as np
import torch

from fastcifar.pipelines.draw import COLOUR_STEPS, batch_rng, draw, may
from fastcifar.pipelines.loader import dali_available, make_loader
from fastcifar.pipelines.spec import AugSpec, tutorial_oneof

# Each op alone at a small p, then OneOf and a resized crop (almost every image warps, so the
# whole-pixel branch is the empty one): at batch 1-4 most batches leave some branch empty.
RARE = {"ssr": AugSpec(ssr_p=0.2), "jitter": AugSpec(jitter_p=0.15), "erase": AugSpec(erase_p=0.1),
        "flips": AugSpec(hflip=0.3, vflip=0.05), "crop+flip": AugSpec(pad_crop=2, hflip=0.1),
        "oneof": AugSpec(**tutorial_oneof(0.3)), "rrc": AugSpec(rrc_scale=(0.3, 1.0), hflip=0.1),
        "trivialaugment": AugSpec(policy="trivialaugment", pad_crop=2), "randaugment": AugSpec(policy="randaugment")}
# The agreement epoch's specs: (spec, the fraction of values at 32 px that may differ by 1/255)
AGREE = {"oneof": (AugSpec(pad_crop=2, normalize="cifar", **tutorial_oneof(1.0)), 5e-4),
         "trivialaugment": (AugSpec(pad_crop=2, hflip=0.5, normalize="cifar", policy="trivialaugment"), 5e-3),
         "randaugment": (AugSpec(pad_crop=2, hflip=0.5, normalize="cifar", policy="randaugment"), 5e-3)}


def branch_masks(spec: AugSpec, p: dict) -> dict[str, np.ndarray]:
    """The DALI graph's conditional branches for this spec, each with the images of a batch (its
    draws p) that take it: warp / pixel moves, jitter, erase, and each policy step's colour ops."""
    out = {}
    if may(spec, "shift_scale_rotate") or spec.rrc_scale or spec.policy != "none":
        out.update({"warp": p["warp"], "pixel moves": ~p["warp"]})
    for branch, op in (("jitter", "color_jitter"), ("erase", "coarse_dropout")):
        if may(spec, op):
            out[branch] = p[branch]
    for k in range(spec.policy_steps):
        out.update({f"{name} {k}": p[f"op{k}"] == COLOUR_STEPS.index(name) for name in COLOUR_STEPS[1:]})
    return out


def compare(check, a, b, size, x, y, scale, bound, ties=None) -> dict:
    """|x - y| in 1/255 units (scale: the normalisation's std * 255, per channel) against `bound`,
    and, if given, the fraction of values differing at all (> 0.5/255) against `ties`."""
    d = ((x.float() - y.float()) * scale).abs()
    row = {"check": check, "a": a, "b": b, "size": size, "max": round(d.max().item(), 3),
           "mean": round(d.mean().item(), 4), "ties": round((d > 0.5).float().mean().item(), 6), "bound": bound}
    row["ok"] = bool(row["max"] <= bound + 1e-3 and (ties is None or row["ties"] <= ties))
    return row


def agreement(store, device: torch.device, rows: int, batch: int, specs=None) -> list[dict]:
    """DALI on `device`, DALI on the CPU (when `device` is a GPU) and torch on `device`: one epoch
    each, per spec of AGREE (or the names given)."""
    loaders = {}
    if dali_available():
        loaders["dali"] = (device, "dali")
        if device.type == "cuda":
            loaders["dali-cpu"] = (torch.device("cpu"), "dali")
    loaders["torch"] = (device, "torch")
    scale = torch.tensor(store.std).view(1, 3, 1, 1) * 255
    out = []
    for spec_name in specs or AGREE:
        spec, ties = AGREE[spec_name]
        epochs = {}
        for name, (dev, backend) in loaders.items():
            loader = make_loader(store, "train", spec, batch, backend=backend, device=dev, seed=0,
                                 indices=np.arange(rows), sizes=(32, 224))
            epochs[loader.backend] = [(tuple(v.cpu() for v in x), y.cpu()) for x, y in list(loader)]  # all held first
        names = list(epochs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                labels = all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(epochs[a], epochs[b], strict=True))
                for k, size in enumerate((32, 224)):
                    x = torch.cat([v[k] for v, _ in epochs[a]])
                    y = torch.cat([v[k] for v, _ in epochs[b]])
                    row = compare("agreement", a, b, size, x, y, scale, 1.0, ties=ties if size == 32 else None)
                    row["ok"] &= labels
                    row["spec"] = spec_name
                    out.append(row)
    return out


def branches(store, device: torch.device, specs=None, seeds=(0,), epochs=(0, 1)) -> list[dict]:
    """Batches of 1-4 of 12 images, DALI against torch at 32 (normalize none): one row per spec,
    with which branches were left empty by a whole batch and which were taken."""
    out = []
    for name, spec in (specs or RARE).items():
        worst, empty, taken, labels = np.zeros(0), set(), set(), True
        for batch_size in (1, 2, 3, 4):
            for seed in seeds:
                make = lambda b: make_loader(store, "train", spec, batch_size, backend=b, device=device, seed=seed,
                                             indices=np.arange(12))
                dali, torch_ = make("dali"), make("torch")
                for epoch in epochs:
                    dali.set_epoch(epoch)
                    torch_.set_epoch(epoch)
                    for b, ((xd, yd), (xt, yt)) in enumerate(zip(dali, torch_, strict=True)):
                        labels &= torch.equal(yd.cpu(), yt.cpu())
                        worst = np.append(worst, ((xd.float() - xt.float()).abs() * 255).max().item())
                        p = draw(spec, batch_size, batch_rng(seed, epoch, 0, b))
                        for branch, mask in branch_masks(spec, p).items():
                            (taken if mask.any() else empty).add(branch)
        out.append({"check": "branches", "a": "dali", "b": "torch", "size": 32, "spec": name,
                    "max": round(float(worst.max()), 3), "bound": 1.0, "batches": len(worst),
                    "empty": sorted(empty), "taken": sorted(taken), "ok": bool(worst.max() <= 1 + 1e-3 and labels)})
    return out


def tf32(store, device: torch.device, batch: int = 250) -> list[dict]:
    """The torch backend with TF32 and float32 matmul precision 'high' on, against them off, on one
    batch: with the jitter and shift-scale-rotate, and with RandAugment's ops (3 per image, strongest)."""
    specs = {"jitter+ssr": AugSpec(jitter_p=1.0, ssr_p=0.5, pad_crop=2, normalize="cifar"),
             "randaugment": AugSpec(policy="randaugment", ra_n=3, ra_m=30, pad_crop=2, normalize="cifar")}
    first = lambda spec: next(iter(make_loader(store, "train", spec, batch, backend="torch", device=device, seed=0)))[0]
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        off = {name: first(spec) for name, spec in specs.items()}
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        on = {name: first(spec) for name, spec in specs.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
    scale = torch.tensor(store.std).view(1, 3, 1, 1) * 255
    return [{**compare("tf32", "torch tf32 on", "torch tf32 off", 32, on[name], off[name], scale, 0.0), "spec": name}
            for name in specs]
