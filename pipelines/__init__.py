"""Data pipelines: an augmentation spec (spec), one loader (loader.make_loader) over the DALI
graph (dali), batched torch ops (torch_backend) and the tutorial's per-sample path (tutorial),
plus batch-level MixUp/CutMix (mix). DALI is imported only when its backend is used."""

from fastcifar.pipelines.spec import AugSpec  # noqa: F401
from fastcifar.pipelines.loader import make_loader  # noqa: F401
