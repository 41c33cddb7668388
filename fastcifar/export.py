"""`fastcifar export`: a checkpoint as a file other tools load (ONNX, safetensors, a timm state dict).

Every export carries a *card*, the JSON of what the weights are and what an image must look like
going in (timm model, head, class names, input size, interpolation, mean/std), inside the file (ONNX
`metadata_props`, safetensors metadata, key "fastcifar"); the timm format is a bare state dict (timm
loads it strict), its card printed with the loading code. Before it is renamed into place, each export
is loaded back and its logits compared with the network's on a few images: a failed one is never written.
"""

from __future__ import annotations

import importlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from fastcifar import __version__, checkpoint, jsonio, owned
from fastcifar.averaging import pick_weights
from fastcifar.config import Head, Model
from fastcifar.errors import BadInput, why
from fastcifar.heads import HEADS
from fastcifar.models import SCALED_LOGITS, Net, cifar_stem, net_from_checkpoint, net_from_state, num_classes
from fastcifar.pipelines.spec import INTERPOLATIONS, MAX_SIDE, AugSpec

FORMATS = ("onnx", "safetensors", "timm")
SUFFIXES = {"onnx": (".onnx",), "safetensors": (".safetensors",), "timm": (".pth", ".pt", ".bin")}
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors",), "timm": ()}
PIP = {"PIL": "pillow"}  # import name -> package name, where they differ
CARD_KEY, CARD_VERSION = "fastcifar", 1
INPUT, OUTPUT = "images", "logits"  # ONNX tensor names
N_CHECK = 8  # images the export check runs through both sides
# Largest |logit difference| an export may show, as a fraction of the largest |logit| (at least 1):
# fp32 sums reordered (fused BN, other conv algorithms) differ by ~1e-6 of it; a broken export
# (training-mode BN, a margin applied, a wrong stem) by a large fraction.
REL_TOL = 1e-3
MAX_CARD = 1 << 20  # a card is a few KB (1000 class names of 20 characters: 30 KB); a larger one is not ours


class CheckFailed(Exception):
    """The written export does not reproduce the network's logits (exit 1: a fastcifar bug, not bad input)."""


def require(fmt_or_use: str, modules) -> None:
    """BadInput naming what to install when an optional dependency is missing."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except (ImportError, OSError):
            missing.append(m)
    if missing:
        names = [PIP.get(m, m) for m in missing]
        raise BadInput(f"{fmt_or_use} needs {', '.join(names)}, not installed here: "
                       f"pip install \"fastcifar[export]\" (or pip install {' '.join(names)}).")


# ---- the network and its card -------------------------------------------------------------------

def card(ck: dict, r, where) -> dict:
    """What an export needs besides the weights: the classes and input the checkpoint records."""
    pre = ck.get("preprocess") or {}
    c = {"fastcifar_export": CARD_VERSION, "fastcifar_version": __version__,
         "model": {"name": r.model.name, "cifar_stem": r.model.cifar_stem},
         "head": {"kind": r.head.kind} if r.head.kind == "linear" else
                 {"kind": r.head.kind, "s": r.head.s, "m": r.head.m, "embed_dim": r.head.embed_dim},
         "num_classes": num_classes(ck["model"], r.head.kind, where),
         "class_names": ck.get("class_names"),  # check_card judges it
         "preprocess": {"image_size": pre.get("image_size"), "interpolation": pre.get("interpolation"),
                        "normalize": r.aug.normalize, "mean": pre.get("mean"), "std": pre.get("std"),
                        "input": "RGB, NCHW float32, (x / 255 - mean) / std"},
         "source": {"checkpoint": str(where), "recipe": ck.get("info", {}).get("name"), "epoch": ck.get("epoch")}}
    return check_card(c, where)


def check_card(c, where) -> dict:
    """c if it is a card this fastcifar can use, else BadInput saying what is wrong (cards come from files)."""
    def bad(why):
        raise BadInput(f"{where}: its record of the model's classes and preprocessing is unusable ({why}).")

    if not isinstance(c, dict) or c.get("fastcifar_export") != CARD_VERSION:
        bad(f"format version {c.get('fastcifar_export') if isinstance(c, dict) else None!r}, "
            f"this fastcifar reads {CARD_VERSION}")
    try:
        n, names, p = c["num_classes"], c["class_names"], c["preprocess"]
        if not (isinstance(names, list) and all(isinstance(s, str) for s in names) and len(names) == n):
            bad(f"{len(names) if isinstance(names, list) else 'no'} class names for {n} classes")
        # a hostile card must not make predict run the network on 4096 px inputs (gigabytes)
        if not (type(p["image_size"]) is int and 8 <= p["image_size"] <= MAX_SIDE
                and p["interpolation"] in INTERPOLATIONS):
            bad(f"input size {p['image_size']!r} (8 to {MAX_SIDE} px), interpolation {p['interpolation']!r}")
        if not all(isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in v)
                   for v in (p["mean"], p["std"])) or min(p["std"]) <= 0:
            bad(f"mean {p['mean']!r}, std {p['std']!r}")
        if not (isinstance(c["model"]["name"], str) and isinstance(c["model"]["cifar_stem"], bool)):
            bad(f"model {c['model']!r}")
        h = c["head"]
        if h["kind"] not in HEADS or not set(h) <= {"kind", "s", "m", "embed_dim"} \
                or (h["kind"] != "linear" and not (isinstance(h["embed_dim"], int) and isinstance(h["s"], (int, float)))):
            bad(f"head {h!r}")
    except (KeyError, TypeError, OverflowError) as e:  # OverflowError: an integer beyond any float
        bad(why(e))
    return c


def net_from_card(c: dict, state: dict, where) -> Net:
    """The Net an export's card and weights describe (BadInput where they disagree)."""
    n = num_classes(state, c["head"]["kind"], where)
    if n != c["num_classes"]:
        raise BadInput(f"{where}: its weights have {n} classes, but its fastcifar metadata names {c['num_classes']}; "
                       f"the file was altered after `fastcifar export`. Export the model again.")
    return net_from_state(Model(name=c["model"]["name"], cifar_stem=bool(c["model"]["cifar_stem"])),
                          Head(**c["head"]), state, where)


def preprocess(images: torch.Tensor, c: dict) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) RGB -> the model's float32 NCHW input, by the torch backend's evaluation path."""
    from fastcifar.pipelines.torch_backend import finish

    p = c["preprocess"]
    scale = torch.tensor([1 / (255 * s) for s in p["std"]]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(p["mean"], p["std"])]).view(1, 3, 1, 1)
    spec = AugSpec(image_size=p["image_size"], interpolation=p["interpolation"])
    return finish(images, p["image_size"], spec, scale, shift).contiguous()


def check_images(data_dir=None, dataset: str | None = None) -> tuple[torch.Tensor, str]:
    """N_CHECK uint8 (N, 32, 32, 3) images to compare on: the store's first test images, else seeded noise."""
    from fastcifar.data import open_store
    try:
        store = open_store(data_dir, dataset)
        return torch.from_numpy(np.array(store.images("test")[:N_CHECK])), f"{N_CHECK} store test images"
    except BadInput:
        noise = np.random.default_rng(0).integers(0, 256, (N_CHECK, 32, 32, 3), dtype=np.uint8)
        return torch.from_numpy(noise), f"{N_CHECK} noise images (no store at hand)"


def compare(ours: torch.Tensor, theirs, what: str, images: str) -> str:
    """One line on how far `theirs` logits are from `ours`; CheckFailed beyond REL_TOL."""
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float32)
    diff = (ours - theirs).abs().max().item()
    tol = REL_TOL * max(1.0, ours.abs().max().item())
    agree = int((ours.argmax(1) == theirs.argmax(1)).sum())
    line = (f"checked: {what} on {images}: max |logit difference| {diff:.2e} (tolerance {tol:.2e}), "
            f"top-1 agrees on {agree}/{len(ours)}")
    if not diff <= tol:  # also catches NaN
        raise CheckFailed(f"The export does not reproduce the model: {line}. Nothing was written.")
    return line


# ---- the three formats --------------------------------------------------------------------------

def to_onnx(net: Net, c: dict, x: torch.Tensor) -> bytes:
    """The net as ONNX bytes: `images` (batch, 3, S, S) float32 -> `logits`, the card in metadata_props."""
    size = c["preprocess"]["image_size"]
    try:
        # torch's exporter built on torch.export (the default since torch 2.9; the TorchScript one is
        # deprecated). external_data=False: one self-contained file, under ONNX's 2 GB limit.
        program = torch.onnx.export(net, (torch.zeros(2, 3, size, size),), None, dynamo=True, verbose=False,
                                    input_names=[INPUT], output_names=[OUTPUT], external_data=False,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        proto = program.model_proto
    except Exception as e:
        raise CheckFailed(f"torch.onnx.export could not export {c['model']['name']}: {why(e)}. "
                          f"Try --format safetensors.")
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(c)
    proto.doc_string = f"fastcifar export of {c['source']['checkpoint']}: {c['model']['name']} + {c['head']['kind']} head"
    if proto.ByteSize() >= 2 ** 31:
        raise BadInput(f"{c['model']['name']} is over ONNX's 2 GB single-file limit; use --format safetensors.")
    return proto.SerializeToString()


def run_onnx(model, x: torch.Tensor) -> np.ndarray:
    """Logits from an ONNX model (bytes or a path) in onnxruntime on the CPU."""
    import onnxruntime as ort

    sess = model if isinstance(model, ort.InferenceSession) else \
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def to_safetensors(net: Net, c: dict) -> bytes:
    """The Net's state dict (keys backbone.*, head.*) as safetensors bytes, the card in its metadata."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in net.state_dict().items()}, metadata={CARD_KEY: json.dumps(c)})


def read_safetensors(data) -> tuple[dict, dict]:
    """(card, state dict) of a safetensors export given as bytes or a path."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    where = data if isinstance(data, (str, Path)) else "the export"
    try:
        data = data if isinstance(data, bytes) else Path(data).read_bytes()
        state = load(data)  # checks the header, whose JSON holds the metadata
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{where} is not a readable safetensors file ({why(e)}).")
    if CARD_KEY not in meta:
        raise BadInput(f"{where} is a safetensors file without fastcifar metadata: not a `fastcifar export`.")
    return read_card(meta[CARD_KEY], where), state


def read_card(text, where) -> dict:
    """The card an export's metadata holds (JSON text), checked; BadInput naming the file otherwise."""
    if not isinstance(text, str) or len(text) > MAX_CARD:
        raise BadInput(f"{where}: its fastcifar metadata is not a card this fastcifar wrote (over "
                       f"{MAX_CARD >> 10} KB).")
    return check_card(jsonio.loads(text, f"{where}: its fastcifar metadata"), where)


def timm_model(c: dict):
    """timm.create_model(name, num_classes=N), with fastcifar's CIFAR stem when the run used one."""
    import timm

    m = timm.create_model(c["model"]["name"], num_classes=c["num_classes"])
    if c["model"]["cifar_stem"]:
        cifar_stem(m)
    return m


def timm_code(c: dict, path: Path) -> str:
    """The Python a user runs to load a timm export (printed by export; the README shows it)."""
    lines = ["import timm, torch",
             f"model = timm.create_model({c['model']['name']!r}, num_classes={c['num_classes']})"]
    if c["model"]["cifar_stem"]:
        m = timm_model(c)  # read the stem's shape off the model fastcifar built
        name = m.pretrained_cfg["first_conv"]
        conv = m.get_submodule(name)
        lines += ["# fastcifar's CIFAR stem: a 3x3 stride-1 first conv, and no max-pool",
                  f"model.set_submodule({name!r}, torch.nn.Conv2d({conv.in_channels}, {conv.out_channels}, 3, "
                  f"stride=1, padding=1, bias={conv.bias is not None}))"]
        if isinstance(getattr(m, "maxpool", None), torch.nn.Identity):
            lines.append("model.maxpool = torch.nn.Identity()")
    lines.append(f"model.load_state_dict(torch.load({str(path)!r}, weights_only=True), strict=True)")
    lines.append("model.eval()")
    return "\n".join(lines)


def to_timm(net: Net, c: dict) -> tuple[dict, torch.nn.Module]:
    """(the linear-head Net's weights under timm_model(c)'s keys, that model loaded with them)."""
    m = timm_model(c)
    name = m.pretrained_cfg.get("classifier")
    fc = m.get_submodule(name) if isinstance(name, str) else None
    if not isinstance(fc, torch.nn.Linear):
        raise BadInput(f"{c['model']['name']}'s classifier ({name!r}) is not one Linear layer, so fastcifar's head "
                       f"does not map onto it; use --format onnx or --format safetensors.")
    state = {k[len("backbone."):]: v for k, v in net.state_dict().items() if k.startswith("backbone.")}
    state.update({f"{name}.weight": net.head.fc.weight.detach(), f"{name}.bias": net.head.fc.bias.detach()})
    try:
        m.load_state_dict(state, strict=True)  # the promise the format makes, checked here
    except RuntimeError as e:
        raise BadInput(f"{c['model']['name']}'s timm layout does not match fastcifar's backbone + head "
                       f"({str(e).splitlines()[0]}); use --format onnx or --format safetensors.")
    return state, m.eval()


def out_path(out: Path | None, src: Path, fmt: str, force: bool) -> Path:
    """Where the export goes (default: beside the checkpoint, best.pt -> best.onnx, best.safetensors,
    best-timm.pth; also in a directory), or BadInput; only an export's file is replaced, with force."""
    suffix = {"onnx": ".onnx", "safetensors": ".safetensors", "timm": "-timm.pth"}[fmt]
    path = default = src.with_name(src.stem + suffix)
    if out is not None:
        out = Path(out)
        path = out / path.name if out.is_dir() else out
    if path.suffix.lower() not in SUFFIXES[fmt]:
        raise BadInput(f"--out {path}: a {fmt} export is named *{' or *'.join(SUFFIXES[fmt])} "
                       f"(fastcifar predict tells exports apart by it).")
    if path.is_dir():
        raise BadInput(f"--out {path} is a directory; name a file, or a directory that has none of that name.")
    if path.exists() or path.is_symlink():
        if path.exists() and path.resolve() == src.resolve():
            raise BadInput(f"--out {path} is the checkpoint being exported; name another file.")
        owned.check([path], "export", f"--force replaces only an earlier export; choose another --out (default: "
                                      f"{default.name} beside the checkpoint), or move it away.")
        if not force:
            raise BadInput(f"{path} already exists; pass --force to replace it, or choose another --out.")
    # now, not after the export and its check (an existing file, replaced with --force: its folder)
    checkpoint.check_writable_parent(path.parent if path.exists() else path)
    return path


def export(ref, fmt: str, out=None, data_dir=None, force: bool = False, log=print) -> Path:
    """Export a run or checkpoint as fmt (onnx | safetensors | timm), checked, written atomically."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    require(f"fastcifar export --format {fmt}", NEEDS[fmt])
    src = checkpoint.resolve(ref, prefer="best.pt")
    path = out_path(out, src, fmt, force)
    ck, weights = pick_weights(checkpoint.load(src))  # the EMA weights when the run kept them, as eval does
    net, r = net_from_checkpoint(ck, src, overrides=SCALED_LOGITS)  # what the card's head rebuilds
    if fmt == "timm" and r.head.kind != "linear":  # before the export's work
        raise BadInput(f"--format timm holds a linear classifier only; this model's head is {r.head.kind} (a "
                       f"cosine to class centres times s), which no timm model has. Use --format onnx or "
                       f"--format safetensors.")
    c = card(ck, r, src)
    c["source"]["weights"] = weights  # raw, or the EMA of the weights
    del ck
    images, what = check_images(data_dir, r.data.dataset)
    x = preprocess(images, c)
    with torch.no_grad():
        ours = net(x)
    if fmt == "onnx":
        log(f"exporting {c['model']['name']} to ONNX (torch.export; seconds to a minute on a CPU)...")
        data = to_onnx(net, c, x)
        try:
            theirs = run_onnx(data, x)
        except Exception as e:  # onnxruntime's own exception types
            raise CheckFailed(f"onnxruntime cannot run the exported model ({why(e)}). Nothing was written.")
        line = compare(ours, theirs, "onnxruntime vs torch", what)
    elif fmt == "safetensors":
        data = to_safetensors(net, c)
        c2, state = read_safetensors(data)
        with torch.no_grad():
            line = compare(ours, net_from_card(c2, state, path)(x), "the reloaded safetensors vs the checkpoint", what)
    else:
        state, m = to_timm(net, c)
        with torch.no_grad():
            line = compare(ours, m(x), "timm.create_model + load_state_dict(strict=True) vs fastcifar", what)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(path, lambda f: f.write(data), by="export")
    except OSError as e:
        raise BadInput(f"Cannot write {path}: {e.strerror or e}. Choose another --out.")
    p, fmt3 = c["preprocess"], lambda v: "(" + ", ".join(f"{x:.4f}" for x in v) + ")"
    log(f"wrote {path} ({len(data) / 1e6:.1f} MB): {c['model']['name']}{' (CIFAR stem)' if c['model']['cifar_stem'] else ''} "
        f"+ {c['head']['kind']} head, {c['num_classes']} classes; input RGB {p['image_size']}x{p['image_size']} "
        f"({p['interpolation']} resize from 32x32), (x/255 - mean) / std, mean {fmt3(p['mean'])} std {fmt3(p['std'])}")
    log(line)
    if fmt == "timm":
        log("load it with:\n" + timm_code(c, path))
    return path
