"""Every recipe loads, validates and builds its model; the tutorial's recipes carry its settings
and figures."""

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


def test_tutorial_settings():
    b, _ = load("r18_baseline")
    assert (b.data.batch_size, b.data.shuffle, b.aug.image_size, b.aug.normalize) == (250, False, 32, "none")
    assert (b.model.name, b.model.pretrained, b.head.kind) == ("resnet18", False, "linear")
    assert (b.optim.name, b.optim.lr, b.optim.weight_decay, b.optim.grad_clip) == ("adamw", 1e-3, 1e-4, 5.0)
    assert (b.schedule.kind, b.train.epochs, b.train.amp, b.optim.decay_norm_bias) == ("constant", 200, "none", True)
    aug, _ = load("r18_augment")
    assert aug.aug.oneof_p == 1.0 and set(aug.aug.oneof) == {"shift_scale_rotate", "coarse_dropout", "color_jitter", "hflip", "vflip"}
    assert load("r18_wd01")[0].optim.weight_decay == 0.1
    assert load("r18_pretrained")[0].model.pretrained
    arc, info = load("r18_arcface")
    assert (arc.head.kind, arc.head.s, arc.head.m, arc.head.embed_dim) == ("arcface", 64.0, 0.5, 512)
    assert info["parent"] == "r18_pretrained" and arc.model.pretrained
    cos = load("r18_cosface")[0].head
    assert (cos.kind, cos.s, cos.m) == ("cosface", 64.0, 0.4)
    for name, model, size in [("r18_arcface_224", "resnet18", 224), ("r50_arcface", "resnet50", 32),
                              ("r50_arcface_224", "resnet50", 224)]:
        r = load(name)[0]
        assert (r.model.name, r.aug.image_size, r.head.kind, r.model.pretrained) == (model, size, "arcface", True)
    kd, info = load("r18_arcface_kd")
    assert (kd.distill.teacher, kd.distill.alpha, kd.distill.temperature) == ("r50_arcface_224", 0.7, 4.0)
    assert kd.aug.image_size == 32 and kd.head.kind == "arcface"


def test_beyond_the_tutorial():
    r, info = load("r18_cifar_32")
    assert r.model.cifar_stem and r.aug.pad_crop and r.aug.hflip and r.aug.normalize == "cifar"
    assert r.schedule.kind in ("cosine", "onecycle") and r.loss.label_smoothing > 0
    assert r.train.amp == "bf16" and r.train.epochs <= 30 and r.aug.image_size == 32
    assert re.search(r"\d+%", info["description"])
