"""`fastcifar bench`: throughput rows {stage, backend, image_size, batch_size, device, images_per_sec, ...}
of each stage (STAGES: generators of rows) as markdown tables, and as JSON written after every row
(meta.complete false until the last), so a bench stopped by Ctrl-C, SIGTERM or a time limit keeps every
row it measured. A row: warm-up batches (DALI build, worker start-up, first allocations), then the median
of repeats of a fixed number of batches inside one epoch, each closed by a device sync."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastcifar import __version__, jsonio, owned, provenance, runtime
from fastcifar.errors import BadInput
from fastcifar.signals import Stopped, sigterm_as_ctrl_c

PIPELINE_BACKENDS = ("tutorial", "torch", "dali")
HOST = "dali-host"  # the pipeline rows of the DALI backend's host side alone (index reads and draws)
SIZES = (32, 224)  # output sides in px: the stored 32 and the pretrained recipes' 224 (--size picks, in its order)
# (warm-up batches, repeats, batches per repeat): 5 + 5 * 30 = 155 batches fit the 200 of one
# CIFAR epoch at batch 250, so no epoch restart lands in a timed repeat
PLAN = {"full": {32: (5, 5, 30), 224: (3, 5, 6)}, "quick": {32: (2, 3, 8), 224: (1, 3, 2)}}


def device_label(device: torch.device) -> str:
    """What the `device` column says: 'cpu' or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measure(loader, device: torch.device, warmup: int, repeats: int, batches: int) -> float:
    """Median images/s over `repeats` runs of `batches` batches, after `warmup` batches."""
    return _time_steps(lambda images, labels: None, iter(loader), device, warmup, repeats, batches)[0]


def pipeline_augs() -> dict[str, dict]:
    """The pipeline rows' augmentations: AugSpec fields per `aug` name."""
    from fastcifar.pipelines.spec import tutorial_oneof

    return {"none": {}, "oneof": tutorial_oneof(1.0), "trivialaugment": {"policy": "trivialaugment"},
            "randaugment": {"policy": "randaugment"}}


def bench_pipeline(store, device: torch.device, quick: bool, batch_size: int, backends, log, sizes=SIZES, **_):
    """Loader img/s per backend and size, for each of pipeline_augs(); after each DALI row its host
    side alone (HOST: the reads and draws its thread makes ahead of training, on the CPU)."""
    from fastcifar.pipelines import AugSpec, make_loader
    from fastcifar.pipelines.loader import dali_available
    from fastcifar.pipelines.tutorial import albumentations_available

    backends = [b for b in (backends or PIPELINE_BACKENDS) if b != "dali" or dali_available()]
    plan = PLAN["quick" if quick else "full"]
    for size in sizes:  # every size checked before the first is measured
        warmup, repeats, batches = plan[size]
        need = (warmup + repeats * batches) * batch_size
        if need > len(store.labels("train")):
            raise BadInput(f"The pipeline bench reads {need} train images in one epoch at {size} px, but the "
                           f"store has {len(store.labels('train'))}; use --quick or a smaller --batch-size.")
    for size in sizes:
        warmup, repeats, batches = plan[size]
        for aug, fields in pipeline_augs().items():
            spec = AugSpec(image_size=size, **fields)
            for backend in backends:
                if backend == "tutorial" and spec.policy != "none" and albumentations_available():
                    log(f"  pipeline tutorial {size:3d}px aug={aug}: skipped, albumentations has no {aug}")
                    continue
                loader = make_loader(store, "train", spec, batch_size, backend=backend, device=device, seed=0)
                rate = measure(loader, device, warmup, repeats, batches)
                row = {"stage": "pipeline", "backend": loader.backend, "image_size": size, "batch_size": batch_size,
                       "device": device_label(device), "images_per_sec": img_s(rate), "aug": aug}
                if backend == "tutorial":
                    row["note"] = "cv2 + albumentations" if albumentations_available() else "torch per-sample fallback"
                log(f"  pipeline {row['backend']:9s} {size:3d}px aug={aug:14s} {img_s(rate):9} img/s")
                yield row
                if backend == "dali":
                    # per batch, the inputs its thread makes for external_source: (images, labels, draws...)
                    inputs = loader.impl.inputs(list(enumerate(loader.batches())), loader.epoch)
                    host = measure(((a, a[1]) for a in inputs), torch.device("cpu"), warmup, repeats, batches)
                    yield {"stage": "pipeline", "backend": HOST, "image_size": size, "batch_size": batch_size,
                           "device": "cpu", "images_per_sec": img_s(host), "aug": aug,
                           "ms_per_batch": round(1000 * batch_size / host, 3), "note": "host side alone: reads + draws"}
                    log(f"  pipeline {HOST:9s} {size:3d}px aug={aug:14s} {img_s(host):9} img/s "
                        f"({1000 * batch_size / host:.2f} ms per batch of {batch_size})")
                del loader


def vs_tutorial(rows: list[dict]) -> None:
    """Each pipeline row's speed over the tutorial path's at its size and augmentation in this run."""
    base = {(r["image_size"], r["aug"]): r["images_per_sec"] for r in rows
            if r["stage"] == "pipeline" and r["backend"] == "tutorial"}
    for r in rows:
        if r["stage"] == "pipeline" and r["backend"] != HOST and (r["image_size"], r["aug"]) in base:
            r["vs_tutorial"] = round(r["images_per_sec"] / base[(r["image_size"], r["aug"])], 2)


# ---- train_step: the model alone on device tensors, and end_to_end: loader + step

MODELS = ("resnet18", "resnet50")  # default timm models of train_step / end_to_end (--model picks others)
# The ladder of step settings, one change at a time: name -> (compiled, channels_last, amp)
STEP_SETTINGS = {"nchw_fp32": (False, False, False), "cl_fp32": (False, True, False),
                 "cl_amp": (False, True, True), "compiled_cl_amp": (True, True, True)}
# (warm-up steps, repeats, steps per repeat); warm-up holds the compile and is reported apart
STEP_PLAN = {"full": (5, 5, 10), "quick": (2, 3, 3)}
# Images per step on a CPU, where batch 250 at 224 px would take minutes per step
CPU_STEP_BATCH = {32: 64, 224: 8}


def _amp_dtype(device: torch.device) -> torch.dtype:
    """The AMP rungs' autocast dtype: train.amp=auto's pick, or bf16 where that is fp32 (a CPU without
    native bf16: the ladder shows what emulating it costs)."""
    return runtime.AMP_DTYPES[runtime.resolve_amp(device, "auto")[0]] or torch.bfloat16


def _input_dtype(device: torch.device, amp: bool) -> torch.dtype:
    """What the step is fed: bf16 under bf16 AMP, as the loader hands it over, so that train_step and
    end_to_end compile the same graph and differ by the data only."""
    return torch.bfloat16 if amp and _amp_dtype(device) == torch.bfloat16 else torch.float32


def make_train_step(model_name: str, device: torch.device, compiled: bool, channels_last: bool, amp: bool):
    """step(images, labels) -> loss: forward, cross-entropy, backward, AdamW of a timm model."""
    from fastcifar.config import Head, Model
    from fastcifar.models import build_model

    fmt = runtime.memory_format(channels_last)
    model = build_model(Model(name=model_name), Head(kind="linear"), 100).to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if compiled:
        # timm models of a kind share their forward's code and so dynamo's cache: a second size would
        # recompile as a dynamic-shape graph. A fresh cache and dynamic=False: one static graph.
        torch._dynamo.reset()
    net = torch.compile(model, dynamic=False) if compiled else model
    # fp16 without a GradScaler would underflow in real training; for timing, a step is a step
    dtype = _amp_dtype(device)

    def step(images, labels):
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _time_steps(step, batches, device, warmup, repeats, per_repeat) -> tuple[float, float]:
    """(median images/s over the repeats, seconds of the warm-up incl. compilation). `batches`
    is an iterator of (images, labels); the loss is never read back, so nothing syncs mid-repeat."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    t = time.perf_counter()
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    warm = time.perf_counter() - t
    rates = []
    for _ in range(repeats):
        n, t = 0, time.perf_counter()
        for _ in range(per_repeat):
            images, labels = next(batches)
            step(images, labels)
            n += len(labels)
        sync(device)
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), warm


def img_s(rate: float) -> int | float:
    """A measured rate as the rows keep it: whole img/s from 100 up, three significant figures below
    (a slow CPU's resnet50 at 224 runs under 1 img/s; rounded to 0 it would divide the headroom by 0)."""
    return round(rate) if rate >= 100 else float(f"{rate:.3g}")


def _step_batch(device, size, batch_size):
    return batch_size if device.type == "cuda" else min(batch_size, CPU_STEP_BATCH[size])


def _ladder(device: torch.device, quick: bool, settings=None) -> list[tuple[bool, bool, bool]]:
    """The (compiled, channels_last, amp) settings to run in ladder order: the named ones, else all
    but, with --quick on a CPU, the compiled one (~40 s to compile, and says nothing about a GPU)."""
    if settings:
        return [STEP_SETTINGS[name] for name in STEP_SETTINGS if name in settings]
    return [c for c in STEP_SETTINGS.values() if not (quick and c[0] and device.type != "cuda")]


def _settings(compiled, channels_last, amp) -> dict:
    return {"compiled": compiled, "memory_format": "channels_last" if channels_last else "NCHW",
            "precision": "amp" if amp else "fp32"}


def bench_train_step(store, device: torch.device, quick: bool, batch_size: int, log, models=None, settings=None,
                     sizes=SIZES, **_):
    """Training img/s on device tensors, up the ladder NCHW fp32 -> channels_last -> AMP -> compile."""
    warmup, repeats, per_repeat = STEP_PLAN["quick" if quick else "full"]
    for model_name in models or MODELS:
        for size in sizes:
            bs = _step_batch(device, size, batch_size)
            for compiled, channels_last, amp in _ladder(device, quick, settings):
                torch.manual_seed(0)
                step = make_train_step(model_name, device, compiled, channels_last, amp)
                images = torch.randn(bs, 3, size, size, device=device, dtype=_input_dtype(device, amp)).contiguous(
                    memory_format=runtime.memory_format(channels_last))
                labels = torch.randint(0, 100, (bs,), device=device)
                rate, warm = _time_steps(step, iter(lambda: (images, labels), None), device, warmup, repeats, per_repeat)
                row = {"stage": "train_step", "backend": "device tensors", "model": model_name, "image_size": size,
                       "batch_size": bs, "device": device_label(device), **_settings(compiled, channels_last, amp),
                       "input_dtype": str(images.dtype).removeprefix("torch."), "images_per_sec": img_s(rate),
                       "warmup_seconds": round(warm, 1)}
                log(f"  train_step {model_name} {size:3d}px compiled={compiled!s:5} {row['memory_format']:13s} "
                    f"{row['precision']:4s} {img_s(rate):8} img/s (warm-up {warm:.1f} s)")
                del step
                yield row


def end_to_end_spec(size: int, dtype: str):
    """end_to_end's augmentation: crop + flip at 32 (r18_cifar_32), flip + resize at 224."""
    from fastcifar.pipelines import AugSpec

    return AugSpec(image_size=size, hflip=0.5, pad_crop=4 if size == 32 else 0, normalize="cifar", dtype=dtype)


def bench_end_to_end(store, device: torch.device, quick: bool, batch_size: int, log, backends=None, models=None,
                     settings=None, sizes=SIZES, **_):
    """Img/s of the ladder's last step fed by each loader (default: tutorial, auto), training augmentation."""
    from fastcifar.pipelines import make_loader
    from fastcifar.pipelines.loader import dali_available

    warmup, repeats, per_repeat = STEP_PLAN["quick" if quick else "full"]
    compiled, channels_last, amp = _ladder(device, quick, settings)[-1]
    backends = backends or ["tutorial", "dali" if dali_available() else "torch"]
    models = models or (MODELS[:1] if quick and device.type != "cuda" else MODELS)
    need, have = warmup + repeats * per_repeat, len(store.labels("train"))
    step_batch = {size: _step_batch(device, size, batch_size) for size in sizes}
    for size, bs in step_batch.items():  # all before measuring
        if have // bs < need:
            raise BadInput(f"end_to_end needs {need} batches of {bs} in one epoch at {size} px; the store has "
                           f"{have} train images.")
    for model_name in models:
        for size, bs in step_batch.items():
            torch.manual_seed(0)
            step = make_train_step(model_name, device, compiled, channels_last, amp)
            dtype = str(_input_dtype(device, amp)).removeprefix("torch.")
            spec = end_to_end_spec(size, dtype)
            for backend in backends:
                loader = make_loader(store, "train", spec, bs, backend=backend, device=device, seed=0)
                rate, warm = _time_steps(step, iter(loader), device, warmup, repeats, per_repeat)
                row = {"stage": "end_to_end", "backend": loader.backend, "model": model_name, "image_size": size,
                       "batch_size": bs, "device": device_label(device), **_settings(compiled, channels_last, amp),
                       "input_dtype": dtype, "images_per_sec": img_s(rate), "warmup_seconds": round(warm, 1),
                       "aug": "crop+flip" if size == 32 else "flip"}
                log(f"  end_to_end {model_name} {size:3d}px {loader.backend:9s} {img_s(rate):8} img/s")
                del loader
                yield row
            del step


# ---- packing: runs per hour of K short training runs at once on one device

PACKING = (1, 2, 4)  # runs at once on the one GPU (on a CPU: splitting its cores)
PACKING_RECIPE = "r18_cifar_32"
# The run timed K at once, per device and --quick: (epochs, train and test images, batch size); None:
# the whole split, the recipe's batch. A CPU's is tiny but some batches long: steady state skips the first.
PACKING_RUN = {("cuda", False): (3, None, None, None), ("cuda", True): (1, 10_000, 2_000, None),
               ("cpu", False): (1, 500, 100, 50), ("cpu", True): (1, 100, 50, 25)}


def bench_packing(store, device: torch.device, quick: bool, log, **_):
    """Runs per hour of K short r18_cifar_32 runs at once by runs.py's scheduler (GPU: --per-gpu K; CPU:
    --jobs K), first start to last end; images_per_sec: their img/s summed; vs_one: over one at a time."""
    from fastcifar import runs
    from fastcifar.config import apply_overrides, load

    epochs, n_train, n_test, batch = PACKING_RUN[(device.type, quick)]
    sets = [f"train.epochs={epochs}", f"train.device={device.type}"]  # the --set list of the short run
    for field, n, split in (("subset", n_train, "train"), ("test_subset", n_test, "test")):
        total = len(store.labels(split))
        if n is not None and n < total:
            sets.append(f"data.{field}={n / total:.6g}")
    sets += [f"data.batch_size={batch}"] if batch else []
    gpu = runs.visible_gpus()[device.index or 0] if device.type == "cuda" else None
    one = None  # runs per hour of one at a time
    for k in PACKING:
        with tempfile.TemporaryDirectory(prefix="fastcifar-packing-") as tmp:
            jobs = []
            for seed in range(k):
                r, info = load(PACKING_RECIPE)
                extra = sets + [f"train.seed={seed}"]
                jobs.append(runs.Job(PACKING_RECIPE, seed, apply_overrides(r, extra), {**info, "overrides": extra},
                                     Path(tmp) / f"run-seed{seed}"))
            pool = runs.LocalPool(per_gpu=k, gpus=[gpu]) if gpu is not None else runs.LocalPool(jobs=k)
            t = time.perf_counter()
            try:
                failed = runs.run(jobs, pool, "bench", lambda: None, "", data_dir=store.dir, log=None)
            except runs.Stopped:
                raise KeyboardInterrupt from None  # the bench keeps the rows measured before
            wall = time.perf_counter() - t
            if failed:  # a run's own bad input (say, a store too small for its batch) is the user's; else a bug
                text = "The packing bench's runs did not finish: " + "; ".join(
                    f"seed {seed}: {text}" for (_, seed), (_, text) in failed.items())
                raise (BadInput if any(kind == "bad input" for kind, _ in failed.values()) else RuntimeError)(text)
            summaries = [jsonio.load(j.dir / "summary.json") for j in jobs]
        rates = [s.get("train_images_per_sec") for s in summaries]
        rate = sum(rates) if None not in rates else None  # None: a run too short for a steady state
        recipe = jobs[0].recipe
        row = {"stage": "packing", "backend": summaries[0]["backend"], "model": recipe.model.name,
               "image_size": recipe.aug.image_size, "batch_size": recipe.data.batch_size,
               "device": device_label(device), "runs_at_once": k, "threads_per_run": pool.threads,
               "run": f"{PACKING_RECIPE} " + " ".join(sets), "wall_seconds": round(wall, 1),
               "runs_per_hour": round(3600 * k / wall, 1), "images_per_sec": img_s(rate) if rate else None}
        one = one or row["runs_per_hour"]
        row["vs_one"] = round(row["runs_per_hour"] / one, 2)
        log(f"  packing {k} at once on {row['device']}: {row['runs_per_hour']} runs/h ({wall:.0f} s for {k}, "
            f"{row['vs_one']}x one at a time)" + (f", {row['images_per_sec']} img/s summed" if rate else ""))
        yield row


STAGES = {"pipeline": bench_pipeline, "train_step": bench_train_step, "end_to_end": bench_end_to_end,
          "packing": bench_packing}
OPT_IN = ("packing",)  # stages only --stage runs (minutes of training processes)


def headroom(rows: list[dict]) -> list[dict]:
    """Per pipeline backend, model and size: OneOf loader img/s over the fastest step's (< 1: data-bound)."""
    steps = {}
    for r in rows:
        if r["stage"] == "train_step":
            key = (r["model"], r["image_size"])
            steps[key] = max(steps.get(key, 0), r["images_per_sec"])
    e2e = {(r["backend"], r["model"], r["image_size"]): {"end_to_end_img_s": r["images_per_sec"]}
           for r in rows if r["stage"] == "end_to_end"}
    return [{"pipeline": r["backend"], "model": model, "image_size": size, "aug": r["aug"],
             "pipeline_img_s": r["images_per_sec"], "train_step_img_s": step_rate, "headroom":
             round(r["images_per_sec"] / step_rate, 2), **e2e.get((r["backend"], model, size), {})}
            for r in rows if r["stage"] == "pipeline" and r["aug"] == "oneof" and r["backend"] != HOST
            for (model, size), step_rate in steps.items() if size == r["image_size"]]


def bench_store(data_dir, quick: bool, log):
    """The prepared store, else a synthetic stand-in (throughput does not depend on the pictures)."""
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


def run(stages=None, json_path=None, quick=False, backends=None, batch_size=250, data_dir=None, device=None,
        models=None, settings=None, log=print, plot_path=None, sizes=None) -> list[dict]:
    """Run the stages, print the tables, write JSON after every row and the picture; Ctrl-C: Stopped."""
    # a flag given twice is measured once (as --size), not its stage or model all over again
    stages = stages or [s for s in STAGES if s not in OPT_IN]
    stages, backends, models = (list(dict.fromkeys(x)) if x else x for x in (stages, backends, models))
    for given, known, what in ((stages, STAGES, "bench stage {!r}; the stages are: {}"),
                               (backends, PIPELINE_BACKENDS, "pipeline backend {!r}; choose from {}"),
                               (settings, STEP_SETTINGS, "step setting {!r}; choose from {}")):
        bad = [x for x in given or () if x not in known]
        if bad:
            raise BadInput(f"Unknown {what.format(bad[0], ', '.join(known))}.")
    if batch_size < 1:
        raise BadInput(f"--batch-size {batch_size}: must be at least 1.")
    bad = [x for x in sizes or () if x not in SIZES]
    if bad:
        raise BadInput(f"--size {bad[0]}: the bench measures {' or '.join(map(str, SIZES))} px (the stored side "
                       f"and the pretrained recipes').")
    sizes = tuple(dict.fromkeys(sizes or SIZES))
    if models:
        import timm

        bad = [m for m in models if not timm.is_model(m)]
        if bad:
            raise BadInput(f"--model {bad[0]!r} is not a timm model name (see timm.list_models()).")
    device = runtime.command_device(device)
    if json_path is not None and plot_path is not None and os.path.realpath(json_path) == os.path.realpath(plot_path):
        raise BadInput(f"--json {json_path} and --plot {plot_path} name the same file; the picture would replace "
                       f"the JSON. Give each its own path.")
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:  # now, not after minutes of benchmarking
            check_json_path(Path(path), option)
    store = bench_store(data_dir, quick, log)
    dali, (amp, why) = provenance.version("nvidia.dali"), runtime.resolve_amp(device, "auto")
    meta = {"fastcifar": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "device": device_label(device), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            **({"dali": dali} if dali else {}), "quick": quick,
            "store": provenance.data_info(store)["dataset"], "amp_auto": amp}  # train.amp=auto's pick
    log(f"bench on {meta['device']} ({meta['cpu_cores']} CPU cores), batch {batch_size}{', quick' if quick else ''}")
    log(f"train.amp=auto picks {amp} here ({why.removeprefix('auto: ')}); the AMP rungs run "
        f"{str(_amp_dtype(device)).removeprefix('torch.')}")
    rows, stopped = [], None

    def save(complete: bool):
        if json_path is not None:
            write_json(Path(json_path), {"meta": {**meta, "complete": complete}, "rows": rows,
                                         "headroom": headroom(rows)})

    def too_big(e):  # the stage `name` ran out of memory
        kept = f" The {len(rows)} rows measured before are in {json_path} (meta.complete: false)." \
            if json_path is not None and rows else ""
        return BadInput(f"The {name} stage ran out of device memory at --batch-size {batch_size} on "
                        f"{device_label(device)} ({runtime.memory_error(e)}); use a smaller --batch-size, "
                        f"or a smaller --model or --size.{kept}")

    # the kernel choices a training run makes; SIGTERM (a job's time limit) stops as Ctrl-C does
    with runtime.backend_settings(deterministic=False), sigterm_as_ctrl_c():
        try:
            for name in stages:
                with runtime.out_of_memory_as(too_big):
                    for row in STAGES[name](store=store, device=device, quick=quick, batch_size=batch_size,
                                            backends=backends, models=models, settings=settings, sizes=sizes, log=log):
                        rows.append(row)
                        vs_tutorial(rows)
                        save(complete=False)
        except KeyboardInterrupt:
            stopped = f"Stopped after {len(rows)} row{'s' * (len(rows) != 1)}; the tables below hold them."
            log(f"\n{stopped}")
            stages = [name for name in stages if any(r["stage"] == name for r in rows)]
    room = headroom(rows)
    for name in stages:
        log(f"\n{name}:\n" + table([r for r in rows if r["stage"] == name]))
    if room:
        log("\nheadroom (pipeline img/s with the OneOf policy over the fastest train step's; below 1 the data "
            "is the bottleneck):\n" + table(room))
    if json_path is not None:
        save(complete=stopped is None)
        log(f"wrote {json_path}" + (" (meta.complete: false)" if stopped else ""))
    if plot_path is not None:
        plot({"meta": meta, "rows": rows, "headroom": room}, Path(plot_path))
        log(f"wrote {plot_path}")
    if stopped:
        raise Stopped(stopped)
    return rows


def check_json_path(path: Path, option: str = "--json", by: str = "bench") -> None:
    """BadInput unless path can be written, replacing only a file `fastcifar by` wrote (owned.py)."""
    example = f"{by}.json" if option == "--json" else f"{by}.png"
    if str(path) == "-":  # the usual name of stdout, where the tables go; not a file named -
        raise BadInput(f"{option} - : {by} prints to stdout and writes {option} to a file; give a path such as "
                       f"{example}.")
    if path.is_dir():
        raise BadInput(f"{option} {path} is a directory; give a file path such as {path / example}.")
    if option == "--plot" and path.suffix.lower() != ".png":
        raise BadInput(f"--plot {path}: the picture is a PNG; name it *.png, e.g. {path.with_suffix('.png')}.")
    owned.check([path], by, f"{by} would replace {{it}}: move {{it}} away, or choose another {option} path.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):  # a file made and removed: the folder takes new files
            pass
    except (FileExistsError, NotADirectoryError):  # mkdir met a file where a folder of the path should be
        in_way = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), path.parent)
        raise BadInput(f"Cannot write {path}: {in_way} is a file, not a directory; choose another {option} path.")
    except OSError as e:
        raise BadInput(f"Cannot write {path} ({e.strerror or e}); choose a writable {option} path.")


def write_json(path: Path, obj, by: str = "bench") -> None:
    """checkpoint.write_json (atomic; replacing only a file `fastcifar by` wrote), an unwritable path bad input."""
    from fastcifar.checkpoint import write_json as atomic_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(path, obj, by=by)
    except OSError as e:
        raise BadInput(f"Cannot write {path} ({e.strerror or e}); choose a writable --json path.")


# ---- The picture: the pipeline table and the headroom as bar charts

# (px, aug): the picture's groups of bars, and their labels
AUG_LABELS = {"none": "no aug", "oneof": "OneOf", "trivialaugment": "TrivialAug", "randaugment": "RandAug"}
PIPE_COLUMNS = [(px, aug) for px in (32, 224) for aug in AUG_LABELS]


def figure(bench: dict):
    """A matplotlib figure of a bench result: pipeline img/s (the tutorial's hatched) and the headroom."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows, room, m = bench.get("rows", []), bench.get("headroom", []), bench.get("meta", {})
    pipe = [r for r in rows if r.get("stage") == "pipeline" and r.get("backend") != HOST]  # loaders only
    if not pipe and not room:
        raise BadInput("The bench result has no pipeline rows and no headroom to draw; run the pipeline stage.")
    panels = [p for p, present in (("pipeline", pipe), ("headroom", room)) if present]
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 5), dpi=110, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def bars(ax, groups, series, value, fmt, label=lambda name: name):  # one bar per series in each group
        width = 0.8 / len(series)
        for k, name in enumerate(series):
            values = [value(name, g) for g in groups]
            drawn = ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))], values, width,
                           color=colours[k % len(colours)], hatch="//" if name == "tutorial" else None,
                           edgecolor="black", label=label(name), gid=name)
            ax.bar_label(drawn, labels=[fmt(v) if v else "" for v in values], fontsize=7)

    for ax, panel in zip(axes[0], panels):
        if panel == "pipeline":
            cols = [c for c in PIPE_COLUMNS if any((r["image_size"], r.get("aug")) == c for r in pipe)]
            bars(ax, cols, list(dict.fromkeys(r["backend"] for r in pipe)),
                 lambda b, c: next((r["images_per_sec"] for r in pipe if (r["backend"], r["image_size"], r.get("aug"))
                                    == (b, *c)), 0), lambda v: f"{v / 1000:.1f}k",
                 lambda b: "tutorial path (per-image DataLoader)" if b == "tutorial" else b)
            ax.set_xticks(range(len(cols)), [f"{px} px\n{AUG_LABELS[aug]}" for px, aug in cols], fontsize=8)
            ax.set_ylabel("images / s (log)")
            ax.set_title(f"pipeline alone, batch {pipe[0]['batch_size']}")
        else:
            groups = list(dict.fromkeys((h["model"], h["image_size"]) for h in room))
            bars(ax, groups, list(dict.fromkeys(h["pipeline"] for h in room)),
                 lambda p, g: next((h["headroom"] for h in room if (h["pipeline"], h["model"], h["image_size"]) ==
                                    (p, *g)), 0), lambda v: f"{v:.3g}x")
            ax.axhline(1.0, color="red", linestyle="--", gid="parity", label="1x: below it the data is the bottleneck")
            ax.set_xticks(range(len(groups)), [f"{model}\n{px} px" for model, px in groups])
            ax.set_ylabel("pipeline img/s (OneOf) / fastest train step img/s (log)")
            ax.set_title("headroom")
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"fastcifar bench on {m.get('device', '?')} ({m.get('cpu_cores', '?')} CPU cores), torch "
                 f"{m.get('torch', '?')}, DALI {m.get('dali', 'not installed')}, {m.get('store', '?')} store, "
                 f"{m.get('time', '?')}" + (", --quick" if m.get("quick") else ""), fontsize=9)
    fig.tight_layout()
    return fig


def plot(bench: dict, path: Path) -> None:
    """figure(bench) saved as a PNG at path (atomically; replacing only a file a bench wrote)."""
    import matplotlib.pyplot as plt

    from fastcifar.checkpoint import atomic_write

    fig = figure(bench)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: fig.savefig(f, format="png"), by="bench")
    except OSError as e:
        raise BadInput(f"Cannot write {path} ({e.strerror or e}); choose a writable --plot path.")
    finally:
        plt.close(fig)
