"""Run by test_ddp.py under torchrun: record which train rows each rank's loop consumes, then run
the CLI exactly as `torchrun -m fastcifar` would. Writes $FASTCIFAR_TEST_RECORD/rank<R>.json."""

import json
import os
from pathlib import Path

import fastcifar.train as T

seen: dict[int, list] = {}
real_make_loader = T.make_loader


class Recorder:
    """Passes a training loader through, noting each yielded batch's rows and labels."""

    def __init__(self, loader):
        self.loader, self.epoch, self.start = loader, 0, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch
        self.loader.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        rows = self.loader.batches(self.epoch)
        for i, (images, labels) in enumerate(self.loader, start=self.start):
            seen.setdefault(self.epoch, []).append({"rows": rows[i].tolist(), "labels": labels.tolist()})
            yield images, labels


def make_loader(store, split, spec, batch_size, **kw):
    loader = real_make_loader(store, split, spec, batch_size, **kw)
    return Recorder(loader) if kw.get("augment") else loader


T.make_loader = make_loader

if __name__ == "__main__":
    from fastcifar.cli import main

    try:
        main()
    finally:
        out = Path(os.environ["FASTCIFAR_TEST_RECORD"]) / f"rank{os.environ['RANK']}.json"
        out.write_text(json.dumps({str(e): b for e, b in seen.items()}))
