"""DALI on the GPU, DALI on the CPU and the torch backend give the same images for one seed: the
GPU check's correctness step (bench/gpu_check.sh), with the tolerances of the CPU tests.

    python bench/agree.py --data-dir STORE [--device cuda] [--json OUT.json] [--rows 2000] [--batch 250] [--specs ssr,...]

Checks, each a row {check, a, b, size, max, mean, ties, bound, ok} in units of 1/255:
- agreement: one epoch of `--rows` training images, pad-crop and OneOf(p=1), TrivialAugment or
  RandAugment (N=2, M=9), views at 32 and 224, every batch held until the epoch ends (so a reused
  output buffer would show). At 32 every value within 1/255 and at most 0.05% of them differing at
  all (rounding ties of two float implementations); 0.5% with a policy, whose fixed shears put
  many samples halfway between two pixels, where DALI's warp (weights good to about 0.006/255,
  measured) and torch's round either way. At 224 both resize floats (torch on a CPU as on a GPU):
  within 1/255.
- branches: batches of 1-4 where a conditional branch is taken by no image of the batch (DALI
  runs it on an empty batch), DALI against torch at 32, within 1/255 (tests/test_pipelines_dali.py
  runs this very check on the CPU).
- tf32: the torch backend's batch with the trainer's TF32 flags on equals the batch with them off.
Exit status 1 if a check fails (or DALI does not import: then only torch's TF32 check runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

from fastcifar.checkpoint import write_json  # noqa: E402
from fastcifar.data import open_store  # noqa: E402
from pipelines import AugSpec, make_loader  # noqa: E402
from pipelines.draw import COLOUR_STEPS, batch_rng, draw, may  # noqa: E402
from pipelines.loader import dali_available  # noqa: E402
from pipelines.spec import tutorial_oneof  # noqa: E402

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
                labels = all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(epochs[a], epochs[b]))
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
        worst, empty, taken = np.zeros(0), set(), set()
        for batch_size in (1, 2, 3, 4):
            for seed in seeds:
                make = lambda b: make_loader(store, "train", spec, batch_size, backend=b, device=device, seed=seed,
                                             indices=np.arange(12))
                dali, torch_ = make("dali"), make("torch")
                for epoch in epochs:
                    dali.set_epoch(epoch)
                    torch_.set_epoch(epoch)
                    for b, ((xd, yd), (xt, yt)) in enumerate(zip(dali, torch_, strict=True)):
                        assert torch.equal(yd.cpu(), yt.cpu()), "the backends disagree on the labels"
                        worst = np.append(worst, ((xd.float() - xt.float()).abs() * 255).max().item())
                        p = draw(spec, batch_size, batch_rng(seed, epoch, 0, b))
                        for branch, mask in branch_masks(spec, p).items():
                            (taken if mask.any() else empty).add(branch)
        out.append({"check": "branches", "a": "dali", "b": "torch", "size": 32, "spec": name,
                    "max": round(float(worst.max()), 3), "bound": 1.0, "batches": len(worst),
                    "empty": sorted(empty), "taken": sorted(taken), "ok": bool(worst.max() <= 1 + 1e-3)})
    return out


def tf32(store, device: torch.device) -> list[dict]:
    """The torch backend with TF32 and float32 matmul precision 'high' on, against them off: with
    the jitter and shift-scale-rotate, and with RandAugment's ops (3 per image, strongest)."""
    specs = {"jitter+ssr": AugSpec(jitter_p=1.0, ssr_p=0.5, pad_crop=2, normalize="cifar"),
             "randaugment": AugSpec(policy="randaugment", ra_n=3, ra_m=30, pad_crop=2, normalize="cifar")}
    batch = lambda spec: next(iter(make_loader(store, "train", spec, 250, backend="torch", device=device, seed=0)))[0]
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        off = {name: batch(spec) for name, spec in specs.items()}
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        on = {name: batch(spec) for name, spec in specs.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
    scale = torch.tensor(store.std).view(1, 3, 1, 1) * 255
    return [{**compare("tf32", "torch tf32 on", "torch tf32 off", 32, on[name], off[name], scale, 0.0), "spec": name}
            for name in specs]


def dali_version():
    if not dali_available():
        return None
    import nvidia.dali

    return nvidia.dali.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=2000, help="training images in the agreement epoch")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--specs", default=",".join(RARE), help="the branch check's specs, comma-separated: " + ", ".join(RARE))
    ap.add_argument("--agree", default=",".join(AGREE), help="the agreement epoch's specs: " + ", ".join(AGREE))
    ap.add_argument("--json", help="write {device, dali, rows: [...], ok} here")
    a = ap.parse_args()
    for arg, known in (("--specs", RARE), ("--agree", AGREE)):
        unknown = [n for n in getattr(a, arg[2:]).split(",") if n not in known]
        if unknown:
            ap.error(f"{arg}: unknown spec {unknown[0]!r}; choose from {', '.join(known)}")
    store, device = open_store(a.data_dir), torch.device(a.device)
    rows = agreement(store, device, a.rows, a.batch, a.agree.split(","))
    if dali_available():
        rows += branches(store, device, {name: RARE[name] for name in a.specs.split(",")})
    rows += tf32(store, device)
    ok = all(r["ok"] for r in rows) and dali_available()
    for r in rows:
        spec = (f" [{r['spec']}, {r['batches']} batches, empty: {', '.join(r['empty']) or '-'}]" if "batches" in r
                else f" [{r['spec']}]" if "spec" in r else "")
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:9s} {r['a']} vs {r['b']} at {r['size']}: max {r['max']}/255 "
              f"(bound {r['bound']}){spec}")
    if not dali_available():
        print("FAIL DALI does not import here: nothing to compare torch with (PYTHONPATH=/tmp/dali-site?)")
    if a.json:
        write_json(Path(a.json), {"device": str(device), "dali": dali_version(), "rows": rows, "ok": ok})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
