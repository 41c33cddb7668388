"""What a run is, as typed data: a `Recipe` of nine sections, two levels deep, that a recipe file
builds (`recipe() -> Recipe`) and the CLI overrides with `--set section.field=VALUE`. Recipes hold
epochs and fractions, never step counts: `fastcifar.train` derives the steps from the data, the batch
size and the ranks, so a derived recipe or an override of `train.epochs` leaves no stale count behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import math
import os
import re
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fastcifar import jsonio
from fastcifar.averaging import TTA
from fastcifar.data import DATASETS
from fastcifar.errors import BadInput, shown, why
from fastcifar.heads import EVAL_LOGITS, HEADS, MARGIN_GRADS
from fastcifar.optim import DECAY_GROUPS, LR_SCALING, OPTIMIZERS, SCHEDULES
from fastcifar.pipelines.loader import BACKENDS
from fastcifar.pipelines.spec import MAX_SIDE, AugSpec
from fastcifar.runtime import AMP_CHOICES, TF32

def _check(section: str, obj, rules) -> None:
    """Raise BadInput naming the first field of `obj` whose (field, ok(value) -> bool, rule) triple fails."""
    for name, ok, rule in rules:
        value = getattr(obj, name)
        if not ok(value):
            raise BadInput(f"{section}.{name} = {shown(value)}: {rule}.")


def _one_of(options) -> tuple:
    options = tuple(options)
    return (lambda v: v in options), f"must be one of {', '.join(options)}"


@dataclass(slots=True)
class Data:
    dataset: str = "cifar100"    # cifar100 | cifar10: the store it trains on (its default dir, its classes)
    batch_size: int = 250        # images per optimizer step, all ranks together (global batch)
    backend: str = "auto"        # loader backend: auto | dali | torch | tutorial
    val_split: float = 0.0       # fraction of train held out for model selection (0 = select on test)
    shuffle: bool = True         # shuffle the training order each epoch (the tutorial did not)
    drop_last: bool = True       # drop the last partial training batch (the tutorial kept it)
    subset: float = 1.0          # fraction of the train split used (a fixed random subset)
    test_subset: float = 1.0     # fraction of the test split evaluated (a fixed random subset)

    def validate(self):
        _check("data", self, [
            ("dataset", *_one_of(DATASETS)),
            ("backend", *_one_of(BACKENDS)),
            ("batch_size", lambda v: v >= 1, "must be at least 1"),
            ("val_split", lambda v: 0.0 <= v < 1.0, "is a fraction of the train split and must lie in [0, 1)"),
            ("subset", lambda v: 0.0 < v <= 1.0, "is a fraction and must lie in (0, 1]"),
            ("test_subset", lambda v: 0.0 < v <= 1.0, "is a fraction and must lie in (0, 1]"),
        ])


@dataclass(slots=True)
class Model:
    name: str = "resnet18"       # any timm model name (timm.list_models())
    pretrained: bool = False     # ImageNet weights from timm's hub (needs internet)
    pretrained_file: str = ""    # or a local state-dict file (timm or fastcifar checkpoint)
    cifar_stem: bool = False     # 3x3 stride-1 first conv and no max-pool: keeps 32x32 detail
    drop_rate: float = 0.0       # dropout before the head
    drop_path: float = 0.0       # stochastic depth: timm's drop_path_rate (the last block's drop probability)
    sync_bn: bool = False        # under DDP: BatchNorm statistics over the global batch (SyncBatchNorm)
    channels_last: bool = True   # NHWC memory layout: faster convolutions on tensor cores
    init_from: str = ""          # weights only from a run dir, checkpoint or recipe name (docs/overrides.md)

    def validate(self):
        _check("model", self, [
            ("drop_rate", lambda v: 0.0 <= v < 1.0, "is a probability and must lie in [0, 1)"),
            ("drop_path", lambda v: 0.0 <= v < 1.0, "is a probability and must lie in [0, 1) (0 = off)"),
        ])


@dataclass(slots=True)
class Head:
    kind: str = "linear"         # linear | arcface | cosface
    s: float = 64.0              # margin heads: logit scale (cosine * s)
    m: float = 0.5               # margin heads: angular (arcface, radians) or cosine (cosface) margin
    embed_dim: int = 512         # margin heads: Linear -> BatchNorm1d embedding size
    margin_grad: str = "exact"   # margin heads, the target logit's gradient: exact | straight_through
    eval_logits: str = "scaled"  # margin heads, evaluation: scaled (s * cos) | cosine (the tutorial's)

    def validate(self):
        _check("head", self, [
            ("kind", *_one_of(HEADS)),
            ("s", lambda v: v > 0, "must be a finite number > 0"),  # Recipe.validate checked finiteness
            ("m", lambda v: self.kind != "arcface" or 0.0 <= v <= math.pi / 2,
             "is ArcFace's angular margin in radians and must lie in [0, pi/2] (past that, cos(theta + m) "
             "stops falling as theta grows)"),
            ("embed_dim", lambda v: v >= 1, "must be at least 1"),
            ("margin_grad", *_one_of(MARGIN_GRADS)),
            ("eval_logits", *_one_of(EVAL_LOGITS)),
        ])


@dataclass(slots=True)
class Loss:
    label_smoothing: float = 0.0  # probability mass spread over all classes
    scales: tuple[int, ...] = ()  # multi-scale training: each image at one of these sides (drawn); () = off

    def validate(self):
        _check("loss", self, [
            ("label_smoothing", lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)"),
            ("scales", lambda v: not v or (len(v) >= 2 and len(set(v)) == len(v) and 8 <= min(v) and max(v) <= MAX_SIDE),
             f"must be () (off) or two or more different image sides of at least 8 px and at most {MAX_SIDE} px, "
             f"e.g. 32,64"),
        ])


@dataclass(slots=True)
class Distill:
    teacher: str = ""            # run dir, checkpoint file, or recipe name (newest runs/<name>-*); "" = off
    alpha: float = 0.7           # weight of the KD term: (1 - alpha) * CE + alpha * T^2 * KL
    temperature: float = 4.0     # softmax temperature T of both teacher and student
    teacher_margin: bool = False  # a margin-head teacher's logits get its margin on the label (tutorial)
    teacher_bn: str = "eval"     # the teacher's BatchNorm statistics: eval (running) | train (tutorial)

    def validate(self):
        _check("distill", self, [
            ("alpha", lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
            ("temperature", lambda v: v > 0, "must be a finite number > 0"),
            ("teacher_bn", *_one_of(("eval", "train"))),
        ])


@dataclass(slots=True)
class Optim:
    name: str = "adamw"          # adamw | sgd
    lr: float = 1e-3             # peak learning rate for a batch of data.batch_size (see lr_ref_batch)
    weight_decay: float = 1e-4
    decay_groups: str = "no_bias_norm"  # which parameters decay: no_bias_norm | tutorial | all (optim.py)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    momentum: float = 0.9        # SGD
    nesterov: bool = False       # SGD
    grad_clip: float = 0.0       # max global gradient norm; 0 = off
    lr_ref_batch: int = 0        # > 0: `lr` is for this many images and scales to data.batch_size
    lr_scaling: str = "linear"   # how it scales: linear (SGD) | sqrt (often better for Adam)

    def validate(self):
        _check("optim", self, [
            ("name", *_one_of(OPTIMIZERS)),
            ("decay_groups", *_one_of(DECAY_GROUPS)),
            ("lr_scaling", *_one_of(LR_SCALING)),
            ("lr", lambda v: v > 0, "must be > 0"),
            ("weight_decay", lambda v: v >= 0, "must be >= 0"),
            ("grad_clip", lambda v: v >= 0, "must be >= 0 (0 = off)"),
            ("lr_ref_batch", lambda v: v >= 0, "must be >= 0 (0 = lr as given)"),
        ])


@dataclass(slots=True)
class Schedule:
    kind: str = "constant"       # constant | step | cosine | onecycle (linear up, linear down)
    warmup: float = 0.0          # fraction of all steps spent ramping linearly up to the peak LR
    milestones: tuple[float, ...] = ()  # step: fractions of training where the LR is multiplied by gamma
    gamma: float = 0.1           # step: factor at each milestone
    final_lr: float = 0.0        # cosine/onecycle: last LR as a fraction of the peak

    def validate(self):
        _check("schedule", self, [
            ("kind", *_one_of(SCHEDULES)),
            ("warmup", lambda v: 0.0 <= v < 1.0, "is a fraction of all steps and must lie in [0, 1)"),
            ("milestones", lambda v: all(0.0 < m < 1.0 for m in v) and list(v) == sorted(v),
             "must be increasing fractions of training, each in (0, 1)"),
            ("gamma", lambda v: v > 0, "must be > 0"),
            ("final_lr", lambda v: 0.0 <= v <= 1.0, "is a fraction of the peak LR and must lie in [0, 1]"),
        ])


@dataclass(slots=True)
class Train:
    epochs: int = 200
    seed: int = 0                # model init, data order, augmentation draws, mixing
    compile: bool | None = None  # torch.compile; None = on when CUDA, off on a CPU
    amp: str = "auto"            # auto (what the device runs natively) | none | bf16 | fp16 (+ GradScaler)
    tf32: str = "on"             # fp32 as TF32 (10-bit mantissa): on (conv, matmul) | conv (PyTorch's) | off
    deterministic: bool = False  # deterministic kernels (slower); resumed runs match straight ones
    device: str = "auto"         # auto (cuda:<local rank> when present, else cpu) | cpu | cuda
    log_every: int = 50          # steps between progress updates (the only host syncs in training)
    target_acc: float = 0.0      # top-1 percent (val when held out, else test) whose first epoch summary.json times; 0 = off
    stop_at_target: bool = False  # end the run (finished) at the first epoch that reaches target_acc
    ema_decay: float = 0.0       # EMA of the weights: decay per optimizer step (0 = off; 0.999 ~ 1000 steps)
    ema_every: int = 1           # optimizer steps between EMA updates (each uses decay**ema_every)
    ema_warmup: bool = True      # decay min(ema_decay, (1 + step) / (10 + step)): forget the init early
    select_on: str = "raw"       # best.pt's epoch is chosen on the raw or the EMA weights' accuracy
    tta: str = "none"            # evaluation: none | flip (logits averaged with the mirrored image's)

    def validate(self):
        _check("train", self, [
            ("ema_decay", lambda v: 0.0 <= v < 1.0, "must lie in [0, 1) (0 = no EMA; 0.999 averages ~1000 steps)"),
            ("ema_every", lambda v: v >= 1, "must be at least 1 (optimizer steps between EMA updates)"),
            ("select_on", *_one_of(("raw", "ema"))),
            ("select_on", lambda v: v == "raw" or self.ema_decay > 0,
             "selects on the EMA weights, but train.ema_decay = 0 keeps none; set train.ema_decay (e.g. 0.999)"),
            ("tta", *_one_of(TTA)),
            ("amp", *_one_of(AMP_CHOICES)),
            ("tf32", *_one_of(TF32)),
            ("epochs", lambda v: v >= 1, "must be at least 1"),
            ("seed", lambda v: 0 <= v < 2 ** 32, "must lie in 0 .. 2**32 - 1 (numpy and torch seeds are unsigned)"),
            ("log_every", lambda v: v >= 1, "must be at least 1"),
            ("device", lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None,
             "must be auto, cpu, cuda or cuda:N"),
            ("target_acc", lambda v: 0.0 <= v <= 100.0, "is a top-1 accuracy in percent and must lie in [0, 100] (0 = off)"),
            ("stop_at_target", lambda v: not v or self.target_acc > 0,
             "needs a target: set train.target_acc to the accuracy (percent) to stop at"),
        ])


@dataclass(slots=True)
class Recipe:
    data: Data = field(default_factory=Data)
    aug: AugSpec = field(default_factory=AugSpec)
    model: Model = field(default_factory=Model)
    head: Head = field(default_factory=Head)
    loss: Loss = field(default_factory=Loss)
    distill: Distill = field(default_factory=Distill)
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    train: Train = field(default_factory=Train)

    def validate(self) -> "Recipe":
        """Raise BadInput naming the first field of a wrong type, not finite, out of range or unknown."""
        check_types(self)
        for section in SECTIONS:
            obj = getattr(self, section)
            for name, v in dataclasses.asdict(obj).items():
                values = v if isinstance(v, tuple) else (v,)
                if any(isinstance(x, float) and not math.isfinite(x) for x in values):
                    raise BadInput(f"{section}.{name} = {shown(v)}: must be a finite number.")
            obj.validate()
        if self.head.kind != "linear" and (self.aug.mixup_alpha > 0 or self.aug.cutmix_alpha > 0):
            raise BadInput(f"head.kind = {shown(self.head.kind)}: a margin head needs hard labels, but MixUp/CutMix give "
                           f"soft targets; use head.kind=linear or set aug.mixup_alpha and aug.cutmix_alpha to 0.")
        if self.aug.dtype != "float32" and self.train.amp == "none":
            raise BadInput(f"aug.dtype = {shown(self.aug.dtype)} hands the model {self.aug.dtype} images, but train.amp = "
                           f"none runs it in fp32, which refuses them; set train.amp=auto (or bf16, fp16) or "
                           f"aug.dtype=float32.")
        if self.loss.scales and self.distill.teacher:
            raise BadInput(f"loss.scales = {shown(self.loss.scales)} (multi-scale training) and distill.teacher = "
                           f"{shown(self.distill.teacher)} (distillation) are two objectives; set loss.scales=() or "
                           f"distill.teacher=''.")
        return self


SECTIONS = typing.get_type_hints(Recipe)  # {section: its dataclass}, in order


def check_types(r: Recipe) -> None:
    """Raise BadInput naming the first field a recipe set to a value of the wrong type (a recipe is
    Python: `r.train.epochs = "10"` must not reach the trainer); ints become floats, lists tuples."""
    for section, cls in SECTIONS.items():
        obj = getattr(r, section)
        if not isinstance(obj, cls):
            raise BadInput(f"recipe section {section} was replaced by a {type(obj).__name__}; it must stay a "
                           f"{cls.__name__} (change its fields instead).")
        for name, t in typing.get_type_hints(cls).items():
            value = getattr(obj, name)
            try:
                setattr(obj, name, _as(value, t, parse=False))
            except _Wrong:
                raise BadInput(f"{section}.{name} = {shown(value)}: expected {_type_name(t)}, got a "
                               f"{type(value).__name__}.")


def valid_keys() -> list[str]:
    """Every `section.field` key that --set accepts."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------------------------
# Values from strings (--set) and from JSON (recipe.json, checkpoints), checked against the types


def _type_name(t) -> str:
    if t is type(None):
        return "none"
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is tuple:
        args = typing.get_args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {_type_name(args[0])}"
        return f"{len(args)} comma-separated values ({', '.join(_type_name(a) for a in args)})"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(t, str(t))


class _Wrong(Exception):
    pass


BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _as(value, t, parse: bool):
    """value as type t, or _Wrong. parse: text to parse (--set; JSON's numbers come as numbers); else it
    must be one already (a recipe's Python), but an int may stand for a float and a list for a tuple."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        if value is None or parse and isinstance(value, str) and value.lower() in ("none", "null", "auto"):
            if type(None) in typing.get_args(t):
                return None
        for a in typing.get_args(t):
            if a is not type(None):
                with contextlib.suppress(_Wrong):
                    return _as(value, a, parse)
        raise _Wrong
    if origin is tuple:
        if parse and isinstance(value, str):
            text = value.strip()
            try:  # JSON (a list nested deeper than any field's type is refused there), or comma-separated
                value = jsonio.loads(text, "the list") if text.startswith("[") else \
                    [v.strip() for v in text.strip("()").split(",") if v.strip()]
            except BadInput:
                raise _Wrong
        if not isinstance(value, (list, tuple)):
            raise _Wrong
        args = typing.get_args(t)
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        if len(value) != len(kinds):
            raise _Wrong
        return tuple(_as(v, k, parse) for v, k in zip(value, kinds))
    if t in (bool, str) and isinstance(value, t):
        return value
    if t is bool and parse and isinstance(value, str) and value.lower() in BOOLS:
        return BOOLS[value.lower()]
    if t in (int, float) and not isinstance(value, bool):  # a bool is an int to Python, never a number here
        with contextlib.suppress(ValueError, OverflowError):
            if isinstance(value, int) or t is float and isinstance(value, float):
                return t(value)
            if parse and isinstance(value, str):
                return int(value.replace("_", "")) if t is int else float(value)
    raise _Wrong


def _field_type(section: str, name: str):
    cls = SECTIONS.get(section)
    if cls is None:
        raise BadInput(f"Unknown recipe section {shown(section)}; the sections are {', '.join(SECTIONS)}. "
                       f"Valid keys: {', '.join(valid_keys())}.")
    hints = typing.get_type_hints(cls)
    if name not in hints or name.startswith("_"):
        keys = [k for k in valid_keys() if k.startswith(section + ".")]
        raise BadInput(f"Unknown key {section}.{name}; valid keys of {section} are: {', '.join(keys)}.")
    return hints[name]


def apply_overrides(r: Recipe, overrides: list[str]) -> Recipe:
    """Apply `section.field=VALUE` strings in order, converting VALUE to the field's type."""
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key.count(".") != 1:
            raise BadInput(f"--set {shown(item)}: write section.field=VALUE, e.g. train.epochs=30. "
                           f"Valid keys: {', '.join(valid_keys())}.")
        section, name = key.split(".")
        t = _field_type(section, name)
        try:
            v = _as(value, t, parse=True)
        except _Wrong:
            raise BadInput(f"--set {key}={shown(value)}: {key} expects {_type_name(t)}.")
        setattr(getattr(r, section), name, v)
    return r


def to_dict(r: Recipe) -> dict:
    """The recipe as plain JSON-able data (tuples become lists)."""
    return dataclasses.asdict(r)


def from_dict(d: dict) -> Recipe:
    """A Recipe from to_dict()'s output (recipe.json, a checkpoint), type-checked field by field."""
    if not isinstance(d, dict):
        raise BadInput(f"A stored recipe must be a mapping of sections, got a {type(d).__name__}.")
    r = Recipe()
    for section, fields in d.items():
        if section not in SECTIONS:
            continue  # run metadata stored beside the sections: name, description, parent
        if not isinstance(fields, dict):
            raise BadInput(f"recipe section {shown(section)} must be a mapping, got {type(fields).__name__}.")
        for name, value in fields.items():
            t = _field_type(section, name)
            try:
                setattr(getattr(r, section), name, _as(value, t, parse=True))
            except _Wrong:
                raise BadInput(f"recipe field {section}.{name} = {shown(value)}: expected {_type_name(t)}.")
    return r


# ----------------------------------------------------------------------------------------------
# Recipe files. RECIPE is a path when it ends in .py or holds a /; otherwise a name, looked up in
# ./recipes/NAME.py (the user's own), then in the recipes installed with fastcifar.


def installed_recipes_dir() -> Path:
    """The recipes that ship with fastcifar: fastcifar/recipes/ in a wheel, recipes/ in a checkout."""
    here = Path(__file__).resolve().parent
    wheel = here / "recipes"  # pyproject.toml installs the top-level recipes/ as fastcifar/recipes/
    return wheel if wheel.is_dir() else here.parent / "recipes"  # a checkout or an editable install


def recipe_dirs() -> dict[str, Path]:
    """{label: directory} where recipe names are looked up, in order: ./recipes, then the installed ones."""
    dirs: dict[str, Path] = {}
    for label, d in (("./recipes", Path("recipes")), ("installed", installed_recipes_dir())):
        if d.is_dir() and all(d.resolve() != o.resolve() for o in dirs.values()):
            dirs[label] = d
    return dirs


def recipe_sources() -> dict[str, list[tuple[str, Path]]]:
    """{name: [(label, path), ...]} for every recipe name, sorted; the first source is the one used."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for label, d in recipe_dirs().items():
        for p in sorted(d.glob("*.py")):
            if not p.name.startswith("_") and p.is_file():
                found.setdefault(p.stem, []).append((label, p))
    return dict(sorted(found.items()))


def available() -> dict[str, Path]:
    """{name: path} of every recipe a name finds (./recipes shadows an installed recipe of the same name)."""
    return {name: sources[0][1] for name, sources in recipe_sources().items()}


def _is_path(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or Path(ref).name != ref


def find(ref: str) -> Path:
    """The recipe file for a path or a name."""
    if not ref.strip():
        raise BadInput("The recipe name is empty: name a recipe (`fastcifar recipes` lists them) or give a path.")
    if _is_path(ref):
        p = Path(ref)
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "is not a regular file" if p.exists() else "does not exist"
            raise BadInput(f"Recipe file {ref} {what}; give a recipe file (a .py defining recipe()) or a recipe name.")
        return p
    recipes = available()
    if ref not in recipes:
        near = [n for n in recipes if ref.lower() in n.lower() or n.lower() in ref.lower()]
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        where = " and ".join(f"{label} ({d.resolve()})" for label, d in recipe_dirs().items()) or "no recipe directory"
        raise BadInput(f"No recipe named {shown(ref)}.{hint} Known recipes: {', '.join(recipes) or 'none'} "
                       f"(looked in {where}; run `fastcifar recipes`), or give a path to a recipe file.")
    return recipes[ref]


# The recipe files being loaded, outermost first, each with the names its recipe() derived from.
_loading: list[tuple[Path, list[str]]] = []


def derive(name: str) -> Recipe:
    """The named recipe, for a derived recipe to change: `r = derive("r18_baseline")`. A recipe deriving
    its own name extends the one it shadows (./recipes/smoke.py's derive("smoke"): the installed smoke)."""
    if _loading:
        _loading[-1][1].append(name)
    return load(name)[0]


def _resolve(ref: str) -> Path:
    """find(ref), except that a recipe deriving its own name gets the next recipe of that name."""
    path = find(ref)
    if not _loading or _is_path(ref):
        return path
    if path.resolve() == _loading[-1][0].resolve():  # it derives its own name: take the recipe it shadows
        shadowed = [p for _, p in recipe_sources()[ref]][1:]
        if not shadowed:
            raise BadInput(f"Recipe {path} derives from {shown(ref)}, its own name, and no other recipe is named {shown(ref)} "
                           f"(see `fastcifar recipes`).")
        path = shadowed[0]
    chain = [p.resolve() for p, _ in _loading]
    if path.resolve() in chain:
        names = " -> ".join([p.stem for p, _ in _loading] + [path.stem])
        raise BadInput(f"Recipes derive from each other in a cycle: {names}.")
    return path


def _at(e: BaseException, path: Path, source: str) -> str:
    """' At FILE:LINE: the line' for the recipe's own line that raised e (its deepest frame in
    the recipe file; a SyntaxError's own line), or '' when no frame is in it."""
    own = os.path.abspath(path)  # importlib names the code by its absolute path
    line = e.lineno if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == own else None
    for frame in traceback.extract_tb(e.__traceback__):
        if os.path.abspath(frame.filename) == own:
            line = frame.lineno
    lines = source.splitlines()
    if not line or not 1 <= line <= len(lines):
        return ""
    code = lines[line - 1].strip()
    return f" At {path}:{line}: {code if len(code) <= 200 else code[:180] + ' ...'}"


def _recipe_code(call, path: Path, source: str, what: str):
    """call() the recipe's own code: any exception but Ctrl-C is its fault: BadInput naming its line."""
    try:
        return call()
    except (BadInput, KeyboardInterrupt):
        raise
    except SystemExit as e:
        raise BadInput(f"Recipe {path}: {what} called sys.exit({shown(e.code)}); a recipe only returns a Recipe.")
    except BaseException as e:
        raise BadInput(f"Recipe {path}: {what} raised {why(e)}.{_at(e, path, source)}")


def load(ref: str) -> tuple[Recipe, dict]:
    """(Recipe, info) from a recipe path or name; info = {name, description, parent, path, source}."""
    path = _resolve(ref)
    name = path.stem
    try:  # the text each run keeps as recipe.py: read once, before it runs
        source = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"Recipe {path} is not UTF-8 text (byte {e.start}); a recipe is a Python file saved as UTF-8, "
                       f"which each run keeps beside its results as recipe.py. Save it as UTF-8.")
    except OSError as e:
        raise BadInput(f"Cannot read the recipe {path} ({e.strerror or e}).")
    if path.suffix != ".py":  # importlib loads only .py files as source (and each run keeps it as recipe.py)
        raise BadInput(f"Recipe file {path} does not end in .py; a recipe is a Python file defining recipe(). "
                       f"Rename it to {path.name}.py, or give a recipe name (`fastcifar recipes` lists them).")
    spec = importlib.util.spec_from_file_location(f"fastcifar_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    _loading.append((path, []))
    try:
        _recipe_code(lambda: spec.loader.exec_module(module), path, source, "loading it")
        fn = getattr(module, "recipe", None)
        if not callable(fn):
            raise BadInput(f"Recipe {path} defines no recipe() function: `def recipe() -> Recipe`.")
        r = _recipe_code(fn, path, source, "recipe()")
        parents = _loading[-1][1]
    finally:
        _loading.pop()
    if not isinstance(r, Recipe):
        raise BadInput(f"Recipe {path}: recipe() returned a {type(r).__name__}, not a fastcifar.config.Recipe.")
    try:
        check_types(r)
    except BadInput as e:
        raise BadInput(f"Recipe {path}: {e}")
    info = {"name": name, "description": (inspect.getdoc(module) or "").strip().partition("\n")[0],
            "path": str(path), "source": source}
    return r, ({**info, "parent": parents[0]} if parents else info)
