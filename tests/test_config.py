"""Recipes as typed config: overrides are type-checked, unknown keys list the valid ones, typos
fail, recipe files load by name or path, derived recipes record their parent, bad input exits 2."""

import re
import textwrap
from pathlib import Path

import pytest

from fastcifar.config import (Recipe, apply_overrides, from_dict, load, recipe_dirs, to_dict, valid_keys)
from fastcifar.errors import BadInput
from helpers import cli, one_paragraph

REQUIRED_KEYS = ["train.epochs", "train.seed", "train.compile", "train.amp", "train.deterministic",
                 "data.batch_size", "data.backend", "data.val_split", "optim.lr", "optim.weight_decay"]


def test_required_keys_exist():
    assert set(REQUIRED_KEYS) <= set(valid_keys())


def test_overrides_convert_to_the_field_type():
    r = apply_overrides(Recipe(), ["train.epochs=7", "optim.lr=3e-4", "train.deterministic=true",
                                   "train.compile=false", "data.backend=torch", "optim.betas=0.8,0.99",
                                   "schedule.milestones=[0.5, 0.75]", "aug.rrc_scale=0.35,1", "train.amp=bf16"])
    assert r.train.epochs == 7 and isinstance(r.train.epochs, int)
    assert r.optim.lr == 3e-4 and r.train.deterministic is True and r.train.compile is False
    assert r.optim.betas == (0.8, 0.99) and r.schedule.milestones == (0.5, 0.75)
    assert r.aug.rrc_scale == (0.35, 1.0) and r.train.amp == "bf16"
    assert apply_overrides(r, ["train.compile=auto", "aug.rrc_scale=none"]).train.compile is None
    assert r.aug.rrc_scale is None


@pytest.mark.parametrize("item, expected", [
    ("train.epochs=abc", "expects an int"), ("train.epochs=1.5", "expects an int"),
    ("optim.lr=fast", "expects a float"), ("train.deterministic=maybe", "expects a bool"),
    ("optim.betas=0.9", r"2 comma-separated values \(a float, a float\)"),
])
def test_wrong_type_names_the_expected_one(item, expected):
    with pytest.raises(BadInput, match=expected):
        apply_overrides(Recipe(), [item])


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(BadInput) as e:
        apply_overrides(Recipe(), ["train.epoch=3"])
    assert "train.epochs" in str(e.value) and "train.seed" in str(e.value)
    with pytest.raises(BadInput) as e:
        apply_overrides(Recipe(), ["trian.epochs=3"])
    assert all(k in str(e.value) for k in REQUIRED_KEYS)
    with pytest.raises(BadInput, match="section.field=VALUE"):
        apply_overrides(Recipe(), ["epochs=3"])


def test_typo_in_a_recipe_fails():
    r = Recipe()
    with pytest.raises(AttributeError):
        r.train.epoch = 3  # slots: no new attributes


def test_validate_names_the_bad_field():
    for item, field in [("head.kind=softmax", "head.kind"), ("data.val_split=1.5", "data.val_split"),
                        ("schedule.kind=linear", "schedule.kind"), ("aug.hflip=2", "aug.hflip")]:
        with pytest.raises(BadInput, match=field.replace(".", r"\.")):
            apply_overrides(Recipe(), [item]).validate()


def test_round_trip_through_dict():
    r = apply_overrides(Recipe(), ["optim.betas=0.8,0.9", "schedule.milestones=0.3,0.6", "train.compile=true"])
    d = to_dict(r)
    import json
    back = from_dict(json.loads(json.dumps({"name": "x", **d})))
    assert back == r and isinstance(back.optim.betas, tuple)


def test_load_by_name_and_path_and_parent():
    r, info = load("r18_lbsmooth")
    assert info["name"] == "r18_lbsmooth" and info["parent"] == "r18_baseline"
    assert "44.81%" in info["description"] and r.loss.label_smoothing == 0.1
    base, binfo = load("recipes/r18_baseline.py")
    assert "parent" not in binfo and base.loss.label_smoothing == 0.0
    assert r.optim == base.optim  # the rest is inherited


def test_bad_recipe_references(tmp_path):
    with pytest.raises(BadInput, match="No recipe named 'r18_basline'.*r18_baseline"):
        load("r18_basline")
    with pytest.raises(BadInput, match="does not exist"):
        load(str(tmp_path / "missing.py"))
    (tmp_path / "norecipe.py").write_text('"""Nothing."""\nx = 1\n')
    with pytest.raises(BadInput, match="defines no recipe"):
        load(str(tmp_path / "norecipe.py"))
    (tmp_path / "broken.py").write_text("def recipe(:\n")
    with pytest.raises(BadInput, match="SyntaxError"):
        load(str(tmp_path / "broken.py"))
    (tmp_path / "wrong.py").write_text("def recipe():\n    return {'train': {}}\n")
    with pytest.raises(BadInput, match="not a fastcifar.config.Recipe"):
        load(str(tmp_path / "wrong.py"))


@pytest.mark.parametrize("args, message", [
    (("train", "no_such_recipe"), "No recipe named"),
    (("train", "smoke", "--set", "train.epoch=2"), "valid keys of train"),
    (("train", "smoke", "--set", "train.epochs=two"), "expects an int"),
    (("train", "recipes/nope.py"), "does not exist"),
    (("train",), "Name a recipe"),
])
def test_cli_bad_input_exits_2_with_one_paragraph(args, message):
    code, _, err = cli(*args)
    assert code == 2
    assert message in err.replace("\n", " ") and one_paragraph(err), err


def test_cli_recipes_lists_names_and_docstrings():
    code, out, _ = cli("recipes")
    assert code == 0
    lines = {l.split()[0]: l for l in out.splitlines() if l}
    assert "smoke" in lines and "r18_baseline" in lines and "44.26%" in lines["r18_baseline"]


def _recipe_file(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'"""{path.stem}, written by the test."""\nfrom fastcifar.config import derive\n\n'
                    f"def recipe():\n{textwrap.indent(textwrap.dedent(body), '    ')}")


def test_own_recipes_come_first_and_may_extend_the_installed_ones(tmp_path, monkeypatch):
    installed = Path(__file__).resolve().parent.parent / "recipes"  # a checkout's recipes are the installed ones
    monkeypatch.chdir(tmp_path)
    _recipe_file(tmp_path / "recipes" / "smoke.py", 'r = derive("smoke")\nr.train.epochs = 1\nreturn r\n')
    _recipe_file(tmp_path / "recipes" / "mine.py", 'return derive("r18_lbsmooth")\n')
    (tmp_path / "r18_baseline").write_text("not a recipe")  # a bare name is a name, even beside a file of that name
    assert {k: v.resolve() for k, v in recipe_dirs().items()} == {"./recipes": tmp_path / "recipes", "installed": installed}

    r, info = load("smoke")   # ./recipes/smoke.py, which extends the installed smoke it shadows
    assert (r.train.epochs, info["path"], info["parent"]) == (1, "recipes/smoke.py", "smoke")
    assert r.model.name == load(str(installed / "smoke.py"))[0].model.name == "test_resnet"
    assert load(str(installed / "smoke.py"))[0].train.epochs == 4   # a path is used as it is
    r, info = load("mine")    # an own recipe deriving an installed one, which derives another installed one
    assert info["parent"] == "r18_lbsmooth" and r.loss.label_smoothing == 0.1 and r.optim.lr == 1e-3
    assert Path(load("r18_baseline")[1]["path"]) == installed / "r18_baseline.py"

    code, out, _ = cli("recipes")
    assert code == 0
    rows = {cols[0]: cols[1] for cols in map(str.split, out.splitlines()) if len(cols) > 1}
    assert (rows["NAME"], rows["smoke"], rows["mine"], rows["r18_baseline"]) == ("FROM", "./recipes*", "./recipes", "installed")
    footer = {cols[0]: cols[1] for cols in map(str.split, out.splitlines()) if cols and cols[0].endswith(":")}
    assert footer == {"./recipes:": str(tmp_path / "recipes"), "installed:": str(installed)}
    assert "* shadows the installed recipe" in out


def test_recipes_deriving_in_a_cycle_or_from_nothing_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _recipe_file(tmp_path / "recipes" / "a.py", 'return derive("b")\n')
    _recipe_file(tmp_path / "recipes" / "b.py", 'return derive("a")\n')
    _recipe_file(tmp_path / "recipes" / "solo.py", 'return derive("solo")\n')
    with pytest.raises(BadInput, match="cycle: a -> b -> a"):
        load("a")
    with pytest.raises(BadInput, match="derives from 'solo', its own name, and no other recipe is named 'solo'"):
        load("solo")
    with pytest.raises(BadInput, match=r"No recipe named 'nope'.*looked in ./recipes \(.*\) and installed \("):
        load("nope")
    code, _, err = cli("train", "a")
    assert code == 2 and "cycle" in err and "Traceback" not in err


# each recipe range, refused just past its bound and accepted at it: a loosened or dropped check
# would let the value into a run, where it fails late (an empty split, a NaN loss) or means nothing
RECIPE_BOUNDS = [
    ("data.batch_size", "0", "1", "at least 1"), ("data.val_split", "1.0", "0.0", r"\[0, 1\)"),
    ("data.subset", "0.0", "1.0", r"\(0, 1\]"), ("data.test_subset", "1.5", "1.0", r"\(0, 1\]"),
    ("model.drop_rate", "1.0", "0.0", r"\[0, 1\)"), ("head.embed_dim", "0", "1", "at least 1"),
    ("head.s", "0", "0.5", "> 0"), ("loss.label_smoothing", "1.0", "0.0", r"\[0, 1\)"),
    ("loss.scales", "32", "32,64", "two or more"), ("loss.scales", "32,32", "8,1024", "different"),
    ("loss.scales", "4,32", "8,32", "at least 8 px"), ("distill.alpha", "1.01", "1.0", r"\[0, 1\]"),
    ("distill.temperature", "0", "0.1", "> 0"), ("optim.lr", "0", "1e-9", "> 0"),
    ("optim.weight_decay", "-0.1", "0", ">= 0"), ("optim.grad_clip", "-1", "0", ">= 0"),
    ("optim.lr_ref_batch", "-1", "0", ">= 0"), ("schedule.warmup", "1.0", "0.0", r"\[0, 1\)"),
    ("schedule.milestones", "0.75,0.5", "0.5,0.75", "increasing"), ("schedule.milestones", "0.5,1.0", "0.5,0.99", r"\(0, 1\)"),
    ("schedule.gamma", "0", "0.01", "> 0"), ("schedule.final_lr", "1.1", "1.0", r"\[0, 1\]"),
    ("train.epochs", "0", "1", "at least 1"), ("train.log_every", "0", "1", "at least 1"),
    ("train.ema_every", "0", "1", "at least 1"), ("train.seed", str(2 ** 32), str(2 ** 32 - 1), "2\\*\\*32"),
    ("train.target_acc", "100.5", "100", r"\[0, 100\]"),
]


@pytest.mark.parametrize("key,bad,good,says", RECIPE_BOUNDS, ids=[f"{k}={b}" for k, b, _, _ in RECIPE_BOUNDS])
def test_each_recipe_range_is_refused_past_its_bound_and_taken_at_it(key, bad, good, says):
    with pytest.raises(BadInput, match=re.escape(key) + f" = .*{says}"):
        apply_overrides(Recipe(), [f"{key}={bad}"]).validate()
    apply_overrides(Recipe(), [f"{key}={good}"]).validate()


def test_arcface_margin_range_and_the_cross_section_checks():
    """head.m is an angle only for ArcFace ([0, pi/2]); a margin head cannot take MixUp's soft
    targets; multi-scale training and distillation are two objectives."""
    arc = ["head.kind=arcface"]
    with pytest.raises(BadInput, match=r"head\.m = 1\.6: is ArcFace's angular margin"):
        apply_overrides(Recipe(), [*arc, "head.m=1.6"]).validate()
    with pytest.raises(BadInput, match=r"head\.m = -0\.1"):
        apply_overrides(Recipe(), [*arc, "head.m=-0.1"]).validate()
    apply_overrides(Recipe(), [*arc, "head.m=1.57"]).validate()
    apply_overrides(Recipe(), ["head.kind=cosface", "head.m=2.0"]).validate()  # a cosine margin: no angle range
    for mix in ("aug.mixup_alpha=0.2", "aug.cutmix_alpha=1.0"):
        with pytest.raises(BadInput, match="a margin head needs hard labels"):
            apply_overrides(Recipe(), [*arc, mix]).validate()
        apply_overrides(Recipe(), [mix]).validate()  # a linear head takes soft targets
    with pytest.raises(BadInput, match="are two objectives"):
        apply_overrides(Recipe(), ["loss.scales=32,64", "distill.teacher=some_run"]).validate()


def test_amp_is_auto_by_default_and_reduced_precision_images_need_autocast():
    """train.amp defaults to auto (the device's native precision); aug.dtype bfloat16/float16 hands
    the model images that only an autocast step takes, so with train.amp=none it is refused before
    anything runs (with auto, a machine that trains in fp32 reads float32 images: test_train_resume)."""
    assert Recipe().train.amp == "auto"
    apply_overrides(Recipe(), ["train.amp=auto", "aug.dtype=bfloat16"]).validate()
    apply_overrides(Recipe(), ["train.amp=fp16", "aug.dtype=bfloat16"]).validate()
    apply_overrides(Recipe(), ["train.amp=none", "aug.dtype=float32"]).validate()
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(BadInput, match=f"aug.dtype = '{dtype}' hands the model {dtype} images, but train.amp = none"):
            apply_overrides(Recipe(), ["train.amp=none", f"aug.dtype={dtype}"]).validate()
    with pytest.raises(BadInput, match="train.amp = 'fp8': must be one of auto, none, bf16, fp16"):
        apply_overrides(Recipe(), ["train.amp=fp8"]).validate()
