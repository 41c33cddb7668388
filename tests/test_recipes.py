"""Every recipe loads, validates and builds its model; the tutorial's recipes quote its figures
(their settings: test_tutorial_recipes.py)."""

import re
from pathlib import Path

import pytest
import torch

from fastcifar.config import load
from fastcifar.models import build_model
from helpers import TUTORIAL

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.py")
                 if not p.name.startswith("_"))


def test_every_tutorial_experiment_has_a_recipe():
    assert set(TUTORIAL) <= set(RECIPES)
    assert {"r18_cifar_32", "smoke"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_builds(name):
    r, info = load(name)
    r.validate()
    assert info["description"], f"{name} needs a one-line docstring"
    if name in TUTORIAL:
        assert TUTORIAL[name] in info["description"]
    # the hub is out of reach in tests: build the same architecture without downloading
    r.model.pretrained = False
    net = build_model(r.model, r.head, num_classes=100).eval()
    size = min(r.aug.image_size, 64)  # every model here is fully convolutional: a small input checks the wiring
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_beyond_the_tutorial():
    r, info = load("r18_cifar_32")
    assert r.model.cifar_stem and r.aug.pad_crop and r.aug.hflip and r.aug.normalize == "cifar"
    assert r.schedule.kind in ("cosine", "onecycle") and r.loss.label_smoothing > 0
    assert r.train.amp == "auto" and r.train.epochs <= 30 and r.aug.image_size == 32
    assert re.search(r"\d+%", info["description"])
