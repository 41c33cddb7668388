"""Run by test_ddp.py under torchrun: train as `fastcifar train RECIPE --set ... --out ... --data-dir ...`
does, through the Trainer, recording which train rows each rank's loop consumes (a LoaderSpy on
the trainer's loader). Writes $FASTCIFAR_TEST_RECORD/rank<R>.json."""

import argparse
import json
import os
from pathlib import Path

from fastcifar import config
from fastcifar.train import Trainer
from loader_spy import LoaderSpy

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out")
    p.add_argument("--data-dir")
    a = p.parse_args()
    r, info = config.load(a.recipe)
    config.apply_overrides(r, a.set)
    seen: dict[int, list] = {}
    try:
        with Trainer(r, info, out=a.out, data_dir=a.data_dir) as trainer:
            loader = trainer.train_loader
            # note each training batch's rows and labels, as this rank's loop consumes them
            trainer.train_loader = LoaderSpy(loader, lambda epoch, i, images, labels: seen.setdefault(epoch, []).append(
                {"rows": loader.batches(epoch)[i].tolist(), "labels": labels.tolist()}))
            trainer.fit()
    finally:
        out = Path(os.environ["FASTCIFAR_TEST_RECORD"]) / f"rank{os.environ['RANK']}.json"
        out.write_text(json.dumps({str(e): b for e, b in seen.items()}))
