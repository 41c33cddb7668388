"""`fastcifar bench`: throughput of each stage as rows {stage, backend, image_size, batch_size,
device, images_per_sec, ...}, printed as a markdown table and optionally written as JSON.

Stages are a plain dict (STAGES); each is a function returning its rows. Timing: warm-up
batches first (DALI build, worker start-up, first allocations), then repeats of a fixed number
of batches inside one epoch, each closed by a device sync; the row reports the median repeat.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastcifar import BadInput, __version__

PIPELINE_BACKENDS = ("tutorial", "torch", "dali")
# (warm-up batches, repeats, batches per repeat): 5 + 5 * 30 = 155 batches fit the 200 of one
# CIFAR epoch at batch 250, so no epoch restart lands in a timed repeat
PLAN = {"full": {32: (5, 5, 30), 224: (3, 5, 6)}, "quick": {32: (2, 3, 8), 224: (1, 3, 2)}}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: torch.device) -> str:
    """What the `device` column says: 'cpu' or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measure(loader, device: torch.device, warmup: int, repeats: int, batches: int) -> float:
    """Median images/s over `repeats` runs of `batches` batches, after `warmup` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    _sync(device)
    rates = []
    for _ in range(repeats):
        n, t = 0, time.perf_counter()
        for _ in range(batches):
            _, labels = next(it)
            n += len(labels)
        _sync(device)  # the loader's work is done, not just queued
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def bench_pipeline(store, device: torch.device, quick: bool, batch_size: int, backends, log) -> list[dict]:
    """Loader images/s per backend at 32 and 224, with augmentation off and the tutorial's OneOf (p=1)."""
    from pipelines import AugSpec, make_loader
    from pipelines.loader import dali_available
    from pipelines.spec import tutorial_oneof
    from pipelines.tutorial import albumentations_available

    backends = [b for b in (backends or PIPELINE_BACKENDS) if b != "dali" or dali_available()]
    plan = PLAN["quick" if quick else "full"]
    rows = []
    for size in (32, 224):
        warmup, repeats, batches = plan[size]
        need = (warmup + repeats * batches) * batch_size
        if need > len(store.labels("train")):
            raise BadInput(f"The pipeline bench reads {need} train images in one epoch at {size} px, but the "
                           f"store has {len(store.labels('train'))}; use --quick or a smaller --batch-size.")
        for aug in ("none", "oneof"):
            spec = AugSpec(image_size=size, **(tutorial_oneof(1.0) if aug == "oneof" else {}))
            for backend in backends:
                loader = make_loader(store, "train", spec, batch_size, backend=backend, device=device, seed=0)
                rate = measure(loader, device, warmup, repeats, batches)
                row = {"stage": "pipeline", "backend": loader.backend, "image_size": size, "batch_size": batch_size,
                       "device": device_label(device), "images_per_sec": round(rate), "aug": aug}
                if backend == "tutorial":
                    row["note"] = "cv2 + albumentations" if albumentations_available() else "torch per-sample fallback"
                rows.append(row)
                log(f"  pipeline {row['backend']:9s} {size:3d}px aug={aug:5s} {rate:9.0f} img/s")
                del loader
    base = {(r["image_size"], r["aug"]): r["images_per_sec"] for r in rows if r["backend"] == "tutorial"}
    for r in rows:  # speed relative to the tutorial's data path in the same run
        if (r["image_size"], r["aug"]) in base:
            r["vs_tutorial"] = round(r["images_per_sec"] / base[(r["image_size"], r["aug"])], 2)
    return rows


STAGES = {"pipeline": bench_pipeline}


def bench_store(data_dir, quick: bool, log):
    """The prepared store if there is one, else a synthetic stand-in cached in the temp dir
    (throughput does not depend on the pictures)."""
    from fastcifar.data import default_data_dir, open_store, prepare

    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if (d / "meta.json").is_file():
        return open_store(d)
    n = 10_000 if quick else 50_000
    syn = Path(tempfile.gettempdir()) / f"fastcifar-bench-synthetic-{n}"
    log(f"No store at {d}: benchmarking on a synthetic stand-in ({n} images, {syn}).")
    prepare(syn, synthetic=True, n_train=n, n_test=1000, log=lambda *_: None, progress=False)
    return open_store(syn)


def table(rows: list[dict]) -> str:
    """Rows as a markdown table; columns are the union of the rows' keys, in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def host_info(device: torch.device) -> dict:
    """What the figures were measured on."""
    info = {"fastcifar": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "device": device_label(device), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return info


def run(stages=None, json_path=None, quick=False, backends=None, batch_size=250, data_dir=None, device=None,
        log=print) -> list[dict]:
    """Run the stages, print the table, write JSON {meta, rows} if asked; returns the rows."""
    stages = list(stages or STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise BadInput(f"Unknown bench stage {unknown[0]!r}; the stages are: {', '.join(STAGES)}.")
    bad = [b for b in backends or () if b not in PIPELINE_BACKENDS]
    if bad:
        raise BadInput(f"Unknown pipeline backend {bad[0]!r}; choose from {', '.join(PIPELINE_BACKENDS)}.")
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: must be at least 1.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device} asked for a GPU, but torch sees none here; use --device cpu.")
    store = bench_store(data_dir, quick, log)
    meta = {**host_info(device), "quick": quick, "store": "synthetic" if store.synthetic else "cifar100"}
    log(f"bench on {meta['device']} ({meta['cpu_cores']} CPU cores), batch {batch_size}{', quick' if quick else ''}")
    rows = []
    for name in stages:
        rows += STAGES[name](store=store, device=device, quick=quick, batch_size=batch_size, backends=backends, log=log)
    log("")
    log(table(rows))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        log(f"wrote {json_path}")
    return rows
