"""`fastcifar predict`: image files -> the top-k classes with probabilities, from a run, a
checkpoint, or an export of `fastcifar export` (.onnx in onnxruntime, .safetensors).

An image becomes what the model saw in training in two steps:
1. a 32x32 RGB uint8 image, as CIFAR's are: decoded by Pillow (EXIF rotation applied; grey,
   palette, CMYK, 16-bit and float images made 8-bit RGB (float: 0..1 scaled, else 0..255
   clipped); alpha dropped, as `convert("RGB")` does),
   centre-cropped to its largest square (objects keep their shape, as in CIFAR's square
   pictures), then resized to 32x32 with Pillow's antialiased bilinear filter (the filter widens
   with the shrink factor, so a photo does not alias; a smaller image is upsampled).
2. the torch backend's evaluation path (`export.preprocess`): 32 -> the recipe's image_size with
   its interpolation, then (x / 255 - mean) / std.
A 32x32 picture passes step 1 untouched, so a PNG of a store image gets exactly the input that
`fastcifar eval` gives it with the torch backend. Probabilities are the softmax of the
evaluation logits (for margin heads, of s * cosine, even when the recipe evaluates on the plain
cosine: its softmax would be near uniform).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastcifar import BadInput, checkpoint, why
from fastcifar import export as ex
from fastcifar.averaging import pick_weights
from fastcifar.models import SCALED_LOGITS, net_from_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a directory is searched for
BATCH = 64  # images per forward pass: 38 MB of input at 224 px
SIDE = 32   # CIFAR's stored side in px


def open_model(ref, data_dir=None, log=print) -> tuple[dict, object, str]:
    """(card, logits function of a float32 NCHW batch, kind) for a run directory, checkpoint,
    recipe name, or an .onnx / .safetensors export."""
    p = Path(ref)
    kind = {".onnx": "onnx", ".safetensors": "safetensors"}.get(p.suffix.lower()) if p.is_file() else None
    if kind == "onnx":
        ex.require("fastcifar predict on an .onnx export", ("onnxruntime",))
        import onnxruntime as ort
        try:
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise BadInput(f"{p} is not a readable ONNX model ({why(e)}).")
        meta = sess.get_modelmeta().custom_metadata_map.get(ex.CARD_KEY)
        if meta is None:
            raise BadInput(f"{p} is an ONNX model without fastcifar metadata (class names, preprocessing): "
                           f"not a `fastcifar export`.")
        try:
            import json
            c = ex.check_card(json.loads(meta), p)
        except ValueError as e:
            raise BadInput(f"{p}: its fastcifar metadata is not JSON ({e}).")

        def run_onnx(x):
            try:
                return ex.run_onnx(sess, x)
            except Exception as e:  # onnxruntime's own types: an input shape or dtype the model does not take
                raise BadInput(f"{p} does not run on the input its fastcifar metadata describes (float32 batches of "
                               f"3x{c['preprocess']['image_size']}x{c['preprocess']['image_size']}): {why(e)}. "
                               f"Export the model again.")

        return c, run_onnx, kind
    if kind == "safetensors":
        ex.require("fastcifar predict on a .safetensors export", ("safetensors",))
        c, state = ex.read_safetensors(p)
        net = ex.net_from_card(c, state, p)
    else:
        kind, p = "checkpoint", checkpoint.resolve(ref, prefer="best.pt")
        ck, _ = pick_weights(checkpoint.load(p))  # the EMA weights when the run kept them, as eval does
        net, r = net_from_checkpoint(ck, p, overrides=SCALED_LOGITS)  # as an export of it gives
        c = ex.card(ck, r, p, data_dir, log)

    def run(x):
        with torch.no_grad():
            return net(x)

    return c, run, kind


def gather(inputs, log=print) -> tuple[list[Path], list[dict]]:
    """(image files in order, skipped inputs with why). A directory gives its .png/.jpg/.jpeg files,
    recursively and sorted (hidden ones left out); a file named on the command line is always tried."""
    files, skipped = [], []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found, others = [], 0
            for root, dirs, names in os.walk(p):  # does not follow links to directories: no loops
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(names):
                    if n.startswith("."):
                        continue
                    if not n.lower().endswith(IMAGE_SUFFIXES):
                        others += 1
                    elif (Path(root) / n).is_file():
                        found.append(Path(root) / n)
                    else:  # a FIFO would block the reader for ever; a dangling link names nothing
                        path = Path(root) / n
                        skipped.append({"file": str(path), "error": "not a regular file" if path.exists()
                                        else "a link to nothing"})
            files += found
            if found and others:
                log(f"note: {p}: left out {others} files not named {'/'.join(IMAGE_SUFFIXES)}")
            if not found:
                skipped.append({"file": str(p), "error": f"a directory with no {'/'.join(IMAGE_SUFFIXES)} files"
                                + (f" (it holds {others} other files)" if others else "")})
        elif p.is_file():
            files.append(p)
        else:
            skipped.append({"file": str(p), "error": "not a regular file" if p.exists() else "does not exist"})
    seen = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    return unique, skipped


def read_image(path: Path) -> np.ndarray:
    """An image file as a (32, 32, 3) uint8 RGB array (step 1 of the module docstring); ValueError
    saying why when it is not a readable image."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # Pillow warns of images over 89 Mpx and refuses those over 179 Mpx: the ones between are
        # decoded (at most about 540 MB) and shrunk to 32 px, so its warning on stderr is noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _decode(path)


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # decodes the whole image: a truncated file fails here
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # what Pillow warns (on stderr) that convert("RGB") should go through
            if im.mode.startswith("I;16") or im.mode == "I":
                # Pillow's convert() clips 16-bit values to 255 instead of scaling them
                a = np.asarray(im, dtype=np.float64).clip(0, 65535) / 257
                im = Image.fromarray(a.round().astype(np.uint8))
            elif im.mode == "F":  # a float image (TIFF): convert() would clip, so 0..1 would be near black
                a = np.asarray(im, dtype=np.float64)
                if not np.isfinite(a).all():
                    raise ValueError("a float image holding NaN or infinite values")
                a = a * 255 if a.min() >= 0 and a.max() <= 1 else a  # 0..1 is the float convention; else 0..255
                im = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)  # the centred square
            im = im.crop(box).resize((SIDE, SIDE), Image.Resampling.BILINEAR)  # crop first: nothing outside bleeds in
            return np.asarray(im, dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (PNG, JPEG, ...)")
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"unreadable image ({why(e)})")


def predict(ref, inputs, top: int = 5, data_dir=None, log=print) -> dict:
    """Top-`top` classes and probabilities for each image in inputs (files and directories). Bad
    files are named (log) and skipped; BadInput only when no image at all could be read."""
    from tqdm import tqdm

    if top < 1:
        raise BadInput(f"--top {top}: must be at least 1.")
    ex.require("fastcifar predict", ("PIL",))
    files, skipped = gather(inputs, log)
    for s in skipped:
        log(f"skipped {s['file']}: {s['error']}")
    c, run, kind = open_model(ref, data_dir, log)
    k = min(top, c["num_classes"])
    names, preds = c["class_names"], []
    with tqdm(total=len(files), unit="img", desc="predict", disable=None, leave=False) as bar:
        for start in range(0, len(files), BATCH):
            images, ok = [], []
            for f in files[start:start + BATCH]:
                try:
                    images.append(read_image(f))
                    ok.append(f)
                except ValueError as e:
                    skipped.append({"file": str(f), "error": str(e)})
                    log(f"skipped {f}: {e}")
            if images:
                logits = torch.as_tensor(np.asarray(run(ex.preprocess(torch.from_numpy(np.stack(images)), c))))
                if logits.shape != (len(images), c["num_classes"]):  # an export's graph and card disagree
                    raise BadInput(f"{ref} gives logits of shape {tuple(logits.shape)} for {len(images)} images, but "
                                   f"its fastcifar metadata names {c['num_classes']} classes; export the model again.")
                prob, idx = torch.softmax(logits.float(), 1).topk(k, 1)
                preds += [{"file": str(f), "top": [{"class": names[j], "index": j, "prob": round(q, 6)}
                                                   for q, j in zip(pr.tolist(), ix.tolist())]}
                          for f, pr, ix in zip(ok, prob, idx)]
            bar.update(len(files[start:start + BATCH]))
    if not preds:
        raise BadInput("No image to predict: " + "; ".join(f"{s['file']}: {s['error']}" for s in skipped[:5])
                       + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "") + ".")
    return {"model": str(ref), "format": kind, "predictions": preds, "skipped": skipped}
