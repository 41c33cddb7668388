"""Turn a `fastcifar bench --json` file into the compact markdown tables of the README and
bench/RESULTS.md: one pivot table per stage, plus the headroom.

    python bench/tables.py bench/cpu_bench.json
    python bench/tables.py bench/cpu_bench.json --plot bench/cpu_bench.png   # also the README's picture

--plot replaces an existing PNG only if a bench drew it (the checkout's own: move it away first).
"""

from __future__ import annotations

import sys
from pathlib import Path

SETTINGS = [("eager NCHW fp32", (False, "NCHW", "fp32")), ("+ channels_last", (False, "channels_last", "fp32")),
            ("+ AMP", (False, "channels_last", "amp")), ("+ torch.compile", (True, "channels_last", "amp"))]


def _n(v) -> str:
    return "—" if v is None else f"{v:,}"


def _md(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def pipeline_table(rows: list[dict]) -> str:
    """img/s per backend at 32/224 px with augmentation off / OneOf, and the ratio to the tutorial's path."""
    pipe = [r for r in rows if r["stage"] == "pipeline"]
    cols = [(32, "none"), (32, "oneof"), (224, "none"), (224, "oneof")]
    notes = {r["backend"]: r["note"] for r in pipe if r.get("note")}  # what the tutorial path ran with
    out = []
    for backend in dict.fromkeys(r["backend"] for r in pipe):
        cells = []
        for size, aug in cols:
            r = next((r for r in pipe if (r["backend"], r["image_size"], r["aug"]) == (backend, size, aug)), None)
            ratio = f" ({r['vs_tutorial']}x)" if r and backend != "tutorial" and "vs_tutorial" in r else ""
            cells.append(_n(r and r["images_per_sec"]) + ratio)
        out.append([backend + (f" ({notes[backend]})" if backend in notes else ""), *cells])
    bs = pipe[0]["batch_size"] if pipe else "?"
    return _md([f"pipeline, img/s (batch {bs})", "32 px, no aug", "32 px, OneOf", "224 px, no aug", "224 px, OneOf"], out)


POLICY_AUGS = (("oneof", "OneOf"), ("trivialaugment", "TrivialAugment"), ("randaugment", "RandAugment"))


def policy_table(rows: list[dict]) -> str:
    """img/s per batched backend with OneOf, TrivialAugment and RandAugment at 32 and 224 px, and
    each over the fastest train step at that size (the headroom; "—" without train_step rows)."""
    pipe = [r for r in rows if r["stage"] == "pipeline"]
    step = {}
    for r in rows:
        if r["stage"] == "train_step":
            step[r["image_size"]] = max(step.get(r["image_size"], 0), r["images_per_sec"])
    out = []
    for backend in dict.fromkeys(r["backend"] for r in pipe if r["aug"] in ("trivialaugment", "randaugment")):
        for size in (32, 224):
            cells = []
            for aug, _ in POLICY_AUGS:
                r = next((r for r in pipe if (r["backend"], r["image_size"], r["aug"]) == (backend, size, aug)), None)
                room = f" ({r['images_per_sec'] / step[size]:.0f}x)" if r and step.get(size) else ""
                cells.append(_n(r and r["images_per_sec"]) + room)
            out.append([backend, size, *cells, _n(step.get(size))])
    bs = pipe[0]["batch_size"] if pipe else "?"
    return _md([f"policies, img/s (batch {bs}; x the fastest step)", "px", *[name for _, name in POLICY_AUGS],
                "fastest train step"], out)


def _keyed(rows, stage):
    return {_setting_key(r): r for r in rows if r["stage"] == stage}


def train_step_table(rows: list[dict]) -> str:
    """img/s of a training step up the ladder of settings, per model and size."""
    steps = _keyed(rows, "train_step")
    out = []
    for model, size in dict.fromkeys((k[0], k[1]) for k in steps):
        cells = []
        for _, setting in SETTINGS:
            r = steps.get((model, size, *setting))
            warm = f" (warm-up {r['warmup_seconds']} s)" if r and r["compiled"] else ""
            cells.append(_n(r and r["images_per_sec"]) + warm)
        bs = next(r["batch_size"] for k, r in steps.items() if k[:2] == (model, size))
        out.append([model, size, bs, *cells])
    return _md(["train_step, img/s", "px", "batch", *[name for name, _ in SETTINGS]], out)


def end_to_end_table(rows: list[dict], headroom: list[dict]) -> str:
    """Per model and size: each loader feeding the step, that same step alone (its train_step row:
    the loaders' cost is the gap between them), and each pipeline's headroom over the fastest step."""
    e2e = [r for r in rows if r["stage"] == "end_to_end"]
    steps = _keyed(rows, "train_step")
    backends = list(dict.fromkeys(r["backend"] for r in e2e))
    room_backends = list(dict.fromkeys(h["pipeline"] for h in headroom))
    out = []
    for model, size in dict.fromkeys((r["model"], r["image_size"]) for r in e2e + headroom):
        fed = [next((r for r in e2e if (r["model"], r["image_size"], r["backend"]) == (model, size, b)), None)
               for b in backends]
        same = next((steps.get(k) for k in map(_setting_key, filter(None, fed)) if k in steps), None)
        room = [next((f"{h['headroom']}x" for h in headroom if (h["model"], h["image_size"], h["pipeline"]) ==
                      (model, size, b)), "—") for b in room_backends]
        fastest = next((h["train_step_img_s"] for h in headroom if (h["model"], h["image_size"]) == (model, size)), None)
        out.append([model, size, *[_n(r and r["images_per_sec"]) for r in fed], _n(same and same["images_per_sec"]),
                    _n(fastest), *room])
    head = ["end to end, img/s", "px", *[f"fed by {b}" for b in backends], "that step alone", "fastest step",
            *[f"headroom {b}" for b in room_backends]]
    return _md(head, out)


def _setting_key(r: dict) -> tuple:
    return r["model"], r["image_size"], r["compiled"], r["memory_format"], r["precision"]


def tables(bench: dict) -> str:
    """A line saying what the figures were measured on, then the tables."""
    m = bench.get("meta", {})
    rows, parts = bench["rows"], [f"Measured on {m.get('device', '?')} ({m.get('cpu_cores', '?')} CPU cores), torch "
                                  f"{m.get('torch', '?')}, DALI {m.get('dali', 'not installed')}, {m.get('time', '?')}"
                                  f"{', --quick' if m.get('quick') else ''}, {m.get('store', '?')} store."
                                  + (f" {m['note']}" if m.get("note") else "")]  # e.g. stages re-measured apart
    stages = {r["stage"] for r in rows}
    if "pipeline" in stages:
        parts.append(pipeline_table(rows))
    if any(r.get("aug") in ("trivialaugment", "randaugment") for r in rows):
        parts.append(policy_table(rows))
    if "train_step" in stages:
        parts.append(train_step_table(rows))
    if "end_to_end" in stages or bench.get("headroom"):
        parts.append(end_to_end_table(rows, bench.get("headroom", [])))
    return "\n\n".join(parts)


def main(argv: list[str]) -> int:
    """Print the tables of each JSON file; --plot PNG also draws the (last) file's picture."""
    plot_to = None
    if "--plot" in argv:
        i = argv.index("--plot")
        if i + 1 >= len(argv):
            print("usage: python bench/tables.py BENCH.json... [--plot PNG]", file=sys.stderr)
            return 2
        plot_to, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # fastcifar from this checkout
    from fastcifar import jsonio
    from fastcifar.errors import BadInput, why

    benches = []
    for path in argv:
        try:
            benches.append(jsonio.load(path))
            text = tables(benches[-1])
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # JSON, but not what `fastcifar bench` writes
            print(f"error: {path} is not a `fastcifar bench --json` file ({why(e)}).", file=sys.stderr)
            return 2
        print(text)
    if plot_to is not None and benches:
        from fastcifar.bench import plot

        try:
            plot(benches[-1], Path(plot_to))
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {plot_to}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
