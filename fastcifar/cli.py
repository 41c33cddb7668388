"""The `fastcifar` command line: it picks what to run and hands over; the work lives in the modules."""

from __future__ import annotations

import errno
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

import typer

from fastcifar import __version__
from fastcifar.errors import BadInput, why
from fastcifar.signals import sigterm_as_ctrl_c, stop_signals


class Commands(typer.core.TyperGroup):
    """The group: a Ctrl-C (SIGTERM, SIGHUP) no command catches says so, exit 130 (typer's is silent)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=Commands,
    help="CIFAR-100 (and CIFAR-10) training at the speed of the GPU: prepare the data once, then train "
         "recipes with a DALI (or torch) GPU pipeline; benchmark, report, reproduce tables, export and predict.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion: commands, options, recipe names
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)

DATA_DIR_HELP = ("Store directory (default: CIFAR-100's is $FASTCIFAR_DATA, else ./data/cifar100; CIFAR-10's "
                 "is cifar10 beside it, ./data/cifar10).")


def _version(value: bool):
    if value:
        typer.echo(f"fastcifar {__version__}")
        raise typer.Exit()


def _complete_recipe(incomplete: str) -> list[str]:
    """Recipe names for shell completion (a path completes as a file)."""
    from fastcifar.config import available

    return [n for n in available() if n.startswith(incomplete)]


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    pass


@app.command()
def prepare(
    dataset: str = typer.Option("cifar100", "--dataset", help="cifar100 or cifar10 (the official "
                                "cifar-10-python.tar.gz; 10 classes, no coarse labels)."),
    source: Optional[Path] = typer.Option(None, "--from", help="A local cifar-100-python.tar.gz (cifar-10-python.tar.gz) "
                                          "or its extracted cifar-100-python/ (cifar-10-batches-py/) directory, "
                                          "instead of downloading."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Accept data in the official format whose md5s "
                                   "differ from the official ones (it is still validated in full)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Generate a learnable stand-in data set (classes "
                                   "told apart by shape, texture and colour) for machines without internet."),
    n_train: Optional[int] = typer.Option(None, "--train", help="Synthetic train images (1 to 2,000,000) "
                                          "[default: 50000]."),
    n_test: Optional[int] = typer.Option(None, "--test", help="Synthetic test images (1 to 2,000,000) "
                                         "[default: 10000]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Synthetic data seed, 0 or more [default: 0]."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a complete store from the same source exists."),
):
    """Convert CIFAR-100 (or CIFAR-10) into memory-mapped uint8 arrays (download and checksum it by default).

    The store is built in a temporary directory and renamed into place; a second run on the same
    source returns at once. The data dir must be missing, empty, or a store fastcifar wrote.
    """
    from fastcifar.data import prepare as run_prepare

    if synthetic and source is not None:
        raise BadInput("--synthetic and --from exclude each other: pick one source.")
    given = [flag for flag, v in (("--train", n_train), ("--test", n_test), ("--seed", seed)) if v is not None]
    if given and not synthetic:  # the official data's splits are fixed: a subset is data.subset at training
        raise BadInput(f"{' and '.join(given)} shape{'s' * (len(given) == 1)} a --synthetic data set only, and the "
                       f"official one has fixed splits; add --synthetic, or drop {' and '.join(given)} (to train on "
                       f"part of the official data, set data.subset).")
    run_prepare(data_dir=data_dir, source=source, synthetic=synthetic, n_train=50000 if n_train is None else n_train,
                n_test=10000 if n_test is None else n_test, seed=seed or 0, verify=not no_verify, force=force,
                dataset=dataset)


@app.command()
def recipes():
    """List the recipes, where each comes from, and their one-line descriptions.

    A name is looked up in ./recipes first, then in the recipes installed with fastcifar;
    RECIPE ending in .py or holding a / is a file path and is used as it is.
    """
    import ast

    from fastcifar.config import installed_recipes_dir, recipe_dirs, recipe_sources

    found = recipe_sources()
    if not found:
        raise BadInput(f"No recipes found in ./recipes or in the installed recipes ({installed_recipes_dir()}): "
                       f"the installation is incomplete; reinstall fastcifar, or give a recipe path to `fastcifar train`.")
    rows = [("NAME", "FROM", "DESCRIPTION")]
    for name, sources in found.items():
        label, path = sources[0]
        try:  # bytes: ast honours the file's coding line; a huge expression is a RecursionError
            doc = ast.get_docstring(ast.parse(path.read_bytes())) or ""
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError) as e:
            doc = f"(unreadable: {why(e)})"
        rows.append((name, label + ("*" if len(sources) > 1 else ""), doc.strip().splitlines()[0] if doc.strip() else ""))
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    for name, label, doc in rows:
        typer.echo(f"{name:<{w0}}  {label:<{w1}}  {doc}".rstrip())
    typer.echo("")
    for label, d in recipe_dirs().items():
        typer.echo(f"{label + ':':<{w1 + 1}} {d.resolve()}")
    if any(len(s) > 1 for s in found.values()):
        typer.echo("* shadows the installed recipe of the same name (a recipe may derive from it by its own name)")


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, metavar="RECIPE", autocompletion=_complete_recipe,
                                           help="A recipe path (recipes/r18_arcface_224.py) or name "
                                           "(r18_arcface_224); with --resume it comes from the checkpoint."),
    overrides: List[str] = typer.Option([], "--set", metavar="SECTION.FIELD=VALUE", help="Override a recipe field, "
                                        "type-checked; repeatable. E.g. --set train.epochs=30 --set optim.lr=3e-4."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: `./runs/<recipe>-<YYYYmmdd-HHMMSS>`)."),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="RUN_DIR", help="Continue the run in RUN_DIR "
                                          "from its last.pt (exactly where it stopped); with --out NEW_DIR, continue "
                                          "it there instead, RUN_DIR only read (a run copied from elsewhere). More "
                                          "epochs (--set train.epochs=N) keep its LR schedule and train at its final "
                                          "LR; after a schedule that ends at LR 0 they are refused."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
):
    """Train a recipe (a path like recipes/r18_arcface_224.py or a name like r18_arcface_224).

    Writes a run directory: recipe.json, recipe.py, TensorBoard events, metrics.jsonl, last.pt, best.pt, summary.json.
    Ctrl-C, SIGTERM or SIGHUP saves last.pt and exits 130; --resume RUN_DIR continues the run.
    Under torchrun (torchrun --nproc-per-node N -m fastcifar train ...) data.batch_size is the global batch.
    """
    from fastcifar import config
    from fastcifar.runs import stop_with_parent
    from fastcifar.train import Diverged, Interrupted, last_checkpoint
    from fastcifar.train import train as run_train

    stop_with_parent()  # a run that reproduce or sweep started stops (and saves) with them
    try:  # a Ctrl-C anywhere in here (loading a recipe, preparing the store) exits 130 too
        last = None
        if resume is not None:
            last = last_checkpoint(resume)  # read once: the recipe here, the run's state in train
            r, info = config.from_dict(last["recipe"]), dict(last["info"])
            if recipe is not None and recipe not in (info["name"], info.get("path")):
                raise BadInput(f"--resume {resume} continues a run of {info['name']!r}, not {recipe!r}; drop RECIPE "
                               f"or start a new run without --resume.")
        elif recipe is None:
            raise BadInput("Name a recipe to train (`fastcifar recipes` lists them), or --resume RUN_DIR.")
        else:
            r, info = config.load(recipe)
        config.apply_overrides(r, overrides)
        if overrides:
            info["overrides"] = list(info.get("overrides", [])) + list(overrides)
        run_train(r, info, out=out, data_dir=data_dir, resume=resume, last=last)
    except Interrupted as e:
        typer.echo(str(e), err=True)
        sys.exit(130)
    except Diverged as e:
        fail(str(e), code=1)


@app.command(name="eval")
def evaluate(
    checkpoint_ref: str = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A run directory (its best.pt), a "
                                         "checkpoint (.pt) or a recipe name (its newest run under runs/)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    backend: Optional[str] = typer.Option(None, "--backend", help="Loader backend [default: the recipe's]."),
    batch_size: int = typer.Option(500, "--batch-size", help="Images per evaluation batch."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present) | cpu | cuda | cuda:N (made the "
                               "current GPU). The run's train.amp is resolved for this device (auto: fp32 on a CPU "
                               "without native bf16)."),
    weights: str = typer.Option("auto", "--weights", help="auto (the EMA weights when the checkpoint has them, "
                                "else the raw ones) | raw | ema."),
    tta: Optional[str] = typer.Option(None, "--tta", help="Test-time augmentation: none | flip (logits averaged "
                                      "with the mirrored image's) [default: the recipe's train.tta]."),
):
    """Print test top-1/top-5 of a checkpoint, and which weights and test-time augmentation gave them."""
    from fastcifar.train import evaluate_checkpoint

    res = evaluate_checkpoint(checkpoint_ref, data_dir=data_dir, backend=backend, batch_size=batch_size, device=device,
                              tta=tta, weights=weights)
    precision = "fp32" if res["amp"] == "none" else res["amp"]
    typer.echo(f"{res['checkpoint']} ({res['recipe']}, epoch {res['epoch']}, {res['weights']} weights, TTA "
               f"{res['tta']}, {precision}): test top-1 {res['acc']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
               f"on {res['images']} images" + (" of a SYNTHETIC store" if res["synthetic"] else ""))


@app.command()
def bench(
    stage: Optional[List[str]] = typer.Option(None, "--stage", help="Stage to measure, repeatable: pipeline, "
                                              "train_step, end_to_end (default: these three), packing (only when "
                                              "named: minutes of training runs)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write {meta, rows, headroom} as JSON to this file "
                                              "(replacing a file only if a bench wrote it; also for --plot)."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", metavar="PNG", help="Also draw the pipeline table (img/s "
                                             "per backend and size, the tutorial's path hatched) and the headroom as "
                                             "a PNG. For a JSON already written: python bench/tables.py FILE --plot PNG."),
    quick: bool = typer.Option(False, "--quick", help="Fewer, shorter repeats: a smoke run, rough figures."),
    backend: Optional[List[str]] = typer.Option(None, "--backend", help="Pipeline backend, repeatable: tutorial, "
                                                "torch, dali (default: all that import)."),
    model: Optional[List[str]] = typer.Option(None, "--model", help="timm model for train_step and end_to_end, "
                                              "repeatable (default: resnet18 and resnet50)."),
    setting: Optional[List[str]] = typer.Option(None, "--setting", help="train_step setting, repeatable: nchw_fp32, "
                                                "cl_fp32, cl_amp, compiled_cl_amp (default: all; --quick on a CPU "
                                                "skips compiling). end_to_end uses the last one."),
    size: Optional[List[int]] = typer.Option(None, "--size", help="Image side in px, repeatable, measured in the "
                                             "order given: 32, 224 (default: both)."),
    batch_size: int = typer.Option(250, "--batch-size", help="Images per batch (the tutorial's 250); train steps on a CPU take at most 64 at 32 px and 8 at 224 px."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (made the current GPU; "
                                         "default: cuda if there is one)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Store directory (default: $FASTCIFAR_DATA, "
                                            "else ./data/cifar100); without a store, a synthetic stand-in in the temp dir."),
):
    """Measure throughput: pipeline, train step and end to end, beside the tutorial's data path.

    Each row gives images/s after warm-up (the median of timed repeats; warm-up and compile reported apart).

    - pipeline: each loader backend at 32 and 224 px with no augmentation, OneOf, TrivialAugment and RandAugment; after each DALI row, dali-host: its host side alone.
    - train_step: resnet18/50 on device tensors up the ladder NCHW fp32, channels_last, AMP, torch.compile.
    - end_to_end: the tutorial's loader and the one data.backend=auto picks, feeding the last --setting.
    - packing (only with --stage packing): runs per hour of 1, 2 and 4 short r18_cifar_32 runs at once through the scheduler of `reproduce` (on a GPU all pinned to it, on a CPU splitting the cores), beside one at a time (vs_one).

    The headroom table divides pipeline by train_step img/s: below 1, data is the bottleneck. --json is
    rewritten after every row: Ctrl-C or SIGTERM prints the tables so far, meta.complete: false, exit 130.
    """
    from fastcifar.bench import Stopped
    from fastcifar.bench import run as run_bench

    try:
        run_bench(stages=stage, json_path=json_path, quick=quick, backends=backend, batch_size=batch_size,
                  data_dir=data_dir, device=device, models=model, settings=setting, log=typer.echo, plot_path=plot_path,
                  sizes=size)
    except Stopped:
        sys.exit(130)  # the rows measured so far are printed and in --json (meta.complete: false)


@app.command()
def doctor(
    device: str = typer.Option("auto", "--device", help="auto (cuda when present) | cpu | cuda | cuda:N."),
    budget: float = typer.Option(180.0, "--budget", metavar="SECONDS", help="Wall-clock seconds for the whole "
                                 "run, compiles included; a step that does not fit in what is left is skipped and "
                                 "named."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Also write the versions, checks "
                                             "and rows as JSON (replacing only an earlier doctor JSON)."),
):
    """Does fastcifar work on this machine, and how fast: within a three-minute budget, compiles included.

    Prints the versions and the precision train.amp=auto picks, then checks (agreement: DALI gives the torch backend's images; compile: a compiled Trainer with no shape recompile; resume: bit for bit) and throughput beside its H100/H200 targets (DALI OneOf@224, resnet18@224 and resnet50@224 steps, end_to_end / step). On a CPU the same steps run at toy sizes.

    Each step runs in a process of its own with a cap. Exit status: 0 when every check passed; 1 when one failed or did not fit in the budget, or a step crashed or hung (a figure below its target is marked NO, not a failure); 2 for bad input; 130 on Ctrl-C, after printing what was done.
    """
    import shlex

    from fastcifar.doctor import Stopped
    from fastcifar.doctor import run as run_doctor

    command = shlex.join(["fastcifar", *sys.argv[1:]])  # what bench/RESULTS.md records
    try:
        code = run_doctor(device=device, budget=budget, json_path=json_path, log=typer.echo, command=command)
    except Stopped as e:
        typer.echo(str(e), err=True)
        sys.exit(130)
    sys.exit(code)


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., metavar="RUN_DIR_OR_FOLDER...", help="Run directories, or folders of "
                                      "them (e.g. runs/)."),
    out: Path = typer.Option(Path("report"), "--out", help="Where results.md and the PNG plots go (files there are "
                             "replaced only if an earlier report wrote them)."),
    sort: str = typer.Option("run", "--sort", help="Row order: run (as given), best_acc (highest first), "
                             "time_to_target (fastest to its train.target_acc first; runs that did not reach one last)."),
):
    """Turn run directories into the results table (markdown) and accuracy/loss plots (PNG).

    The table has the tutorial's shape (recipe, what it changes, best and final test accuracy, wall
    time, img/s), validation apart when held out, data wait and time to target when runs have them.
    It warns when runs differ in data or software, or selected their epoch on the test set. A run
    that cannot be reported (it died in its first epoch, damaged files) is skipped and named.
    """
    from fastcifar.report import report as make_report

    table, files = make_report(runs, out, warn=lambda msg: typer.echo(msg, err=True), sort=sort)
    typer.echo(table)
    typer.echo("wrote " + ", ".join(str(f) for f in files))


@app.command(name="export")
def export_cmd(
    ref: str = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A run directory (its best.pt), a checkpoint "
                              "(.pt) or a recipe name (its newest run under runs/)."),
    fmt: str = typer.Option(..., "--format", "-f", metavar="onnx|safetensors|timm", help="onnx: the whole evaluation "
                            "model for onnxruntime (dynamic batch); safetensors: the weights with fastcifar's metadata "
                            "(model, head, classes, preprocessing); timm: a state dict that timm.create_model(name, "
                            "num_classes=N) loads with strict=True (linear heads only)."),
    out: Optional[Path] = typer.Option(None, "--out", help="File to write, or a directory to write it in (default: "
                                       "beside the checkpoint: best.onnx, best.safetensors, best-timm.pth)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file that fastcifar export wrote."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP + " Test images for the check "
                                            "(else seeded noise)."),
):
    """Export a trained model for use outside fastcifar: ONNX, safetensors, or a plain timm state dict.

    Every export is loaded back and compared with the fastcifar network on a few images before it is written. An existing file is replaced only with --force, and only if fastcifar export wrote it. Needs pip install "fastcifar[export]".
    """
    from fastcifar.export import CheckFailed, export

    try:
        export(ref, fmt, out=out, data_dir=data_dir, force=force, log=typer.echo)
    except CheckFailed as e:
        fail(str(e), code=1)


@app.command()
def predict(
    ref: str = typer.Argument(..., metavar="RUN_OR_CHECKPOINT_OR_EXPORT", help="A run directory, checkpoint, recipe "
                              "name, or an export of `fastcifar export` (.onnx or .safetensors)."),
    images: List[Path] = typer.Argument(..., metavar="IMAGE_OR_DIR...", help="Image files (PNG, JPEG, any size) or "
                                        "directories (searched recursively for .png/.jpg/.jpeg)."),
    top: int = typer.Option(5, "--top", help="How many classes to show per image."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document {model, format, predictions: "
                                  "[{file, top: [{class, index, prob}]}], skipped: [{file, error}]}."),
):
    """Print the top classes and their probabilities for image files, on the CPU.

    Each image is made RGB, centre-cropped, resized to 32x32 as CIFAR's are, then preprocessed as in evaluation.
    Unreadable files are named on stderr and skipped; exit 2 only if no image could be read.
    """
    import json

    from fastcifar.predict import predict as run_predict

    res = run_predict(ref, images, top=top, log=lambda m: typer.echo(m, err=True))
    if json_out:
        typer.echo(json.dumps(res, indent=2))
        return
    for p in res["predictions"]:
        typer.echo(p["file"])
        for t in p["top"]:
            typer.echo(f"  {100 * t['prob']:6.2f}%  {t['class']}")


# The scheduling options of reproduce and sweep (fastcifar/runs.py), declared once for both
JOBS = typer.Option(None, "--jobs", "-j", help="Runs at once on this machine (default: one per visible GPU times "
                    "--per-gpu; on a CPU 1). Each run is its own `fastcifar train` process, pinned to one GPU "
                    "(CUDA_VISIBLE_DEVICES).")
PER_GPU = typer.Option(None, "--per-gpu", help="Runs packed onto each GPU (default 1); with --ray, each run holds "
                       "1/K of a GPU.")
THREADS = typer.Option(None, "--threads", help="CPU threads per run (OMP_NUM_THREADS; a Ray task's num_cpus). "
                       "Default: $OMP_NUM_THREADS, else this machine's cores / --jobs (with --ray: 1). On a CPU a "
                       "run's numbers depend on it.")
RAY = typer.Option(None, "--ray", metavar="ADDRESS", help="Send the runs to a Ray cluster (HOST:PORT, or auto: "
                   "$RAY_ADDRESS, else the one started on this machine) as Ray tasks; --out must be on a file system "
                   'every node shares (checked first). Needs pip install "fastcifar[cluster]".')


def run_many(make):
    """Run a reproduce or sweep call: exit 130 when stopped (with the command that continues), 1 when
    runs did not finish (2 when one was bad input), else 0."""
    from fastcifar.runs import Stopped

    try:
        results = make()
    except Stopped as e:
        typer.echo(str(e), err=True)
        sys.exit(130)
    failed = results.get("failed") or {}
    if failed:
        code = 2 if any(kind == "bad input" for kind, _ in failed.values()) else 1
        fail("These runs did not finish: " + "; ".join(f"{k}: {text}" for k, (_, text) in failed.items()), code=code)


@app.command()
def reproduce(
    table: str = typer.Argument(..., metavar="TABLE", help="tutorial (the tutorial's twelve experiments), or a file "
                                "listing recipe names or paths, one per line (# starts a comment)."),
    seeds: int = typer.Option(1, "--seeds", help="Runs per recipe, with train.seed = 0 .. N-1."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory of the table's runs and results "
                                       "(default: `./runs/reproduce-<table>`). Run the same command again to continue."),
    overrides: List[str] = typer.Option([], "--set", metavar="SECTION.FIELD=VALUE", help="Override a field of every "
                                        "run, repeatable; e.g. --set train.epochs=2 for a dry run."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    jobs: Optional[int] = JOBS,
    per_gpu: Optional[int] = PER_GPU,
    threads: Optional[int] = THREADS,
    ray: Optional[str] = RAY,
):
    """Train a table of recipes, N seeds each, and write results.md / results.json with mean ± std.

    Runs go to `DIR/<recipe>-seed<k>`, a distillation teacher before its student (seed k of the
    student learns from seed k of the teacher this table trained). Each run is a `fastcifar train`
    process of its own (its lines in the train.log of its run directory): --jobs N at once on this
    machine, --per-gpu K on each GPU, or as tasks on a Ray cluster (--ray). One line per run as it starts and ends, and a
    summary (running, done, waiting, ETA). Ctrl-C or SIGTERM stops every run (each saves its last.pt;
    exit 130); the same command continues: finished runs are skipped (never retrained, even with their
    .pt files deleted), an interrupted one resumes from its last.pt. A second reproduce of the same DIR
    while one runs is refused. The results list per recipe the best and final test accuracy (mean ±
    std, n), the tutorial's figure and the difference, wall time and img/s. Only files fastcifar wrote
    in DIR are ever replaced or deleted. Exit 1 when runs did not finish (a diverged one's students are
    skipped).
    """
    from fastcifar.reproduce import reproduce as run_table

    run_many(lambda: run_table(table, seeds=seeds, out=out, overrides=overrides, data_dir=data_dir, log=typer.echo,
                               jobs=jobs, per_gpu=per_gpu, threads=threads, ray=ray))


@app.command()
def sweep(
    recipe: str = typer.Argument(..., metavar="RECIPE", autocompletion=_complete_recipe, help="A recipe path or name."),
    grids: List[str] = typer.Option([], "--grid", metavar="SECTION.FIELD=V1,V2,...", help="A field and its values, "
                                    "typed as --set values are (split at commas outside brackets: "
                                    "optim.betas=(0.9,0.999),(0.9,0.99)); repeatable: every combination runs."),
    seeds: int = typer.Option(1, "--seeds", help="Runs per setting, with train.seed = 0 .. N-1."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory of the sweep's runs and results (default: "
                                       "`./runs/sweep-<recipe>`). Run the same command again to continue."),
    overrides: List[str] = typer.Option([], "--set", metavar="SECTION.FIELD=VALUE", help="Override a field of every "
                                        "run, repeatable (not a --grid field)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    jobs: Optional[int] = JOBS,
    per_gpu: Optional[int] = PER_GPU,
    threads: Optional[int] = THREADS,
    ray: Optional[str] = RAY,
):
    """Train every combination of a grid of settings, N seeds each, and rank them by mean best accuracy.

    `fastcifar sweep r18_cifar_32 --grid optim.lr=0.05,0.1,0.2 --grid loss.label_smoothing=0,0.1 --seeds 3`
    runs 3 x 2 settings x 3 seeds = 18 runs, each named by its settings (`DIR/lr=0.05,label_smoothing=0-seed0`),
    through reproduce's scheduler: --jobs, --per-gpu, --ray, Ctrl-C and the same command to continue, a lock
    on DIR. DIR/results.md and results.json rank the settings by mean best test accuracy (± sample std over
    the finished seeds, n); `fastcifar report DIR` draws them (sweep.png). At most 1,000 runs; empty or
    repeated values, a field given twice or also in --set, train.seed (use --seeds) and values that would
    give two settings one name are refused.
    """
    from fastcifar.sweep import sweep as run_sweep

    run_many(lambda: run_sweep(recipe, grids, seeds=seeds, out=out, overrides=overrides, data_dir=data_dir,
                               log=typer.echo, jobs=jobs, per_gpu=per_gpu, threads=threads, ray=ray))


def fail(message: str, code: int = 2):
    """Print one paragraph to stderr and exit: the contract for bad usage or bad input."""
    # paths stay whole (no breaks inside long words or at hyphens), so they can be copied
    typer.echo(textwrap.fill(f"error: {message}", width=100, break_long_words=False, break_on_hyphens=False), err=True)
    sys.exit(code)


class Dropping:
    """A text stream that drops what is written once its reader has gone (`| head -1`, a pager
    quit, a terminal hung up), so a run carries on, and saves, instead of dying on its next line."""

    def __init__(self, stream):
        self.stream = stream

    def _call(self, method, *args):
        try:
            return getattr(self.stream, method)(*args)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EIO):
                raise
            null = os.open(os.devnull, os.O_WRONLY)  # in the pipe's place: what is still buffered goes nowhere
            os.dup2(null, self.stream.fileno())
            os.close(null)
            return len(args[0]) if args else None

    def write(self, s):
        return self._call("write", s)

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):
        return getattr(self.stream, name)


def standard_streams():
    """Closed stdin/stdout/stderr (`>&-`) become /dev/null, so no file opened takes their number; stdout
    and stderr become Dropping streams that an ASCII locale cannot crash. Returns the old pair."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself when all below are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    saved = sys.stdout, sys.stderr
    for s in saved:  # an ASCII locale (LC_ALL=C without UTF-8 mode): a ± or a path's ü is escaped, not a crash
        if s is not None and hasattr(s, "reconfigure") and "utf" not in (s.encoding or "").lower():
            s.reconfigure(errors="backslashreplace")
    sys.stdout, sys.stderr = (Dropping(s if s is not None else open(os.devnull, "w")) for s in saved)
    return saved


def expand_home(args: list[str]) -> list[str]:
    """args with a leading ~ expanded where no shell did: --data-dir=~/x, --set a.b=~/x, '~/x'
    (fastcifar would otherwise make a directory named ~ in the current one)."""
    def expand(a: str) -> str:
        key, eq, value = a.rpartition("=") if a.startswith("-") or "=" in a else ("", "", a)
        return key + eq + os.path.expanduser(value) if value == "~" or value.startswith("~/") else a

    return [expand(a) for a in args]


def refuse_empty(args: list[str]) -> None:
    """BadInput for an empty argument (`--out "$OUT"` with OUT unset): a path option would take it as
    the current directory, and a run, a store or a report would land there."""
    for i, a in enumerate(args):
        before = args[i - 1] if i else ""
        if a.startswith("--") and a.endswith("="):  # --out=
            what = f"{a[:-1]} ''"
        elif a == "":  # --out "" or an empty positional
            what = f"{before} ''" if before.startswith("-") else f"argument {i + 1}" + (f" (after {before})" if i else "")
        else:
            continue
        raise BadInput(f"{what} is empty (an unset shell variable?). Give a value, or leave it out for its default "
                       f"(`fastcifar COMMAND --help`); an empty path is never taken as the current directory.")


# where torch.compile (inductor, triton) and other libraries keep caches, when the environment says
CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR")


def main():
    saved = standard_streams()
    try:
        # the stop signals unblocked (a Ray worker blocks SIGINT, and its children inherit that); SIGTERM and
        # SIGHUP then stop every command as Ctrl-C does (exit 130), so its temporary files are removed
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals())
        with sigterm_as_ctrl_c():
            refuse_empty(sys.argv[1:])
            app(args=expand_home(sys.argv[1:]), prog_name="fastcifar")  # also under `python -m fastcifar`: one name
    except BadInput as e:
        fail(str(e))
    except OSError as e:
        # A backstop: each command names its own failures; this is for one that slipped through
        # (a disk filling up, a permission), so it is a paragraph and not a traceback.
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        files = [str(f) for f in (e.filename, e.filename2) if f is not None]
        paths = " and ".join(files)
        # a cache directory named by the environment: the user typed no such path, so name the variable
        var = next((k for k in CACHE_VARS if os.environ.get(k) and any(
            Path(f).absolute().is_relative_to(Path(os.environ[k]).absolute()) for f in files)), None)
        fix = f"set {var} (now {os.environ[var]}) to a directory you can write" if var else "choose another path"
        fail(f"`fastcifar {command}` stopped: {e.strerror or e}{f' ({paths})' if paths else ''}. Check the free "
             f"space and permissions there, or {fix}.")
    finally:
        sys.stdout, sys.stderr = saved
