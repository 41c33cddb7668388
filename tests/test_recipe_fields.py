"""Recipe fields and how they hold up: the run's choices (EMA, TTA, selection, drop path, SyncBN,
the data set) and those that make the tutorial's code reproducible (head.margin_grad,
head.eval_logits, optim.decay_groups, train.tf32, distill.teacher_margin, distill.teacher_bn,
model.init_from, loss.scales). Each is typed and validated (a bad value is one paragraph and exit
2), round-trips through recipe.json and checkpoints, and a run written before it existed still
loads, evaluates and resumes as it did. (What tf32 sets: test_runtime.py.)"""

import json
import shutil

import pytest

import fastcifar.train as T
from fastcifar import checkpoint
from fastcifar.config import Recipe, apply_overrides, from_dict, to_dict, valid_keys
from fastcifar.errors import BadInput
from fastcifar.report import report
from helpers import NEWER_FIELDS, cli, metrics, one_paragraph

# ---- EMA, TTA, selection, drop path, SyncBN, the data set

NON_DEFAULT = ["data.dataset=cifar10", "model.drop_path=0.1", "model.sync_bn=true", "train.ema_decay=0.999",
               "train.ema_every=4", "train.ema_warmup=false", "train.select_on=ema", "train.tta=flip"]

BAD = [
    ("data.dataset=imagenet", "data.dataset = 'imagenet': must be one of cifar100, cifar10"),
    ("model.drop_path=1", r"model.drop_path = 1.0: is a probability and must lie in \[0, 1\)"),
    ("model.drop_path=-0.1", "model.drop_path = -0.1"),
    ("model.sync_bn=maybe", "model.sync_bn expects a bool"),
    ("train.ema_decay=1.0", r"train.ema_decay = 1.0: must lie in \[0, 1\)"),
    ("train.ema_decay=-0.5", "train.ema_decay = -0.5"),
    ("train.ema_decay=nan", "train.ema_decay = nan: must be a finite number"),
    ("train.ema_every=0", "train.ema_every = 0: must be at least 1"),
    ("train.ema_every=1.5", "train.ema_every expects an int"),
    ("train.ema_warmup=sometimes", "train.ema_warmup expects a bool"),
    ("train.select_on=best", "train.select_on = 'best': must be one of raw, ema"),
    ("train.select_on=ema", "selects on the EMA weights, but train.ema_decay = 0 keeps none"),
    ("train.tta=rotate", "train.tta = 'rotate': must be one of none, flip"),
]


def test_every_new_field_is_a_key_with_its_type():
    assert {f"{s}.{f}" for s, fs in NEWER_FIELDS.items() for f in fs} <= set(valid_keys())
    r = apply_overrides(Recipe(), NON_DEFAULT).validate()
    assert (r.data.dataset, r.model.drop_path, r.model.sync_bn) == ("cifar10", 0.1, True)
    assert (r.train.ema_decay, r.train.ema_every, r.train.ema_warmup) == (0.999, 4, False)
    assert (r.train.select_on, r.train.tta) == ("ema", "flip") and isinstance(r.train.ema_every, int)


@pytest.mark.parametrize("item, message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_bad_input_naming_the_field(item, message):
    with pytest.raises(BadInput, match=message):
        apply_overrides(Recipe(), [item]).validate()


@pytest.mark.parametrize("item, message", [BAD[0], BAD[4], BAD[11], BAD[12]], ids=["dataset", "ema", "select", "tta"])
def test_cli_bad_values_exit_2_before_anything_is_written(tmp_path, item, message):
    code, _, err = cli("train", "smoke", "--set", item, "--out", tmp_path / "run",
                       "--data-dir", tmp_path / "data")
    assert code == 2 and one_paragraph(err), err
    assert item.split("=")[0] in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_python_recipes_are_type_checked_too():
    r = Recipe()
    r.train.ema_decay = "0.999"
    with pytest.raises(BadInput, match="train.ema_decay = '0.999': expected a float"):
        r.validate()


def test_new_fields_round_trip_through_recipe_json_and_checkpoints(tmp_path):
    r = apply_overrides(Recipe(), NON_DEFAULT)
    assert from_dict(json.loads(json.dumps({"name": "x", **to_dict(r)}))) == r
    checkpoint.save(tmp_path / "x.pt", {"recipe": to_dict(r), "model": {}})
    assert from_dict(checkpoint.torch_load(tmp_path / "x.pt")["recipe"]) == r


# ---- the tutorial's fields

TUTORIAL_SETTINGS = ["head.margin_grad=straight_through", "head.eval_logits=cosine", "optim.decay_groups=tutorial",
                     "train.tf32=conv", "distill.teacher_margin=true", "distill.teacher_bn=train",
                     "model.init_from=runs/x", "loss.scales=32,64"]


def test_new_fields_convert_and_round_trip_through_recipe_json():
    r = apply_overrides(Recipe(), TUTORIAL_SETTINGS)
    assert (r.head.margin_grad, r.head.eval_logits, r.optim.decay_groups, r.train.tf32) == \
        ("straight_through", "cosine", "tutorial", "conv")
    assert (r.distill.teacher_margin, r.distill.teacher_bn, r.model.init_from, r.loss.scales) == \
        (True, "train", "runs/x", (32, 64))
    back = from_dict(json.loads(json.dumps({"name": "x", **to_dict(r)})))
    assert back == r and isinstance(back.loss.scales, tuple)
    for item in TUTORIAL_SETTINGS:  # each one differs from the default, so the round trip really carried it
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


# ---- runs and recipe.json files written before these fields existed


def test_an_old_run_evaluates_resumes_and_reports(old_run, store_dir, tmp_path):
    ev = T.evaluate_checkpoint(str(old_run), data_dir=store_dir, batch_size=100, device="cpu")
    assert (ev["weights"], ev["tta"]) == ("raw", "none") and ev["acc"] == pytest.approx(metrics(old_run)[0]["test_acc"])
    code, out, err = cli("eval", old_run, "--data-dir", store_dir, "--device", "cpu", "--tta", "flip")
    assert code == 0 and "raw weights, TTA flip" in out, err
    # files fastcifar cannot prove it wrote there (an older run has no manifest, owned.py; these were rewritten)
    # are not replaced: it continues into a new directory, the old run only read
    code, out, err = cli("train", "--resume", old_run, "--set", "train.epochs=2")
    assert code == 2 and one_paragraph(err) and "--out NEW_DIR" in err.replace("\n", " "), err
    code, out, err = cli("train", "--resume", old_run, "--set", "train.epochs=2", "--out",
                         tmp_path / "continued")
    assert code == 0, err
    s = json.loads((tmp_path / "continued" / "summary.json").read_text())
    assert s["finished"] and s["epochs_done"] == 2 and (s["select_on"], s["tta"]) == ("raw", "none")
    assert "test_acc_ema" not in metrics(tmp_path / "continued")[1]
    table, _ = report([old_run], tmp_path / "report")
    assert "tiny" in table
    shutil.rmtree(tmp_path / "report")
