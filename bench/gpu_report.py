"""The table bench/gpu_check.sh prints last (and writes to OUT/summary.md): each step's status,
the correctness checks, the training runs, the pipeline, train_step and end-to-end figures with
the headroom, and the issue's targets. Reads whatever the steps left in OUT, so it still reports
when some of them failed.

    python bench/gpu_report.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastcifar import BadInput, jsonio  # noqa: E402
from fastcifar.bench import headroom  # noqa: E402
from fastcifar.checkpoint import atomic_write  # noqa: E402
from tables import _md, end_to_end_table, pipeline_table, policy_table, train_step_table  # noqa: E402

RUNS = {"train_compiled": "r18_cifar_32, compiled bf16, DALI", "resume": "the same, resumed for one more epoch",
        "fp16": "r18_cifar_32, fp16 + GradScaler, eager", "arcface224": "r18_arcface_224, a few steps",
        "teacher": "r50_arcface_224, tiny teacher", "distill": "r18_arcface_kd, two views (32 + 224)"}


BENCH_FILES = ("pipeline.json", "train_step.json", "end_to_end.json", "train_step_r50.json")  # gpu_check.sh's bench steps


def _json(path: Path):
    """A step's JSON, or None when the step left none or a damaged one (its status says why)."""
    try:
        return jsonio.load(path) if path.is_file() else None
    except BadInput:
        return None


def recompiles(log: Path) -> int | None:
    """How many times dynamo recompiled a function (TORCH_LOGS=recompiles lines)."""
    if not log.is_file():
        return None
    return sum("Recompiling function" in line for line in log.read_text(errors="replace").splitlines())


def targets(rows: list[dict], gpu: bool) -> list[list]:
    """The issue's targets: [what, figure, target, met]; on a CPU the figures say nothing about them."""
    def rate(stage, backend=None, model=None, size=None, aug=None, compiled=None):
        for r in rows:
            if (r["stage"] == stage and (backend is None or r["backend"] == backend)
                    and (model is None or r.get("model") == model) and (size is None or r["image_size"] == size)
                    and (aug is None or r.get("aug") == aug) and (compiled is None or r.get("compiled") == compiled)):
                return r["images_per_sec"]
        return None

    dali = "dali-gpu" if gpu else "dali-cpu"
    out = [["DALI OneOf pipeline at 224, img/s", rate("pipeline", dali, size=224, aug="oneof"), ">= 100,000", 100_000]]
    for size in (32, 224):
        step = rate("train_step", model="resnet18", size=size, compiled=True)
        e2e = rate("end_to_end", dali, model="resnet18", size=size, compiled=True)
        ratio = round(e2e / step, 2) if e2e and step else None
        out.append([f"resnet18 at {size}: end_to_end / compiled step", ratio, ">= 0.95", 0.95])
    for model, floor in (("resnet18", 10_000), ("resnet50", 4_000)):
        out.append([f"{model} at 224, compiled bf16 channels_last, img/s",
                    rate("train_step", model=model, size=224, compiled=True), f">= {floor:,}", floor])
    for t in out:
        t[3] = "—" if t[1] is None else ("yes" if t[1] >= t[3] else "NO") if gpu else "n/a (CPU)"
        t[1] = "—" if t[1] is None else f"{t[1]:,}"
    return out


def report(out: Path) -> str:
    parts = []
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]] if (out / "steps.tsv").is_file() else []
    parts.append(_md(["step", "status", "seconds"], steps))
    env = _json(out / "env.json")
    gpu = bool(env and env.get("gpu"))
    if env:
        parts.append(f"On {env.get('nvidia_smi') or env.get('gpu') or 'no GPU'}: python {env['python']}, torch "
                     f"{env['torch']} (CUDA {env['cuda']}), timm {env['timm']}, DALI {env['dali'] or 'not importable'}.")
    else:
        parts.append("Versions not recorded: the env step did not run.")

    agree = _json(out / "agree.json")
    if agree:
        rows = [[r["check"], f"{r['a']} vs {r['b']}", r["size"], r.get("spec", ""), r["max"], r["bound"],
                 "ok" if r["ok"] else "FAIL"] for r in agree["rows"]]
        parts.append(_md(["same images", "backends", "px", "spec", "max diff (/255)", "bound", ""], rows))

    runs = []
    for name, what in RUNS.items():
        s = _json(out / f"{name}_summary.json")
        n = recompiles(out / f"{name}.log") if name in ("train_compiled", "resume") else None
        if s:  # img/s is steady state (null when every epoch was the warm-up step alone); the warm-up apart
            rate, warm = s.get("train_images_per_sec"), s.get("warmup_seconds")
            runs.append([name, what, s["backend"], s["device"], s["epochs_done"], "—" if rate is None else f"{rate:,.0f}",
                         "—" if warm is None else f"{warm:.1f}", f"{s['best_acc']:.2f}", f"{s['wall_seconds']:.0f}",
                         "—" if n is None else n])
        else:
            runs.append([name, what, "—", "—", "—", "—", "—", "—", "—", "—" if n is None else n])
    parts.append(_md(["run", "what", "loader", "device", "epochs", "train img/s", "warm-up s", "best test % (synthetic)",
                      "wall s", "recompiles"], runs))

    rows = []
    for name in BENCH_FILES:
        bench = _json(out / name)
        if bench:
            rows += bench["rows"]
            if bench.get("meta", {}).get("complete") is False:
                n = len(bench["rows"])
                parts.append(f"{name}: stopped before its end (its step ran out of time or was stopped); the "
                             f"tables below hold the {n} row{'s' * (n != 1)} it measured.")
    room = headroom(rows)
    if any(r["stage"] == "pipeline" for r in rows):
        parts.append(pipeline_table(rows))
    if any(r.get("aug") in ("trivialaugment", "randaugment") for r in rows):
        parts.append(policy_table(rows))
    if any(r["stage"] == "train_step" for r in rows):
        parts.append(train_step_table(rows))
    if any(r["stage"] == "end_to_end" for r in rows) or room:
        parts.append(end_to_end_table(rows, room))
    parts.append(_md(["target (issue 8)", "measured", "target", "met"], targets(rows, gpu)))
    text = "\n\n".join(parts) + "\n"
    atomic_write(out / "summary.md", lambda f: f.write(text.encode()))
    return text


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
