"""The fields that make the tutorial's code reproducible (head.margin_grad, head.eval_logits,
optim.decay_groups, train.tf32, distill.teacher_margin, distill.teacher_bn, model.init_from,
loss.scales): typed, validated (bad values exit 2) and round-tripped through recipe.json."""

import json
import sys

import pytest
import torch

from fastcifar import runtime
from fastcifar.config import Recipe, apply_overrides, from_dict, to_dict
from fastcifar.errors import BadInput
from test_runtime import flags, odd_flags  # noqa: F401 (odd_flags: the fixture)
from test_train import fit, info, store, tiny  # noqa: F401 (store: the fixture)

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
def test_cli_exits_2_before_touching_anything(monkeypatch, capsys, tmp_path, item):
    from fastcifar.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fastcifar", "train", "smoke", "--data-dir", str(tmp_path / "data"), "--set", item])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and item.split("=")[0] in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no store prepared, no run directory


# ---- train.tf32: the flags a run sets


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("tf32, want", [("on", (True, True)), ("conv", (True, False)), ("off", (False, False))])
def test_backend_settings_honour_tf32_and_restore(odd_flags, deterministic, tf32, want):
    torch.backends.cudnn.allow_tf32 = True  # a value "off" must change
    before = flags()
    with runtime.backend_settings(deterministic, tf32):
        inside = flags()
    assert (inside["cudnn.allow_tf32"], inside["matmul.allow_tf32"]) == want
    assert inside["deterministic"] == deterministic
    assert flags() == before


def test_a_training_run_uses_its_tf32_field(store, tmp_path, odd_flags):  # noqa: F811
    seen = []
    fit(tiny(train__epochs=1, data__subset=0.2, train__tf32="conv"), info(), out=tmp_path / "run", data_dir=store,
        setup=lambda t: seen.append(flags()))
    assert (seen[0]["cudnn.allow_tf32"], seen[0]["matmul.allow_tf32"]) == (True, False)
    assert flags() == odd_flags
