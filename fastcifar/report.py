"""`fastcifar report`: run directories -> the results table (markdown) and accuracy/loss plots (PNG),
from what `fastcifar train` writes there (DESIGN.md); a run without summary.json is summarised from
its metrics.jsonl and marked unfinished."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from fastcifar import jsonio, owned, provenance
from fastcifar.checkpoint import atomic_write
from fastcifar.errors import BadInput


@dataclasses.dataclass
class Run:
    dir: Path
    summary: dict
    epochs: list[dict]  # metrics.jsonl, one dict per epoch


def _read_json(path: Path) -> dict:
    try:
        obj = jsonio.load(path)
    except BadInput as e:
        raise BadInput(f"Cannot read {path.name}: {e} Is {path.parent} a complete fastcifar run directory?")
    if not isinstance(obj, dict):
        raise BadInput(f"Cannot read {path}: it holds a {type(obj).__name__}, not an object.")
    return obj


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = jsonio.read_text(path).splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = jsonio.loads(line, f"{path} line {n}")
        except BadInput as e:
            if n == len(lines) and isinstance(e, jsonio.NotJSON):
                break  # a last line cut short by a crash: the epochs before it still count
            raise BadInput(f"{e} The run directory is damaged.")
        if not isinstance(row, dict) or row.get("epoch") is None:
            raise BadInput(f"{path} line {n} is not an epoch's metrics (an object with an epoch number).")
        bad = [k for k in NUMBERS if not _number(row.get(k))]
        if bad:
            raise BadInput(f"{path} line {n} is damaged: {', '.join(bad)} must be numbers.")
        rows.append(row)
    return rows


# metrics.jsonl and summary.json fields the table and plots compute with: numbers or null
NUMBERS = ("epoch", "test_acc", "test_loss", "images_per_sec", "wall_seconds", "val_acc")
SUMMARY_NUMBERS = ("best_acc", "best_epoch", "final_acc", "train_images_per_sec", "wall_seconds", "best_val_acc",
                   "test_acc_at_best_val", "data_wait_fraction", "target_acc", "seconds_to_target", "epoch_to_target")


def _number(x, finite: bool = False) -> bool:
    """None or a number (an int past a float's range is not); finite: not NaN or inf either (a metrics
    line may hold a NaN loss, a summary never does)."""
    if x is None:
        return True
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x) or not finite
    except OverflowError:
        return False


def _summary_from_metrics(d: Path, epochs: list[dict]) -> dict:
    """What summary.json would hold, for a run that stopped before writing it."""
    recipe = _read_json(d / "recipe.json") if (d / "recipe.json").is_file() else {}
    train = recipe.get("train")
    scored = [e for e in epochs if e.get("test_acc") is not None]
    if not scored:
        raise BadInput(f"{d / 'metrics.jsonl'} has no epoch with a test accuracy.")
    best = max(scored, key=lambda e: e["test_acc"])
    rates = [e["images_per_sec"] for e in epochs if e.get("images_per_sec") is not None]
    return {
        "recipe": str(recipe.get("name", d.name)), "description": str(recipe.get("description", "")),
        "best_acc": best["test_acc"], "best_epoch": best["epoch"], "final_acc": scored[-1]["test_acc"],
        "epochs_done": epochs[-1]["epoch"], "epochs": train.get("epochs") if isinstance(train, dict) else None,
        "train_images_per_sec": sum(rates) / len(rates) if rates else None,
        "wall_seconds": epochs[-1].get("wall_seconds"), "selection": "test", "finished": False,
        "stop_reason": "no summary.json (the run stopped early)",
    }


def load_run(d: Path) -> Run:
    """One run directory: its summary (or one derived from metrics.jsonl) and per-epoch metrics."""
    epochs = _read_metrics(d / "metrics.jsonl")
    if (d / "summary.json").is_file():
        summary = _read_json(d / "summary.json")
        bad = [k for k in SUMMARY_NUMBERS if k in summary and not _number(summary[k], finite=True)]
        if bad:
            raise BadInput(f"{d / 'summary.json'} is damaged: {', '.join(bad)} must be numbers, and finite.")
    elif epochs:
        summary = _summary_from_metrics(d, epochs)
    else:
        raise BadInput(f"{d} has neither summary.json nor an epoch in metrics.jsonl: the run stopped before "
                       f"its first epoch ended (or it is not a fastcifar run directory).")
    return Run(d, summary, epochs)


RUN_FILES = ("summary.json", "metrics.jsonl", "recipe.json")  # any of them: a run directory, maybe a broken one


def _holds_run_files(d: Path) -> bool:
    """Whether d holds one of RUN_FILES; True when d cannot be looked into (tried, then named as skipped)."""
    try:
        return any((d / f).is_file() for f in RUN_FILES)
    except OSError:  # EACCES: pathlib's is_file() raises it instead of answering False
        return True


def find_runs(paths: list[Path], skipped: list | None = None) -> list[Run]:
    """The runs of run directories or folders of them; (dir, why) of each left out goes to skipped."""
    runs, skipped = [], skipped if skipped is not None else []
    for p in paths:
        if not p.is_dir():
            raise BadInput(f"{p} is not a directory; `fastcifar report` takes run directories or a folder of them.")
        if _holds_run_files(p):
            candidates = [p]
        else:
            try:
                candidates = sorted(s for s in p.iterdir() if s.is_dir() and _holds_run_files(s))
            except OSError as e:
                raise BadInput(f"Cannot list {p} ({e.strerror or e}); `fastcifar report` takes run directories or a "
                               f"folder of them that it can read.")
            if not candidates:
                raise BadInput(f"{p} holds no run directories (none has a summary.json, metrics.jsonl or recipe.json).")
        for d in candidates:
            try:
                runs.append(load_run(d))
            except BadInput as e:
                skipped.append((d, str(e)))
            except OSError as e:  # a run directory or file this user cannot read: the others are still reported
                skipped.append((d, f"Cannot read {e.filename or d} ({e.strerror or e})."))
    if not runs:
        raise BadInput("No run could be reported: " + " ".join(f"{d}: {why}" for d, why in skipped))
    return runs


def _pct(x, digits: int = 2) -> str:
    """A percentage; 3 digits past any real one (a damaged file's 1e308 is not 300 digits)."""
    return "—" if x is None else f"{x:.{digits}f}%" if abs(x) < 1e6 else f"{x:.3g}%"


def duration(seconds) -> str:
    """'3m 05s' or '2h 01m'; a dash for None."""
    if seconds is None or not math.isfinite(seconds):  # a NaN or inf from a damaged metrics.jsonl
        return "—"
    if abs(seconds) >= 1e9:  # past 30 years: a damaged file, shown as a number rather than 300 digits of hours
        return f"{seconds:.3g} s"
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def results_table(runs: list[Run], skipped: list = (), warnings: list[str] = ()) -> str:
    """The results table (markdown), one row per run, then the notes, the warnings and the runs left out."""
    with_val = any(r.summary.get("selection") == "val" for r in runs)
    with_wait = any(r.summary.get("data_wait_fraction") is not None for r in runs)
    with_target = any(r.summary.get("target_acc") for r in runs)
    head = ["run", "recipe", "what changes", "best test acc (epoch)"]
    head += ["best val acc (epoch)", "test acc at best val"] * with_val
    head += ["final test acc", "epochs", "wall time", "train img/s"]
    head += ["data wait"] * with_wait + ["time to target (training)"] * with_target
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in runs:
        s = r.summary
        name = str(s.get("recipe", r.dir.name))
        flags = ["synthetic data"] * bool(s.get("synthetic"))
        flags += [f"unfinished: {s.get('stop_reason') or 'stopped'}"] * (s.get("finished") is False)
        if flags:
            name += " *(" + "; ".join(flags) + ")*"
        row = [r.dir.name, name, s.get("description", ""),
               f"{_pct(s.get('best_acc'))} ({s.get('best_epoch', '?')})"]
        if with_val:
            row += ([f"{_pct(s.get('best_val_acc'))} ({s.get('best_val_epoch', '?')})",
                     _pct(s.get("test_acc_at_best_val"))] if s.get("selection") == "val" else ["—", "—"])
        row += [_pct(s.get("final_acc")), f"{s.get('epochs_done', '?')}/{s.get('epochs') or '?'}",
                duration(s.get("wall_seconds")), _rate(s.get("train_images_per_sec"))]
        if with_wait:
            row.append("—" if s.get("data_wait_fraction") is None else _pct(100 * s["data_wait_fraction"], 1))
        row += [_to_target(s)] * with_target
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    if any(r.summary.get("synthetic") for r in runs):
        notes.append("Runs marked *synthetic data* trained on the generated stand-in set (`fastcifar prepare "
                     "--synthetic`): their accuracies say nothing about the real CIFAR-100 or CIFAR-10.")
    if with_val:
        notes.append("Runs with a validation split chose their epoch on validation; the test accuracy at that "
                     "epoch is the honest figure. 'Best test acc' picks the epoch on the test set, as the tutorial did.")
    if with_target:
        notes.append("Time to target: training seconds (first-step warm-up, evaluation and checkpoints left out) "
                     "until the first epoch whose selection accuracy (val when held out, else test) reached the "
                     "run's train.target_acc.")
    notes += [f"Warning: {w}" for w in warnings]
    notes += [f"Skipped {d}: {why}" for d, why in skipped]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _rate(x) -> str:
    """Images per second with thousands separators; a dash for none; 3 digits past any real rate."""
    return "—" if not x else f"{x:,.0f}" if abs(x) < 1e12 else f"{x:.3g}"


def _to_target(s: dict) -> str:
    if not s.get("target_acc"):
        return "—"
    if s.get("epoch_to_target") is None:
        return f"not reached ({s['target_acc']:g}%)"
    return f"{duration(s.get('seconds_to_target'))} to {s['target_acc']:g}% (epoch {s['epoch_to_target']})"


# --sort: the order of the table's rows (and the plots' legends)
SORTS = {
    "run": lambda runs: runs,  # as given, folders in name order
    "best_acc": lambda runs: sorted(runs, key=lambda r: -(r.summary.get("best_acc") or -1.0)),
    # fastest to the target first; runs without a target, or that did not reach it, last
    "time_to_target": lambda runs: sorted(runs, key=lambda r: (r.summary.get("seconds_to_target") is None,
                                                               r.summary.get("seconds_to_target") or 0.0)),
}


def warnings(runs: list[Run]) -> list[str]:
    """What a reader must know before comparing the rows: different data or software, test-set selection."""
    pairs = [(r.dir.name, r.summary.get("provenance")) for r in runs]
    out = provenance.mismatches(pairs) if len(runs) > 1 else []
    on_test = [r.dir.name for r in runs if r.summary.get("selection") == "test"]
    if on_test:
        out.append(f"{', '.join(on_test)} selected {'its' if len(on_test) == 1 else 'their'} best epoch on the test "
                   f"set (as the tutorial did), so 'best test acc' is an optimistic figure; hold out a validation "
                   f"split (--set data.val_split=0.1) for an honest one.")
    return out


def save_png(fig, path: Path) -> None:
    """The figure saved as a PNG (replacing only a report's own), then closed."""
    import matplotlib.pyplot as plt  # the figure's maker has chosen the Agg backend

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"), by="report")
    finally:
        plt.close(fig)


# Largest |value| a curve draws: matplotlib cannot lay out an axis from -1e308 to 1e308 (the range
# overflows), and a loss past 1e15 is a diverged run whose point would flatten every other curve
PLOT_LIMIT = 1e15


def _drawable(x) -> bool:
    return x is not None and math.isfinite(x) and abs(x) <= PLOT_LIMIT


def curves_figure(runs: list[Run], key: str, ylabel: str):
    """A line per run of metrics.jsonl's `key` over integer epochs, a star at its best (selected) epoch."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in runs:
        pts = [(e["epoch"], e[key]) for e in r.epochs if _drawable(e["epoch"]) and _drawable(e.get(key))]
        if pts:
            # matplotlib cannot draw a name's undecodable bytes (surrogates): they show as U+FFFD
            label = r.dir.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            label += " (synthetic)" if r.summary.get("synthetic") else ""
            (line,) = ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, label=label)
            best = dict(pts).get(r.summary.get("best_epoch"))
            if best is not None:
                ax.plot([r.summary["best_epoch"]], [best], marker="*", markersize=13, color=line.get_color(),
                        markeredgecolor="black", linestyle="none", gid="best", label="_nolegend_")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_title("★ best (selected) epoch", fontsize=9, loc="right")
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no run had a point to draw
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


REPORT_FILES = ("results.md", "test_accuracy.png", "test_loss.png", "sweep.png")


def sweep_of(paths: list[Path], warn) -> dict | None:
    """The results.json of a sweep directory (`fastcifar sweep`'s), when it is the one path given;
    None otherwise, and when that file cannot be drawn (warn says why)."""
    if len(paths) != 1 or not (f := paths[0] / "results.json").is_file():
        return None
    try:
        res = jsonio.load(f)
    except BadInput as e:
        warn(f"warning: no sweep.png: {e}")
        return None
    if not isinstance(res, dict) or res.get("kind") != "sweep":
        return None  # a reproduce table's results
    settings = res.get("settings")
    ok = isinstance(settings, list) and settings and all(
        isinstance(x, dict) and isinstance(x.get("setting"), str) and type(x.get("n")) is int
        and all(isinstance(x.get(k), dict) and _number(x[k].get("mean"), finite=True)
                and _number(x[k].get("std"), finite=True) for k in ("best_acc", "best_val_acc")) for x in settings)
    if not ok:
        warn(f"warning: no sweep.png: {f} is damaged (its settings are not what `fastcifar sweep` writes).")
        return None
    return res


def sweep_figure(res: dict):
    """The sweep's settings in rank order as bars: mean best accuracy (on what it ranked) ± std, n beside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "best_val_acc" if res.get("ranked_on") == "val" else "best_acc"
    rows = [x for x in res["settings"] if x[key]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * max(1, len(rows))), dpi=120)
    y = list(range(len(rows)))[::-1]  # rank 1 on top
    ax.barh(y, [x[key]["mean"] for x in rows], xerr=[x[key]["std"] or 0.0 for x in rows], capsize=3, gid="settings",
            color="tab:blue", alpha=0.8)
    # matplotlib cannot draw a name's undecodable bytes (surrogates): they show as U+FFFD
    names = [x["setting"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:60] for x in rows]
    ax.set_yticks(y, [f"{name} (n={x['n']})" for name, x in zip(names, rows)], fontsize=7)
    what = "validation" if key == "best_val_acc" else "test"
    ax.set_xlabel(f"best {what} top-1 accuracy (%), mean ± sample std over seeds")
    ax.set_title(f"sweep of {str(res.get('recipe', '?'))[:60]}" + (" (synthetic data)" if res.get("synthetic") else ""),
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def check_out(out: Path) -> None:
    """BadInput unless --out can take the report without replacing anything fastcifar did not write:
    a new or existing directory, not a run's or a store, whose report files (if any) a report wrote."""
    from fastcifar.data import check_outside_stores

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; the report is a directory of files ({', '.join(REPORT_FILES)}). "
                       f"Choose another --out.")
    if any((out / f).exists() for f in RUN_FILES + ("last.pt", "best.pt")):
        raise BadInput(f"--out {out} is a run directory; a report goes beside the runs, not into one. Choose another "
                       f"--out (the default is ./report).")
    check_outside_stores(out)
    owned.check([out / f for f in REPORT_FILES], "report", "The report would replace {it}: choose another --out, or "
                "move {it} away.")


def report(paths: list[Path], out: Path, warn=lambda msg: None, sort: str = "run") -> tuple[str, list[Path]]:
    """Write results.md, test_accuracy.png and test_loss.png to out; return the table and files.
    warn(message) names each run left out, and why, and each warning; sort: a key of SORTS."""
    if sort not in SORTS:
        raise BadInput(f"--sort {sort!r}: choose one of {', '.join(SORTS)}.")
    check_out(out)
    skipped = []
    runs = SORTS[sort](find_runs(paths, skipped))
    for d, why in skipped:
        warn(f"skipped {d}: {why}")
    notes = warnings(runs)
    for w in notes:
        warn(f"warning: {w}")
    table = results_table(runs, skipped, notes)
    swept = sweep_of(paths, warn)
    if swept is not None:
        table += (f"\nsweep.png: the settings of the sweep in {paths[0]} ranked by mean best accuracy, as its "
                  f"results.md lists them.\n")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # the pictures first: results.md, which shows them, is never new while they are not
        save_png(curves_figure(runs, "test_acc", "test top-1 accuracy (%)"), out / "test_accuracy.png")
        save_png(curves_figure(runs, "test_loss", "test loss"), out / "test_loss.png")
        if swept is not None:
            save_png(sweep_figure(swept), out / "sweep.png")
        # a run directory's name that is not UTF-8 goes back as the bytes it was (surrogateescape)
        atomic_write(out / "results.md", lambda f: f.write(table.encode("utf-8", "surrogateescape")), by="report")
    except OSError as e:
        raise BadInput(f"Cannot write the report to {out} ({e.strerror or e}); choose a writable --out.")
    return table, [out / "results.md", out / "test_accuracy.png", out / "test_loss.png"] + [out / "sweep.png"] * (
        swept is not None)
