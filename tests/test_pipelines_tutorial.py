"""The tutorial's per-image data path (the bench's baseline) augments the stored 32x32 image and
then resizes, in the tutorial's order (its CIFAR100AugDataset), with albumentations + cv2 and in
the torch fallback alike; its DataLoader takes the tutorial's 16 workers, capped at the cores."""

import os

import cv2
import numpy as np
import pytest
import torch

import fastcifar.pipelines.tutorial as tut
from fastcifar.pipelines.spec import AugSpec, tutorial_oneof


def dataset(store, use_albumentations: bool, size: int = 224):
    spec = AugSpec(image_size=size, **tutorial_oneof(1.0))
    ds = tut.TutorialDataset(store.images("train")[:8], store.labels("train")[:8], spec, (size,), True,
                             (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), use_albumentations)
    ds.seed(3)
    return ds


def test_albumentations_path_augments_at_32_then_resizes_with_cv2(store):
    ds = dataset(store, use_albumentations=True)
    seen, compose = [], ds.compose
    ds.compose = lambda image: (seen.append(image.shape), compose(image=image))[1]
    (x,), label = ds[5]
    assert seen == [(32, 32, 3)] and x.shape == (224, 224, 3) and label == int(store.labels("train")[5])
    ds.seed(3)  # the same draw again, by hand: augment the stored image, then cv2's bilinear resize
    augmented = ds.compose(image=np.array(store.images("train")[5]))["image"]
    want = cv2.resize(augmented, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    np.testing.assert_allclose(x.numpy(), want, atol=1e-6)


def test_torch_fallback_augments_at_32_then_resizes(store, monkeypatch):
    seen, augment = [], tut.tb.augment
    monkeypatch.setattr(tut.tb, "augment", lambda x, d, spec: (seen.append(tuple(x.shape)), augment(x, d, spec))[1])
    (x,), _ = dataset(store, use_albumentations=False)[0]
    assert seen == [(1, 32, 32, 3)] and x.shape == (224, 224, 3)


@pytest.mark.parametrize("cores", [2, 64])
def test_workers_are_the_tutorials_16_capped_at_the_cores(store, monkeypatch, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    b = tut.TutorialBackend(store, "train", spec=AugSpec(), sizes=(32,), device=torch.device("cpu"), augment=False,
                            seed=0, rank=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert tut.WORKERS == 16 and b.workers == min(16, cores)
