"""The fields that make the tutorial's code reproducible (head.margin_grad, head.eval_logits,
optim.decay_groups, train.tf32, distill.teacher_margin, distill.teacher_bn, model.init_from,
loss.scales): typed, validated (bad values exit 2), round-tripped through recipe.json, and absent
from older run files without changing what those runs did."""

import json

import pytest
import torch

from fastcifar import BadInput, runtime
from fastcifar.config import Recipe, apply_overrides, from_dict, to_dict
from helpers import backend_flags, cli, fit, info, tiny

NEW = ["head.margin_grad=straight_through", "head.eval_logits=cosine", "optim.decay_groups=tutorial",
       "train.tf32=conv", "distill.teacher_margin=true", "distill.teacher_bn=train", "model.init_from=runs/x",
       "loss.scales=32,64"]


def test_new_fields_convert_and_round_trip_through_recipe_json():
    r = apply_overrides(Recipe(), NEW)
    assert (r.head.margin_grad, r.head.eval_logits, r.optim.decay_groups, r.train.tf32) == \
        ("straight_through", "cosine", "tutorial", "conv")
    assert (r.distill.teacher_margin, r.distill.teacher_bn, r.model.init_from, r.loss.scales) == \
        (True, "train", "runs/x", (32, 64))
    back = from_dict(json.loads(json.dumps({"name": "x", **to_dict(r)})))
    assert back == r and isinstance(back.loss.scales, tuple)
    for item in NEW:  # each one differs from the default, so the round trip really carried it
        key = item.split("=")[0]
        section, name = key.split(".")
        assert getattr(getattr(r, section), name) != getattr(getattr(Recipe(), section), name), key


@pytest.mark.parametrize("item, message", [
    ("head.margin_grad=sideways", "head.margin_grad = 'sideways': must be one of exact, straight_through"),
    ("head.eval_logits=raw", "head.eval_logits = 'raw': must be one of scaled, cosine"),
    ("head.m=2.0", r"head.m = 2.0: is ArcFace's angular margin in radians and must lie in \[0, pi/2\]"),
    ("head.m=-0.1", "head.m = -0.1: is ArcFace's angular margin"),
    ("optim.decay_groups=weights", "optim.decay_groups = 'weights': must be one of no_bias_norm, tutorial, all"),
    ("train.tf32=maybe", "train.tf32 = 'maybe': must be one of on, conv, off"),
    ("distill.teacher_bn=frozen", "distill.teacher_bn = 'frozen': must be one of eval, train"),
    ("loss.scales=32", r"loss.scales = \(32,\): must be \(\) \(off\) or two or more different image sides"),
    ("loss.scales=32,32", "loss.scales = .*two or more different"),
    ("loss.scales=4,32", "loss.scales = .*at least 8 px"),
])
def test_bad_values_name_the_field(item, message):
    r = apply_overrides(Recipe(), ["head.kind=arcface", item])
    with pytest.raises(BadInput, match=message):
        r.validate()


def test_cosface_margin_is_not_bound_to_radians():
    apply_overrides(Recipe(), ["head.kind=cosface", "head.m=2.0"]).validate()


@pytest.mark.parametrize("item, expected", [("loss.scales=a,b", "comma-separated list of an int"),
                                            ("distill.teacher_margin=maybe", "a bool")])
def test_wrong_types(item, expected):
    with pytest.raises(BadInput, match=expected):
        apply_overrides(Recipe(), [item])


def test_multiscale_and_distillation_exclude_each_other():
    with pytest.raises(BadInput, match="two objectives"):
        apply_overrides(Recipe(), ["loss.scales=32,64", "distill.teacher=runs/t"]).validate()


@pytest.mark.parametrize("item", ["head.margin_grad=sideways", "loss.scales=32", "train.tf32=maybe"])
def test_cli_exits_2_before_touching_anything(monkeypatch, tmp_path, item):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "smoke", "--data-dir", tmp_path / "data", "--set", item)
    assert code == 2 and item.split("=")[0] in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no store prepared, no run directory


def test_a_recipe_json_from_before_these_fields_does_what_the_old_run_did():
    """Older recipe.json files and checkpoints lack the new fields: they load with the values the
    code had then: the exact margin gradient, s-scaled evaluation logits, a plain eval-mode
    teacher, no init_from or scales, and TF32 on (PyTorch's own flags, convolutions only, when
    deterministic: the old code did not touch them then)."""
    for deterministic, tf32 in [(False, "on"), (True, "conv")]:
        d = to_dict(Recipe())
        for section, name in [("head", "margin_grad"), ("head", "eval_logits"), ("train", "tf32"),
                              ("distill", "teacher_margin"), ("distill", "teacher_bn"), ("model", "init_from"),
                              ("loss", "scales"), ("optim", "decay_groups")]:
            del d[section][name]
        d["optim"]["decay_norm_bias"] = False
        d["train"]["deterministic"] = deterministic
        r = from_dict(d)
        assert (r.head.margin_grad, r.head.eval_logits, r.distill.teacher_margin, r.distill.teacher_bn) == \
            ("exact", "scaled", False, "eval")
        assert (r.model.init_from, r.loss.scales, r.optim.decay_groups, r.train.tf32) == ("", (), "no_bias_norm", tf32)
    d = to_dict(Recipe())
    d["train"]["deterministic"] = True  # a new file says what it wants: no old-run rule applies
    assert from_dict(d).train.tf32 == "on"


# ---- train.tf32: the flags a run sets


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("tf32, want", [("on", (True, True)), ("conv", (True, False)), ("off", (False, False))])
def test_backend_settings_honour_tf32_and_restore(odd_flags, deterministic, tf32, want):
    torch.backends.cudnn.allow_tf32 = True  # a value "off" must change
    before = backend_flags()
    with runtime.backend_settings(deterministic, tf32):
        inside = backend_flags()
    assert (inside["cudnn.allow_tf32"], inside["matmul.allow_tf32"]) == want
    assert inside["deterministic"] == deterministic
    assert backend_flags() == before


def test_a_training_run_uses_its_tf32_field(store_dir, tmp_path, odd_flags):  # noqa: F811
    seen = []
    fit(tiny(train__epochs=1, data__subset=0.2, train__tf32="conv"), info(), out=tmp_path / "run", data_dir=store_dir,
        setup=lambda t: seen.append(backend_flags()))
    assert (seen[0]["cudnn.allow_tf32"], seen[0]["matmul.allow_tf32"]) == (True, False)
    assert backend_flags() == odd_flags
