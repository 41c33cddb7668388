"""The recipes named after the tutorial's experiments are what its code ran (SEED-NOTES: "More facts
from its code"): one table of facts per recipe, and every other field at fastcifar's default, so
a change to either shows up here rather than as a quietly different experiment."""

import pytest

from fastcifar.config import Recipe, load, to_dict
from fastcifar.pipelines.spec import ONEOF_OPS

# r18_baseline as its YAML and code ran it
BASELINE = {
    "data.batch_size": 250, "data.shuffle": False, "data.drop_last": False,
    "data.val_split": 0.0,                       # selection on the test set, as the tutorial did
    "aug.image_size": 32, "aug.normalize": "none", "aug.interpolation": "linear",
    "model.name": "resnet18", "model.pretrained": False, "model.cifar_stem": False, "model.init_from": "",
    "head.kind": "linear",
    "loss.label_smoothing": 0.0, "loss.scales": (),
    "optim.name": "adamw", "optim.lr": 1e-3, "optim.betas": (0.9, 0.999), "optim.lr_ref_batch": 0,
    "optim.weight_decay": 1e-3, "optim.decay_groups": "tutorial", "optim.grad_clip": 5.0,
    "schedule.kind": "constant", "schedule.warmup": 0.0,
    "train.epochs": 200, "train.amp": "none", "train.tf32": "conv",
    "distill.teacher": "",
}
# its MarginHead with the ArcFace loss module of its model code
ARCFACE = {"model.pretrained": True, "head.kind": "arcface", "head.embed_dim": 512, "head.s": 8.0, "head.m": 0.35,
           "head.margin_grad": "straight_through", "head.eval_logits": "cosine"}

FACTS = {
    "r18_baseline": BASELINE,
    "r18_augment": {**BASELINE, "aug.oneof": ONEOF_OPS, "aug.oneof_p": 1.0},
    "r18_wd01": {**BASELINE, "optim.weight_decay": 0.1},
    "r18_lbsmooth": {**BASELINE, "loss.label_smoothing": 0.1},
    "r18_pretrained": {**BASELINE, "model.pretrained": True},
    "r18_arcface": {**BASELINE, **ARCFACE},
    "r18_arcface_224": {**BASELINE, **ARCFACE, "aug.image_size": 224},
    "r50_arcface": {**BASELINE, **ARCFACE, "model.name": "resnet50"},
    "r50_arcface_224": {**BASELINE, **ARCFACE, "model.name": "resnet50", "aug.image_size": 224},
    "r18_arcface_kd": {**BASELINE, **ARCFACE, "distill.teacher": "r50_arcface_224", "distill.alpha": 0.7,
                       "distill.temperature": 4.0, "distill.teacher_margin": True, "distill.teacher_bn": "train"},
    "r18_cosface": {**BASELINE, **ARCFACE, "head.kind": "cosface", "head.s": 8.0, "head.m": 0.3,
                    "loss.label_smoothing": 0.1},
    "r18_arcface_mst": {**BASELINE, **ARCFACE, "loss.scales": (32, 64)},
}


def flat(d: dict) -> dict:
    return {f"{section}.{k}": v for section, fields in d.items() for k, v in fields.items()}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_tutorial_recipe_is_its_code(name):
    got = flat(to_dict(load(name)[0]))
    want = {**flat(to_dict(Recipe())), **FACTS[name]}  # every field not a fact: fastcifar's default
    assert set(FACTS[name]) <= set(got), f"facts name unknown fields: {set(FACTS[name]) - set(got)}"
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not diff, f"{name} drifted from the tutorial's code (got, expected): {diff}"


def test_the_articles_values_are_not_the_defaults():
    """The article's reprinted class defaults (ArcFace s=64, m=0.5; weight decay 1e-4) and our own
    choices stay overrides: no tutorial recipe takes them silently."""
    for name in FACTS:
        r = load(name)[0]
        assert r.optim.weight_decay != 1e-4 and r.optim.decay_groups == "tutorial", name
        if r.head.kind == "arcface":
            assert (r.head.s, r.head.m, r.head.margin_grad) == (8.0, 0.35, "straight_through"), name
