"""`fastcifar sweep RECIPE --grid FIELD=V1,V2 ...`: every combination of the grid's values, N seeds
each, through the scheduler of `reproduce` (runs.py), and the settings ranked by mean best accuracy.

    sweep("r18_cifar_32", ["optim.lr=0.05,0.1,0.2", "loss.label_smoothing=0,0.1"], seeds=3)

- Grid values are typed as --set values are, split at the commas outside brackets
  (optim.betas=(0.9,0.999),(0.9,0.99) is two values).
- Each run goes to DIR/<setting>-seed<k>, the setting named by its values (`lr=0.05,label_smoothing=0`,
  by field name where unambiguous; characters a file name should not hold become _).
- DIR/results.md and results.json rank the settings by mean best accuracy (± sample std over the
  finished seeds, n); `fastcifar report DIR` draws them (sweep.png). Stop, continue, locks and
  ownership are reproduce's.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

from fastcifar import config, runs
from fastcifar.errors import BadInput, shown
from fastcifar.reproduce import MAX_SEEDS, Job, command, pm, resolved, run_planned, run_row, scheduling, seed_stats
from fastcifar.report import duration

MAX_RUNS = 1000  # settings x seeds: every run is planned (its recipe loaded) before the first trains
MAX_NAME = 200  # characters of a run directory's name (file systems take 255 bytes)
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")  # what a setting's name holds of a value: the rest becomes _


def split_values(text: str) -> list[str]:
    """text split at the commas outside (), [] and {}, each part stripped."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def parse_grid(grids: list[str], overrides=()) -> dict[str, list[str]]:
    """{section.field: [value texts]} of the --grid options, every value typed and checked."""
    if not grids:
        raise BadInput("Give at least one --grid SECTION.FIELD=V1,V2 (e.g. --grid optim.lr=0.05,0.1); a sweep runs "
                       "every combination of the grids' values.")
    fixed = {o.partition("=")[0].strip() for o in overrides}
    if "train.seed" in fixed:
        raise BadInput("--set train.seed: a sweep sets each run's seed itself (0 .. --seeds - 1); use --seeds.")
    grid: dict[str, list[str]] = {}
    for g in grids:
        key, eq, values = g.partition("=")
        key = key.strip()
        if not eq or key.count(".") != 1:
            raise BadInput(f"--grid {shown(g)}: write SECTION.FIELD=V1,V2,... (e.g. optim.lr=0.05,0.1).")
        if key == "train.seed":
            raise BadInput("--grid train.seed: the seeds are --seeds N (train.seed = 0 .. N-1), each setting run with "
                           "every one of them.")
        if key in grid:
            raise BadInput(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2,...")
        if key in fixed:
            raise BadInput(f"--grid {key} and --set {key} both set {key}; keep one.")
        texts = split_values(values)
        if "" in texts:
            raise BadInput(f"--grid {shown(g)} has an empty value (two commas in a row, or one at an end); write "
                           f"the values separated by single commas.")
        seen = {}
        for t in texts:
            try:  # the value `--set key=t` gives
                r = config.apply_overrides(config.Recipe(), [f"{key}={t}"])
            except BadInput as e:
                raise BadInput(f"--grid: {str(e).replace('--set ', '', 1)}")
            v = getattr(getattr(r, key.split(".")[0]), key.split(".")[1])
            if repr(v) in seen:
                raise BadInput(f"--grid {key} lists the value {shown(v)} twice ({seen[repr(v)]!r} and "
                               f"{t!r}); each value once.")
            seen[repr(v)] = t
        grid[key] = texts
    return grid


def short_names(keys: list[str]) -> dict[str, str]:
    """Each grid field's name in run names: its field name, or section.field where two share it."""
    fields = [k.split(".")[1] for k in keys]
    return {k: k.split(".")[1] if fields.count(k.split(".")[1]) == 1 else k for k in keys}


def setting_name(assign: dict[str, str], short: dict[str, str]) -> str:
    """The name of one combination of values: `lr=0.05,label_smoothing=0`, file-name safe."""
    return ",".join(f"{short[k]}={UNSAFE.sub('_', v.strip('()[] ').replace(',', '_')) or '_'}" for k, v in assign.items())


def plan(recipe: str, grids: list[str], seeds: int, out=None, overrides=()) -> tuple[str, dict, list[dict], list[Job], Path]:
    """(recipe name, grid, settings [{name, values}] in grid order, jobs, DIR: out, else runs/sweep-<recipe>),
    every run's recipe validated here, so bad input fails before anything trains."""
    if not 1 <= seeds <= MAX_SEEDS:
        raise BadInput(f"--seeds {seeds}: run each setting 1 to {MAX_SEEDS:,} times (train.seed = 0 .. N-1).")
    overrides = list(overrides)
    grid = parse_grid(grids, overrides)
    count = seeds * math.prod(len(texts) for texts in grid.values())
    if count > MAX_RUNS:
        sizes = " x ".join(str(len(t)) for t in grid.values())
        raise BadInput(f"The grid is {sizes} settings x {seeds} seed{'s' * (seeds > 1)} = {count:,} runs; a sweep "
                       f"runs at most {MAX_RUNS:,} (each planned before the first trains). Split it into smaller sweeps.")
    base, info = config.load(recipe)
    short = short_names(list(grid))
    settings, names = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = setting_name(values, short)
        if name in names:
            raise BadInput(f"The settings {names[name]} and {values} would both be named {name!r} (characters a file "
                           f"name should not hold become _); give values that differ in letters, digits or . _ + -.")
        if len(name) > MAX_NAME:
            raise BadInput(f"The run directories of the setting {name[:60]}... would be named with {len(name)} "
                           f"characters (at most {MAX_NAME}); use shorter values or fewer --grid fields.")
        names[name] = values
        settings.append({"name": name, "values": values})
    out = Path(out) if out is not None else Path("runs") / f"sweep-{info['name']}"
    where = resolved(out)
    jobs = []
    for st in settings:
        for seed in range(seeds):
            r = config.from_dict(config.to_dict(base))  # a fresh copy per run
            sets = overrides + [f"{k}={v}" for k, v in st["values"].items()] + [f"train.seed={seed}"]
            try:
                config.apply_overrides(r, sets).validate()
            except BadInput as e:
                raise BadInput(f"Setting {st['name']}: {e}")
            jobs.append(Job(st["name"], seed, r, {**info, "overrides": sets}, where / f"{st['name']}-seed{seed}"))
    return info["name"], grid, settings, jobs, out


def sweep(recipe: str, grids: list[str], seeds: int = 1, out=None, overrides=(), data_dir=None, log=print, jobs=None,
          per_gpu=None, threads=None, ray=None) -> dict:
    """Run (or continue) the sweep; returns results.json's dict, with "failed": {run: (kind, why)} when
    runs did not finish. Raises runs.Stopped on Ctrl-C/SIGTERM, BadInput on bad input."""
    overrides, grids = list(overrides), list(grids)
    options = {"jobs": jobs, "per_gpu": per_gpu, "threads": threads, "ray": ray}
    runs.check_options(jobs, per_gpu, threads)
    name, grid, settings, planned, out = plan(recipe, grids, seeds, out, overrides)
    sizes = " x ".join(str(len(t)) for t in grid.values())
    intro = (f"Sweeping {name}: {sizes} setting{'s' * (len(settings) > 1)} x {seeds} seed{'s' * (seeds > 1)} = "
             f"{len(planned)} run{'s' * (len(planned) > 1)}")
    again = command(recipe, seeds, out, overrides, data_dir, scheduling(**options), "sweep", grids)
    return run_planned("sweep", out, [st["name"] for st in settings], planned,
                       lambda: collect(out, name, grid, seeds, overrides, settings, planned), results_md, intro,
                       again, overrides, data_dir, log, options)


# ---- The results: settings ranked by mean best accuracy


def collect(out: Path, recipe: str, grid: dict, seeds: int, overrides, settings: list[dict], jobs: list[Job]) -> dict:
    """results.json's dict: the settings ranked by mean best accuracy (settings without a finished
    run last, in grid order) - on validation where every finished run held a validation split out
    (ranked_on: val), else on test - and every run."""
    rows, ranked = [], []
    for st in settings:
        mine = [run_row(j, "setting") for j in jobs if j.name == st["name"]]
        rows += mine
        ranked.append({"setting": st["name"], "values": st["values"], **seed_stats(mine)})
    on = "best_val_acc" if all(x["best_val_acc"]["n"] == x["n"] for x in ranked) and any(x["n"] for x in ranked) \
        else "best_acc"
    ranked.sort(key=lambda x: (x[on]["mean"] is None, -(x[on]["mean"] or 0.0)))
    for k, x in enumerate(ranked, 1):
        x["rank"] = k
    return {"kind": "sweep", "recipe": recipe, "grid": grid, "seeds": seeds, "overrides": list(overrides),
            "out": str(out), "ranked_on": "val" if on == "best_val_acc" else "test", "settings": ranked, "runs": rows,
            "synthetic": any(r["synthetic"] for r in rows)}


def results_md(res: dict) -> str:
    """results.json's dict as the markdown table of results.md."""
    keys = list(res["grid"])
    short = short_names(keys)
    val = res["ranked_on"] == "val"
    lines = [f"# Sweep of {res['recipe']}: {' x '.join(keys)}, {res['seeds']} seed{'s' * (res['seeds'] > 1)} "
             f"(train.seed 0..{res['seeds'] - 1})" + (f", --set {' '.join(res['overrides'])}" if res["overrides"] else ""),
             "", "| rank | " + " | ".join(short[k] for k in keys) + " | n |" + " best val acc |" * val
             + " best test acc | final test acc | wall time / run |", "|---|" + "---|" * (len(keys) + 4 + val)]
    for x in res["settings"]:
        n = f"{x['n']}" + (f" of {x['of']}" if x["n"] != x["of"] else "")
        values = " | ".join(str(x["values"][k]).replace("|", "\\|") for k in keys)
        lines.append(f"| {x['rank']} | {values} | {n} |" + f" {pm(x['best_val_acc'])} |" * val
                     + f" {pm(x['best_acc'])} | {pm(x['final_acc'])} | {duration(x['wall_seconds'])} |")
    lines += ["", "Mean ± sample standard deviation over the finished seeds (n). " + (
        "Ranked by the mean best validation accuracy (the runs held out a validation split); best test acc is the "
        "test accuracy at each run's selected epoch." if val else
        "Ranked by the mean best test accuracy (each run's test accuracy at its selected epoch): a setting chosen "
        "by it is chosen on the test set; hold out a validation split (--set data.val_split=0.1) to rank on "
        "validation instead.") + " `fastcifar report` of this directory draws the ranking (sweep.png)."]
    if res["synthetic"]:
        lines.append("These runs trained on a SYNTHETIC store (`fastcifar prepare --synthetic`): their accuracies "
                     "say nothing about CIFAR-100.")
    pending = [r for r in res["runs"] if not r["finished"]]
    if pending:
        lines.append("Not finished: " + "; ".join(f"{r['setting']} seed {r['seed']} ({r['stop_reason'] or 'not run yet'})"
                                                  for r in pending) + ".")
    return "\n".join(lines) + "\n"

