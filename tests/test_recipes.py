"""Every recipe loads, validates and builds its model; the tutorial's recipes quote its figures
(their settings: test_tutorial_recipes.py)."""

import re
from pathlib import Path

import pytest
import torch

from fastcifar.config import load
from fastcifar.models import build_model

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.py")
                 if not p.name.startswith("_"))
TUTORIAL = {  # recipe: the tutorial's figure its docstring must quote
    "r18_baseline": "44.26%", "r18_augment": "36.48%", "r18_wd01": "40.12%", "r18_lbsmooth": "44.81%",
    "r18_pretrained": "56.70%", "r18_arcface": "57.92%", "r18_arcface_224": "79.57%",
    "r50_arcface": "61.76%", "r50_arcface_224": "81.21%", "r18_arcface_kd": "57.37%", "r18_cosface": "57.92%",
    "r18_arcface_mst": "no result published",  # its multi-scale experiment: code, no figure
}


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
