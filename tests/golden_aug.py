"""Batches of the augmentations that existed before `aug.policy` (commit d58e9f7), kept in
tests/data/aug_before_policies.npz so that policy "none" is pinned bit for bit to them: the
images, and the draws as `draw` gives them (an op's parameters where an image gets the op, the
identity elsewhere).

    PYTHONPATH=$PWD python tests/golden_aug.py     # rewrites the file: only to pin a deliberate change
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import ArrayStore
from fastcifar.pipelines import AugSpec, make_loader
from fastcifar.pipelines.draw import batch_rng, draw
from fastcifar.pipelines.spec import tutorial_oneof

FILE = Path(__file__).parent / "data" / "aug_before_policies.npz"
SPECS = {  # every op that existed, alone and together
    "crop_flip": dict(pad_crop=2, hflip=0.5),
    "oneof": dict(pad_crop=4, hflip=0.5, **tutorial_oneof(0.5)),
    "all": dict(rrc_scale=(0.3, 1.0), vflip=0.2, ssr_p=0.5, jitter_p=0.5, erase_p=0.5),
}
N, SEED, EPOCH = 16, 3, 1


def images() -> np.ndarray:
    """N random 32x32 pictures of 4x4 px blocks, made here so that nothing else pins them."""
    rng = np.random.default_rng(1234)
    small = rng.integers(0, 256, (N, 8, 8, 3)).astype(np.float64)
    return np.repeat(np.repeat(small, 4, 1), 4, 2).astype(np.uint8)


def batches(backends=("torch", "dali"), where="golden") -> dict[str, np.ndarray]:
    """{name/key: array}: the draws of one batch per spec and each backend's images (uint8 NHWC)."""
    out = {}
    src = images()
    for name, kw in SPECS.items():
        spec = AugSpec(**kw)
        for key, a in draw(spec, N, batch_rng(SEED, EPOCH, 0, 2)).items():
            out[f"{name}/draw/{key}"] = a
        for backend in backends:
            loader = make_loader(ArrayStore(src, where), "train", spec, batch_size=8, backend=backend, seed=SEED)
            loader.set_epoch(EPOCH)
            x = np.concatenate([x.numpy() for x, _ in loader])
            out[f"{name}/{backend}"] = np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    return out


if __name__ == "__main__":
    FILE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FILE, **batches())
    print(f"wrote {FILE} ({FILE.stat().st_size} bytes)")
