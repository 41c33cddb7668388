"""Run by test_ddp.py under torchrun: record which train rows each rank's loop consumes, then run
the CLI exactly as `torchrun -m fastcifar` would. Writes $FASTCIFAR_TEST_RECORD/rank<R>.json."""

import json
import os
from pathlib import Path

import fastcifar.train as T
from loader_spy import LoaderSpy

seen: dict[int, list] = {}
real_make_loader = T.make_loader


def make_loader(store, split, spec, batch_size, **kw):
    loader = real_make_loader(store, split, spec, batch_size, **kw)
    if not kw.get("augment"):
        return loader
    # note each training batch's rows and labels, as this rank's loop consumes them
    return LoaderSpy(loader, lambda epoch, i, images, labels: seen.setdefault(epoch, []).append(
        {"rows": loader.batches(epoch)[i].tolist(), "labels": labels.tolist()}))


T.make_loader = make_loader

if __name__ == "__main__":
    from fastcifar.cli import main

    try:
        main()
    finally:
        out = Path(os.environ["FASTCIFAR_TEST_RECORD"]) / f"rank{os.environ['RANK']}.json"
        out.write_text(json.dumps({str(e): b for e, b in seen.items()}))
