"""`fastcifar reproduce TABLE`: train a table of recipes, N seeds each, and write the table of
results with error bars beside the published figures.

- TABLE is a name in TABLES or a file of recipe names or paths, one per line (`#` starts a comment).
- Runs go to DIR/<recipe>-seed<k> (train.seed = k) through the scheduler (runs.py); a recipe whose
  distill.teacher is in the table runs after it, seed k distilled from the teacher's seed k.
- The same command continues: finished runs are skipped (even with their .pt files deleted), stopped
  ones resume from their last.pt; a lock on DIR refuses a second reproduce there while one runs.
- DIR/results.md and results.json, rewritten after every run: per recipe the mean ± std (n) of the
  best and final test accuracy, the tutorial's figure and the difference, wall time and img/s.
  Like every file reproduce deletes or replaces, only while fastcifar wrote it (owned.py).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import statistics
from pathlib import Path

from fastcifar import config, owned, runs
from fastcifar.checkpoint import atomic_write, check_writable_parent, write_json
from fastcifar.errors import BadInput
from fastcifar.data import check_outside_stores
from fastcifar.report import duration
from fastcifar.runs import Job, Stopped, read_object, state  # noqa: F401 (the table's Job and its states)

TABLES = {  # name -> recipes, in the order results list them
    "tutorial": ("r18_baseline", "r18_augment", "r18_wd01", "r18_lbsmooth", "r18_pretrained", "r18_arcface",
                 "r18_arcface_224", "r50_arcface", "r50_arcface_224", "r18_arcface_kd", "r18_cosface",
                 "r18_arcface_mst"),
}
# The published figure a recipe's docstring quotes ("...: tutorial 44.26% (best epoch 186 of 200)")
PUBLISHED = re.compile(r"\btutorial (\d+(?:\.\d+)?)%")
RESULT_FILES = ("results.md", "results.json")
RUN_DIR = re.compile(r"(?P<name>.+)-seed(?P<seed>\d+)")
MAX_SEEDS = 1000  # --seeds: runs per recipe; every run is planned (its recipe loaded) before the first trains
# What DIR may hold besides runs and results: fastcifar's manifest, the temp files of a write cut short
# and a Ray probe's file (kept, never deleted: they are not provably fastcifar's)
LEFTOVER = re.compile(rf"{re.escape(owned.MANIFEST)}|\.(results\.md|results\.json|{re.escape(owned.MANIFEST)}|"
                      rf"fastcifar-probe)\..*\.tmp")


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
    seen = {}  # ref -> its line, in the file's order
    for n, line in enumerate(text.splitlines(), 1):
        ref = line.split("#", 1)[0].strip()
        if not ref:
            continue
        if ref in seen:
            raise BadInput(f"{table} line {n} lists {ref!r} again (first on line {seen[ref]}); a table runs each "
                           f"recipe once per seed, so list it once.")
        seen[ref] = n
    if not seen:
        raise BadInput(f"The table file {table} lists no recipe (one name per line; # starts a comment).")
    return p.stem, list(seen)


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
            sets = [*overrides, f"train.seed={seed}"]
            if name in deps:  # the teacher run of the same seed, from this table
                sets.append(f"distill.teacher={out / f'{deps[name]}-seed{seed}'}")
            r, info = config.load(loaded[name][1]["path"])  # a fresh copy per seed
            jobs.append(Job(name, seed, config.apply_overrides(r, sets), {**info, "overrides": sets},
                            out / f"{name}-seed{seed}", deps.get(name)))
    return label, jobs, names


def resolved(out: Path) -> Path:
    """out made absolute, its links followed; BadInput for a link that cannot be followed."""
    try:
        return out.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError on a loop
        raise BadInput(f"--out {out} is a symlink that cannot be followed (a loop); fix or remove the link, or "
                       f"choose another --out.")


def check_out(out: Path, names: list[str], by: str = "reproduce") -> None:
    """BadInput unless out is missing or a directory holding only runs named <name>-seed<k> (name
    in names) and the results files `fastcifar by` wrote (reproduce's table, or a sweep)."""
    what = "this table" if by == "reproduce" else "this sweep"
    resolved(out)
    if out.is_symlink() and not out.exists():
        raise BadInput(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist; fix the link, or "
                       f"choose another --out.")
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; {by} writes a directory of runs there. Choose another --out.")
    check_outside_stores(out)
    if out.is_dir():
        names = set(names)
        foreign = sorted(p.name for p in out.iterdir() if not (
            p.name in RESULT_FILES or (p.is_dir() and (m := RUN_DIR.fullmatch(p.name)) and m["name"] in names)
            or LEFTOVER.fullmatch(p.name)))
        if foreign:
            raise BadInput(f"--out {out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                           f"are not runs of {what}; {by} writes only into a new directory or one of its own "
                           f"(runs named <{'recipe' if by == 'reproduce' else 'setting'}>-seed<k>). Choose another --out.")
        owned.check([out / f for f in RESULT_FILES], by, f"{by} would replace {{it}} with the results of {what}: "
                    f"move {{it}} away, or choose another --out.")
    check_writable_parent(out)


def command(table: str, seeds: int, out: Path, overrides, data_dir, scheduling=(), by="reproduce",
            grids=()) -> str:
    """The command line that continues this table (or sweep: by, grids); scheduling: its --jobs ... --ray."""
    args = ["fastcifar", by, table, *(a for g in grids for a in ("--grid", g)), "--seeds", str(seeds),
            "--out", str(out)]
    args += [a for o in overrides for a in ("--set", o)]
    args += ["--data-dir", str(data_dir)] * (data_dir is not None)
    return shlex.join(args + list(scheduling))


def scheduling(jobs=None, per_gpu=None, threads=None, ray=None) -> list[str]:
    """The scheduling options as given, for the command that continues."""
    given = (("--jobs", jobs), ("--per-gpu", per_gpu), ("--threads", threads), ("--ray", ray))
    return [a for flag, v in given if v is not None for a in (flag, str(v))]


def run_planned(by: str, out: Path, names: list[str], planned: list[Job], collect_now, to_md, intro: str,
                again: str, overrides: list[str], data_dir, log, options: dict) -> dict:
    """Lock DIR, train the planned runs (reproduce's or sweep's), writing results.json and results.md
    (collect_now(), to_md) as each ends; returns the results, with "failed" when runs did not finish."""
    check_out(out, names, by)

    def write() -> dict:  # atomically, from the runs as they are now
        res = collect_now()
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", res, by=by)
        atomic_write(out / "results.md", lambda f: f.write(to_md(res).encode()), by=by)
        return res

    with owned.hold(out, f"--out {out} is in use: another `fastcifar {by}` is running its runs there. Wait for it "
                         f"to end (or stop it with Ctrl-C), then run this command again to continue; or choose "
                         f"another --out."):  # taken before any run is looked at (dropped with its holder)
        check_out(out, names, by)  # again, under the lock
        pool = runs.make_pool(**options)
        log(f"{intro} in {out}, {pool.describe()}" + (f", with {' '.join('--set ' + o for o in overrides)}"
                                                       if overrides else ""))
        failed = runs.run(planned, pool, by, write, again, data_dir, log)
    results = write()
    if failed:
        results["failed"] = {f"{n} seed {s}": why for (n, s), why in failed.items()}
    log(to_md(results))
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


def reproduce(table: str, seeds: int = 1, out=None, overrides=(), data_dir=None, log=print, jobs=None, per_gpu=None,
              threads=None, ray=None) -> dict:
    """Run (or continue) the table; returns results.json's dict, with "failed": {run: (kind, why)} when
    runs did not finish (a diverged run's students skipped). Raises Stopped, or BadInput on bad input."""
    overrides = list(overrides)
    options = {"jobs": jobs, "per_gpu": per_gpu, "threads": threads, "ray": ray}
    runs.check_options(jobs, per_gpu, threads)
    out = Path(out) if out is not None else Path("runs") / f"reproduce-{read_table(table)[0]}"
    label, planned, names = plan(table, seeds, out, overrides)
    intro = f"Reproducing {label}: {len(names)} recipes x {seeds} seed{'s' * (seeds > 1)} = {len(planned)} runs"
    again = command(table, seeds, out, overrides, data_dir, scheduling(**options))
    return run_planned("reproduce", out, names, planned,
                       lambda: collect(out, label, seeds, overrides, names, planned), results_md, intro, again,
                       overrides, data_dir, log, options)


# ---- The results table


def published(info: dict) -> float | None:
    """The tutorial's figure that a recipe's one-line description quotes, if any."""
    m = PUBLISHED.search(info.get("description", ""))
    return float(m.group(1)) if m else None


def stats(values: list[float]) -> dict:
    """mean, sample std (None for one value), n and the values."""
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values), "values": values}


def run_row(j: Job, key: str = "recipe") -> dict:
    """A run's row of results.json, from its summary.json (key: what its name is, recipe or setting)."""
    s = read_object(j.dir / "summary.json") or {}
    return {key: j.name, "seed": j.seed, "dir": str(j.dir), "finished": bool(s.get("finished")),
            **{k: s.get(k) for k in ("stop_reason", "best_acc", "final_acc", "epochs_done", "wall_seconds",
                                     "train_images_per_sec", "synthetic", "best_val_acc")}}


def seed_stats(rows: list[dict]) -> dict:
    """n (finished seeds) of, mean ± std of best and final accuracy, mean wall time and img/s of run rows."""
    done = [r for r in rows if r["finished"] and all(is_number(r[k]) for k in ("best_acc", "final_acc"))]

    def of(key: str) -> dict:
        return stats([r[key] for r in done if is_number(r[key])])

    return {"n": len(done), "of": len(rows), "best_acc": of("best_acc"), "final_acc": of("final_acc"),
            "best_val_acc": of("best_val_acc"), "wall_seconds": of("wall_seconds")["mean"],
            "train_images_per_sec": of("train_images_per_sec")["mean"]}


def collect(out: Path, label: str, seeds: int, overrides, names: list[str], jobs: list[Job]) -> dict:
    """results.json's dict from the run directories' summary.json files."""
    runs, recipes = [], []
    for name in names:
        mine = sorted((j for j in jobs if j.name == name), key=lambda j: j.seed)
        rows = [run_row(j) for j in mine]
        runs += rows
        pub = published(mine[0].info)
        row = {"recipe": name, "description": mine[0].info.get("description", ""), **seed_stats(rows), "published": pub}
        best = row["best_acc"]["mean"]
        row["difference"] = best - pub if pub is not None and best is not None else None
        recipes.append(row)
    return {"table": label, "seeds": seeds, "overrides": list(overrides), "out": str(out), "recipes": recipes,
            "runs": runs, "synthetic": any(r["synthetic"] for r in runs)}


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pm(s: dict) -> str:
    """mean ± std as the tables show it."""
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
        lines.append(f"| {r['recipe']} | {n} | {pm(r['best_acc'])} | {pm(r['final_acc'])} | {pub} | {diff} | "
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

