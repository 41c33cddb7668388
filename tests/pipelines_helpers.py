"""Shared bits of the pipeline tests: a small synthetic store, the backends to run, conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcifar.pipelines.loader import dali_available

N_TRAIN, N_TEST = 500, 200
# DALI tests skip where DALI does not import (or FASTCIFAR_HIDE_DALI=1 hides it, see conftest.py)
needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI does not import here")
# Every backend runs on the CPU here; DALI in its CPU mode (device_id=None).
BATCHED = ["torch", pytest.param("dali", marks=needs_dali)]  # the backends that apply pipelines.draw's draws
BACKENDS = [*BATCHED, "tutorial"]


def stored(store, split: str, rows) -> np.ndarray:
    """The stored images of `rows` as the loaders emit them with normalize='none': NCHW float x/255."""
    return np.array(store.images(split)[np.asarray(rows)]).transpose(0, 3, 1, 2).astype(np.float32) / 255


def as_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """A loader batch made with normalize='none' back to uint8 NHWC (exact: it was uint8 / 255)."""
    return (x.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ArrayStore:
    """What the loaders read of a store, over in-memory uint8 NHWC images (labels all 0)."""

    def __init__(self, images, where):
        self.x, self.y, self.dir = images, np.zeros(len(images), np.int64), where

    def images(self, split):
        return self.x

    def labels(self, split):
        return self.y
