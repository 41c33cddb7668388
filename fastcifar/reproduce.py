"""`fastcifar reproduce TABLE`: train a table of recipes, N seeds each, and write the table of
results with error bars beside the published figures.

    reproduce("tutorial", seeds=3, out="runs/reproduce-tutorial")

- TABLE is a name in TABLES (`tutorial`: the tutorial's twelve experiments) or a file of recipe
  names or paths, one per line (`#` starts a comment).
- The runs go to DIR/<recipe>-seed<k> (train.seed = k), in dependency order: a recipe whose
  distill.teacher names another recipe of the table runs after it, and seed k of the student is
  distilled from seed k of the teacher that this table trained.
- Run again, the same command continues: finished runs are skipped (never retrained or changed,
  even with their .pt files deleted), interrupted ones resume from their last.pt (`fastcifar train
  --resume`), so the table can be stopped (Ctrl-C, SIGTERM: exit 130) and continued any number of
  times without training anything twice. A second reproduce of the same DIR while one runs is
  refused before it looks at any run (a lock on DIR).
- DIR/results.md and DIR/results.json: per recipe the mean ± std over seeds (and n) of the best
  and final test accuracy, the tutorial's figure and the difference, wall time and img/s;
  rewritten after every run. Like every file reproduce deletes or replaces (a run that died before
  its first checkpoint restarts without its old files), only while fastcifar wrote it (owned.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shlex
import statistics
from pathlib import Path

import torch

from fastcifar import config, jsonio, owned
from fastcifar.errors import BadInput
from fastcifar.checkpoint import atomic_write, check_own_run, check_writable_parent, write_json
from fastcifar.data import check_outside_stores
from fastcifar.report import duration
from fastcifar.signals import sigterm_as_ctrl_c

TABLES = {  # name -> recipes, in the order results list them
    "tutorial": ("r18_baseline", "r18_augment", "r18_wd01", "r18_lbsmooth", "r18_pretrained", "r18_arcface",
                 "r18_arcface_224", "r50_arcface", "r50_arcface_224", "r18_arcface_kd", "r18_cosface",
                 "r18_arcface_mst"),
}
# The published figure a recipe's docstring quotes ("...: tutorial 44.26% (best epoch 186 of 200)")
PUBLISHED = re.compile(r"\btutorial (\d+(?:\.\d+)?)%")
RESULT_FILES = ("results.md", "results.json")
RUN_DIR = re.compile(r"(?P<name>.+)-seed(?P<seed>\d+)")
# Recipe fields that say how or where a run executed, not what it trains: a run that differs from
# the plan only in these is the same experiment
HOW = ("train.log_every", "train.device", "train.compile", "data.backend")
# ... and the one field a finished run is resumed with to match the plan: its summary times the new
# target from the epochs it has (any other change, train.epochs included, is another experiment: a
# dry run of 2 epochs is not extended into a 200-epoch run whose LR schedule would differ)
EXTENDABLE = ("train.target_acc",)
MAX_SEEDS = 1000  # --seeds: runs per recipe; every run is planned (its recipe loaded) before the first trains
# What DIR may hold besides runs and results: fastcifar's manifest and the temp files of a write cut short
# (kept, never deleted: they are not provably fastcifar's)
LEFTOVER = re.compile(rf"{re.escape(owned.MANIFEST)}|\.(results\.md|results\.json|{re.escape(owned.MANIFEST)})\..*\.tmp")


class Stopped(Exception):
    """Ctrl-C or SIGTERM stopped the table; the message says how to continue (exit 130)."""


@dataclasses.dataclass
class Job:
    """One run of the table: a recipe at one seed, in its own directory."""
    name: str
    seed: int
    recipe: config.Recipe
    info: dict
    dir: Path
    teacher: str | None = None  # the recipe of this table it distills from


def read_table(table: str) -> tuple[str, list[str]]:
    """(label, recipe refs) of a table name or a table file."""
    if table in TABLES:  # a file of that name is ./NAME
        return table, list(TABLES[table])
    p = Path(table)
    if not p.exists():
        raise BadInput(f"No table named {table!r} and no such file. Tables: {', '.join(TABLES)}; or give a file "
                       f"listing recipe names (or paths), one per line, # for comments.")
    if not p.is_file():
        raise BadInput(f"The table {table} is not a file; give a file listing recipe names, one per line.")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"Cannot read the table file {table} ({getattr(e, 'strerror', None) or e}).")
    refs, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        ref = line.split("#", 1)[0].strip()
        if not ref:
            continue
        if ref in seen:
            raise BadInput(f"{table} line {n} lists {ref!r} again (first on line {seen[ref]}); a table runs each "
                           f"recipe once per seed, so list it once.")
        seen[ref] = n
        refs.append(ref)
    if not refs:
        raise BadInput(f"The table file {table} lists no recipe (one name per line; # starts a comment).")
    return p.stem, refs


def plan(table: str, seeds: int, out: Path, overrides=()) -> tuple[str, list[Job], list[str]]:
    """(label, jobs in the order they run, recipe names in the table's order). Every recipe is
    loaded, overridden and validated here, so bad input fails before anything trains."""
    if not 1 <= seeds <= MAX_SEEDS:
        raise BadInput(f"--seeds {seeds}: run each recipe 1 to {MAX_SEEDS:,} times (train.seed = 0 .. N-1); a table "
                       f"plans every run before the first one trains.")
    if any(o.partition("=")[0].strip() == "train.seed" for o in overrides):
        raise BadInput("--set train.seed: reproduce sets each run's seed itself (0 .. --seeds - 1); use --seeds.")
    label, refs = read_table(table)
    loaded = {}
    for ref in refs:
        r, info = config.load(ref)
        if info["name"] in loaded:
            raise BadInput(f"The table lists two recipes named {info['name']!r} ({loaded[info['name']][1]['path']} and "
                           f"{info['path']}); their runs would share a directory. Rename one.")
        try:
            config.apply_overrides(r, list(overrides)).validate()
        except BadInput as e:
            raise BadInput(f"Recipe {info['name']}: {e}")
        loaded[info["name"]] = (r, info)
    names = list(loaded)
    deps = {n: r.distill.teacher for n, (r, _) in loaded.items() if r.distill.teacher in loaded}
    order = []
    while len(order) < len(names):  # the table's order, each recipe after the teacher it distills from
        ready = [n for n in names if n not in order and (n not in deps or deps[n] in order)]
        if not ready:
            stuck = [n for n in names if n not in order]
            raise BadInput(f"The recipes {', '.join(stuck)} distill from each other in a cycle (distill.teacher); "
                           f"none of them can run first.")
        order.append(ready[0])
    out = resolved(Path(out))
    jobs = []
    for name in order:
        for seed in range(seeds):
            r, info = config.load(loaded[name][1]["path"])  # a fresh copy per seed
            extra = [f"train.seed={seed}"]
            if name in deps:  # the teacher run of the same seed, from this table
                extra.append(f"distill.teacher={out / f'{deps[name]}-seed{seed}'}")
            config.apply_overrides(r, list(overrides) + extra)
            info = {**info, "overrides": list(overrides) + extra}
            jobs.append(Job(name, seed, r, info, out / f"{name}-seed{seed}", deps.get(name)))
    return label, jobs, names


def resolved(out: Path) -> Path:
    """out made absolute, its links followed; BadInput for a link that cannot be followed."""
    try:
        return out.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on a loop
        raise BadInput(f"--out {out} is a symlink that cannot be followed (a loop); fix or remove the link, or "
                       f"choose another --out.")


def check_out(out: Path, names: list[str]) -> None:
    """BadInput unless out is missing or a directory holding only this table's runs and the
    results files reproduce wrote."""
    resolved(out)
    if out.is_symlink() and not out.exists():
        raise BadInput(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist; fix the link, or "
                       f"choose another --out.")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; reproduce writes a directory of runs there. Choose another --out.")
    check_outside_stores(out)
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not (
            p.name in RESULT_FILES or (p.is_dir() and (m := RUN_DIR.fullmatch(p.name)) and m["name"] in names)
            or LEFTOVER.fullmatch(p.name)))
        if foreign:
            raise BadInput(f"--out {out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                           f"are not runs of this table; reproduce writes only into a new directory or one of its own "
                           f"(runs named <recipe>-seed<k>). Choose another --out.")
        owned.check([out / f for f in RESULT_FILES], "reproduce", "reproduce would replace {it} with this table's "
                    "results: move {it} away, or choose another --out.")
    check_writable_parent(out)


def _read(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or damaged."""
    try:
        obj = jsonio.load(path)
    except BadInput:
        return None
    return obj if isinstance(obj, dict) else None


def state(job: Job) -> str:
    """What the job's directory asks for: "new", "done" (finished, with or without its .pt files),
    "resume", "failed" (it diverged), or "restart" (a run that died before its first checkpoint:
    only files that run wrote, no last.pt). BadInput when it holds a run of another configuration,
    or files that reproduce would have to replace or delete but fastcifar did not write there."""
    d = job.dir
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return "new"
    if not d.is_dir():
        raise BadInput(f"{d} is a file where reproduce keeps the run {job.name} seed {job.seed}; move it away.")
    if not (d / "last.pt").is_file():
        if (_read(d / "summary.json") or {}).get("finished"):
            return "done"  # a finished run whose checkpoints were deleted (to free disk): reported, never retrained
        # a run that died before its first checkpoint: restarted, its files deleted, if it wrote them all
        theirs = [p for p in sorted(d.iterdir()) if not owned.is_ours(p, "train")]
        if not theirs:
            return "restart"
        owned.refuse(theirs, f"reproduce keeps the run {job.name} seed {job.seed} in {d}, and restarting "
                     f"it there would delete {{it}}. Move {{it}} away, or choose another --out.", "train")
    recorded = _read(d / "recipe.json")
    if recorded is None:
        raise BadInput(f"{d / 'recipe.json'} is missing or damaged; remove {d} to run {job.name} seed {job.seed} again.")
    try:
        was = config.to_dict(config.from_dict(recorded))
    except BadInput as e:
        raise BadInput(f"{d / 'recipe.json'}: {e} Remove {d} to run {job.name} seed {job.seed} again.")
    now = config.to_dict(job.recipe)
    changed = [f"{s}.{k}" for s, fields in now.items() for k, v in fields.items() if v != was[s][k]]
    other = [k for k in changed if k not in HOW + EXTENDABLE]
    summary = _read(d / "summary.json") or {}
    if other:
        what = ", ".join(f"{k} ({was[k.split('.')[0]][k.split('.')[1]]!r} -> {now[k.split('.')[0]][k.split('.')[1]]!r})"
                         for k in other)
        raise BadInput(f"{d} holds a run of {job.name} seed {job.seed} made with other settings: {what}. Continue "
                       f"with the same --set as before, or choose another --out for these settings.")
    if summary.get("finished") and not any(k in EXTENDABLE for k in changed):
        return "done"
    if str(summary.get("stop_reason", "")).startswith("non-finite loss"):
        return "failed"
    check_own_run(d, f"Resuming {job.name} seed {job.seed} would replace {{it}}. Continue a copied run elsewhere "
                     f"(`fastcifar train --resume {d} --out NEW_DIR`) and move {d} away, or choose another --out.")
    return "resume"


def command(table: str, seeds: int, out: Path, overrides, data_dir) -> str:
    """The command line that continues this table."""
    args = ["fastcifar", "reproduce", table, "--seeds", str(seeds), "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return shlex.join(args)


def reproduce(table: str, seeds: int = 1, out=None, overrides=(), data_dir=None, log=print) -> dict:
    """Run (or continue) the table and write DIR/results.md and results.json; returns results.json's
    dict. Raises Stopped on Ctrl-C/SIGTERM, BadInput on bad input; a run that diverges is recorded
    and the table goes on (its students are skipped)."""
    overrides = list(overrides)
    out = Path(out) if out is not None else Path("runs") / f"reproduce-{read_table(table)[0]}"
    label, jobs, names = plan(table, seeds, out, overrides)
    check_out(out, names)
    # one reproduce at a time per DIR, locked before any run is looked at (the kernel drops the lock with its holder)
    with owned.hold(out, f"--out {out} is in use: another `fastcifar reproduce` is running a table there. Wait for "
                         f"it to end (or stop it with Ctrl-C), then run this command again to continue the table; "
                         f"or choose another --out."):
        check_out(out, names)  # again, under the lock
        return _run(table, label, jobs, names, seeds, out, overrides, data_dir, log)


def _run(table, label, jobs, names, seeds, out, overrides, data_dir, log) -> dict:
    """reproduce()'s table, run while it holds DIR's lock."""
    from fastcifar.train import Diverged, Interrupted, train

    states = {id(j): state(j) for j in jobs}  # every run directory checked before anything trains
    todo = sum(s != "done" for s in states.values())
    log(f"Reproducing {label}: {len(names)} recipes x {seeds} seed{'s' * (seeds > 1)} = {len(jobs)} runs in {out} "
        f"({len(jobs) - todo} done, {sum(s == 'resume' for s in states.values())} to resume)"
        + (f", with {' '.join('--set ' + o for o in overrides)}" if overrides else ""))
    again = command(table, seeds, out, overrides, data_dir)
    failed: dict[tuple[str, int], str] = {}
    k, job = 0, jobs[0]
    with sigterm_as_ctrl_c():
        try:
            for k, job in enumerate(jobs, 1):
                head = f"[{k}/{len(jobs)}] {job.name} seed {job.seed}"
                s = state(job)
                if s == "done":
                    log(f"{head}: done, skipped ({job.dir})")
                    continue
                if s == "failed":
                    failed[(job.name, job.seed)] = "diverged (a NaN/inf loss) in an earlier attempt"
                    log(f"{head}: diverged earlier, skipped; remove {job.dir} to run it again")
                    continue
                if job.teacher and (job.teacher, job.seed) in failed:
                    failed[(job.name, job.seed)] = f"its teacher {job.teacher} seed {job.seed} did not finish"
                    log(f"{head}: skipped, {failed[(job.name, job.seed)]}")
                    continue
                if s == "restart":  # died before its first checkpoint: only files it wrote are there
                    restart(job)
                log(f"{head}: " + ("resuming from its last.pt" if s == "resume" else "starting") + f" -> {job.dir}")
                # each run compiles its own nets, as in a process of its own: without this, dynamo's
                # per-function cache of earlier runs' graphs fills up and later runs fall back to eager
                torch.compiler.reset()
                try:
                    if s == "resume":
                        train(job.recipe, job.info, data_dir=data_dir, resume=job.dir, log=log)
                    else:
                        train(job.recipe, job.info, out=job.dir, data_dir=data_dir, log=log)
                except Diverged as e:
                    failed[(job.name, job.seed)] = str(e)
                    log(f"{head}: {e}")
                except BadInput as e:
                    raise BadInput(f"{head}: {e}")
                finally:
                    with contextlib.suppress(OSError, BadInput):
                        write_results(out, label, seeds, overrides, names, jobs)
        except (Interrupted, KeyboardInterrupt) as e:
            with contextlib.suppress(OSError, BadInput):
                write_results(out, label, seeds, overrides, names, jobs)
            where = f"{e} " if isinstance(e, Interrupted) else ""
            raise Stopped(f"{where}Stopped the table at run {max(k, 1)} of {len(jobs)} ({job.name} seed {job.seed}); "
                          f"finished runs are kept and an interrupted one resumes from its last.pt. Continue with: "
                          f"{again}")
    results = write_results(out, label, seeds, overrides, names, jobs)
    if failed:
        results["failed"] = {f"{n} seed {s}": why for (n, s), why in failed.items()}
    log(results_md(results))
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


def restart(job: Job) -> None:
    """Delete the files of a run that died before its first checkpoint (state() found that it wrote
    every one), under the run's own lock: a `train --resume` of it may have started since."""
    busy = (f"{job.dir} is in use: another fastcifar process is writing that run. Wait for it to end, then run "
            f"this command again.")
    with owned.hold(job.dir, busy):
        for p in sorted(job.dir.iterdir()):
            if p.name != owned.MANIFEST and not owned.remove(p, "train"):
                owned.refuse([p], f"reproduce keeps the run {job.name} seed {job.seed} in {job.dir}, and restarting it "
                             f"there would delete {{it}}. Move {{it}} away, or choose another --out.", "train")


# ---- The results table


def published(info: dict) -> float | None:
    """The tutorial's figure that a recipe's one-line description quotes, if any."""
    m = PUBLISHED.search(info.get("description", ""))
    return float(m.group(1)) if m else None


def _stats(values: list[float]) -> dict:
    """mean, sample std (None for one value), n and the values."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values), "values": values}


def collect(out: Path, label: str, seeds: int, overrides, names: list[str], jobs: list[Job]) -> dict:
    """results.json's dict from the run directories' summary.json files."""
    runs, recipes = [], []
    for name in names:
        mine = sorted((j for j in jobs if j.name == name), key=lambda j: j.seed)
        done = []
        for j in mine:
            s = _read(j.dir / "summary.json") or {}
            row = {"recipe": name, "seed": j.seed, "dir": str(j.dir), "finished": bool(s.get("finished")),
                   "stop_reason": s.get("stop_reason"), "best_acc": s.get("best_acc"), "final_acc": s.get("final_acc"),
                   "epochs_done": s.get("epochs_done"), "wall_seconds": s.get("wall_seconds"),
                   "train_images_per_sec": s.get("train_images_per_sec"), "synthetic": s.get("synthetic")}
            runs.append(row)
            if row["finished"] and all(_num(row[k]) for k in ("best_acc", "final_acc")):
                done.append(row)
        pub = published(mine[0].info)
        best = _stats([r["best_acc"] for r in done])
        recipes.append({
            "recipe": name, "description": mine[0].info.get("description", ""), "n": len(done), "of": len(mine),
            "best_acc": best, "final_acc": _stats([r["final_acc"] for r in done]), "published": pub,
            "difference": best["mean"] - pub if pub is not None and best["mean"] is not None else None,
            "wall_seconds": _stats([r["wall_seconds"] for r in done if _num(r["wall_seconds"])])["mean"],
            "train_images_per_sec": _stats([r["train_images_per_sec"] for r in done
                                            if _num(r["train_images_per_sec"])])["mean"],
        })
    return {"table": label, "seeds": seeds, "overrides": list(overrides), "out": str(out), "recipes": recipes,
            "runs": runs, "synthetic": any(r["synthetic"] for r in runs)}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.2f}%" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")


def results_md(res: dict) -> str:
    """results.json's dict as the markdown table of results.md."""
    lines = [f"# Reproduced: {res['table']}, {res['seeds']} seed{'s' * (res['seeds'] > 1)} (train.seed 0.."
             f"{res['seeds'] - 1})" + (f", --set {' '.join(res['overrides'])}" if res["overrides"] else ""), "",
             "| recipe | n | best test acc | final test acc | tutorial | difference | wall time / run | train img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["recipes"]:
        n = f"{r['n']}" + (f" of {r['of']}" if r["n"] != r["of"] else "")
        pub = "—" if r["published"] is None else f"{r['published']:.2f}%"
        diff = "—" if r["difference"] is None else f"{r['difference']:+.2f}"
        ips = "—" if r["train_images_per_sec"] is None else f"{r['train_images_per_sec']:,.0f}"
        lines.append(f"| {r['recipe']} | {n} | {_pm(r['best_acc'])} | {_pm(r['final_acc'])} | {pub} | {diff} | "
                     f"{duration(r['wall_seconds'])} | {ips} |")
    lines += ["", "Mean ± sample standard deviation over the finished seeds (n); best = test accuracy at the "
              "selected epoch (on test unless the runs held out a validation split; the tutorial selected on test)."]
    if any(r["published"] is not None for r in res["recipes"]):
        lines.append("The tutorial's figures are quoted from each recipe's description (single runs); difference = "
                     "mean best - tutorial.")
    if res["synthetic"]:
        lines.append("These runs trained on a SYNTHETIC store (`fastcifar prepare --synthetic`): their accuracies "
                     "say nothing about CIFAR-100, and the differences to the tutorial are meaningless.")
    pending = [r for r in res["runs"] if not r["finished"]]
    if pending:
        lines.append("Not finished: " + "; ".join(f"{r['recipe']} seed {r['seed']} ({r['stop_reason'] or 'not run yet'})"
                                                  for r in pending) + ".")
    return "\n".join(lines) + "\n"


def write_results(out: Path, label: str, seeds: int, overrides, names: list[str], jobs: list[Job]) -> dict:
    """Write DIR/results.json and results.md (atomically) from the runs as they are now."""
    res = collect(out, label, seeds, overrides, names, jobs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res, by="reproduce")
    atomic_write(out / "results.md", lambda f: f.write(results_md(res).encode()), by="reproduce")
    return res
