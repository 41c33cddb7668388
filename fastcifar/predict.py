"""`fastcifar predict`: image files -> the top-k classes with probabilities, from a run, a checkpoint,
or an export (.onnx in onnxruntime, .safetensors). An image becomes what the model saw in training:
(1) 32x32 RGB uint8, as CIFAR's: decoded by Pillow (EXIF rotation applied; grey, palette, CMYK, 16-bit
and float made 8-bit RGB; alpha dropped), centre-cropped to its largest square, resized (antialiased
bilinear); (2) the torch backend's evaluation path (`export.preprocess`): 32 -> the recipe's image_size,
(x / 255 - mean) / std, so a PNG of a store image gets exactly what `fastcifar eval` gives it. Margin
heads' probabilities are the softmax of s * cosine (the plain cosine's is near uniform).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fastcifar import checkpoint, runtime
from fastcifar import export as ex
from fastcifar.averaging import pick_weights
from fastcifar.errors import BadInput, why
from fastcifar.models import SCALED_LOGITS, net_from_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a directory is searched for
BATCH = 64  # images per forward pass at up to 224 px (38 MB of input); fewer past it (batch_for)
SIDE = 32   # CIFAR's stored side in px


def batch_for(side: int) -> int:
    """Images per forward pass at an input side: BATCH up to 224 px, fewer past it (1024 px: 3)."""
    return max(1, min(BATCH, BATCH * 224 ** 2 // side ** 2))


def open_model(ref) -> tuple[dict, object, str]:
    """(card, logits function of float32 NCHW batches, kind) of a run, checkpoint, .onnx or .safetensors."""
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
        c = ex.read_card(meta, p)
        side, takes = c["preprocess"]["image_size"], sess.get_inputs()[0].shape  # e.g. ["batch", 3, 32, 32]
        wrong = (f"{p} does not run on the input its fastcifar metadata describes (float32 batches of "
                 f"3x{side}x{side})")
        if len(takes) != 4 or any(isinstance(n, int) and n != want for n, want in zip(takes[1:], (3, side, side))):
            # checked before a batch is made: a card claiming 1024 px would cost gigabytes first
            raise BadInput(f"{wrong}: its graph takes {takes}. Export the model again.")

        def run_onnx(x):
            try:
                return ex.run_onnx(sess, x)
            except Exception as e:  # onnxruntime's own types: an input shape or dtype the model does not take
                raise BadInput(f"{wrong}: {why(e)}. Export the model again.")

        return c, run_onnx, kind
    if kind == "safetensors":
        ex.require("fastcifar predict on a .safetensors export", ("safetensors",))
        c, state = ex.read_safetensors(p)
        net = ex.net_from_card(c, state, p)
    else:
        kind, p = "checkpoint", checkpoint.resolve(ref, prefer="best.pt")
        ck, _ = pick_weights(checkpoint.load(p))  # the EMA weights when the run kept them, as eval does
        net, r = net_from_checkpoint(ck, p, overrides=SCALED_LOGITS)  # as an export of it gives
        c = ex.card(ck, r, p)
    return c, torch.no_grad()(net), kind


def gather(inputs, log=print) -> tuple[list[Path], list[dict]]:
    """(image files in order, skipped inputs with why). A directory gives its .png/.jpg/.jpeg files,
    recursively and sorted (hidden ones left out); a file named on the command line is always tried."""
    files, skipped = [], []

    def unreadable(e: OSError, path: Path) -> None:  # a file or folder this user may not read or list
        skipped.append({"file": str(e.filename or path), "error": f"cannot be read ({e.strerror or e})"})

    for arg in inputs:
        p = Path(arg)
        try:
            is_dir, is_file = p.is_dir(), p.is_file()
        except OSError as e:  # pathlib raises EACCES (a folder on the way that this user cannot enter)
            unreadable(e, p)
            continue
        if is_dir:
            found, others = [], 0
            # os.walk does not follow links to folders (no loops), and names the ones it cannot list
            for root, dirs, names in os.walk(p, onerror=lambda e: unreadable(e, p)):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for n in sorted(n for n in names if not n.startswith(".")):
                    path = Path(root) / n
                    if not n.lower().endswith(IMAGE_SUFFIXES):
                        others += 1
                        continue
                    try:
                        if path.is_file():
                            found.append(path)
                        else:  # a FIFO would block the reader for ever; a dangling link names nothing
                            skipped.append({"file": str(path), "error": "not a regular file" if path.exists()
                                            else "a link to nothing"})
                    except OSError as e:
                        unreadable(e, path)
            files += found
            if found and others:
                log(f"note: {p}: left out {others} files not named {'/'.join(IMAGE_SUFFIXES)}")
            if not found:
                skipped.append({"file": str(p), "error": f"a directory with no {'/'.join(IMAGE_SUFFIXES)} files"
                                + (f" (it holds {others} other files)" if others else "")})
        elif is_file:
            files.append(p)
        else:
            skipped.append({"file": str(p), "error": "not a regular file" if p.exists() else "does not exist"})
    seen = set()
    unique = [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]
    return unique, skipped


class Unreadable(ValueError):
    """An image predict skips; the message says why."""


ROWS = 256  # rows of a 16-bit or float image converted at a time (the whole in float64: 8 bytes a pixel)


def read_image(path: Path) -> np.ndarray:
    """An image file as a (32, 32, 3) uint8 RGB array (step 1 of the module docstring); Unreadable
    saying why when it is not a readable image, or one over Pillow's MAX_IMAGE_PIXELS."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below, first
            im = Image.open(path)  # reads the header only: the size is known before anything is decoded
        with im:
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:  # a few KB of PNG can claim 100 Mpx: gigabytes once decoded
                raise Unreadable(f"{w}x{h} pixels, over the {limit:,} that fastcifar decodes (Pillow's "
                                 f"MAX_IMAGE_PIXELS); shrink it first")
            im.load()  # decodes the whole image: a truncated file fails here
            if im.getexif().get(0x0112, 1) != 1:  # an EXIF orientation: turn it upright (a copy only then)
                im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # what Pillow warns (on stderr) that convert("RGB") should go through
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                im = Image.fromarray(_eight_bit(np.asarray(im), im.mode == "F"))  # grey, 8-bit
            w, h = im.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)  # the centred square
            if box != (0, 0, w, h):
                im = im.crop(box)  # first: nothing outside the square bleeds into the resize
            if im.mode not in ("RGB", "L"):  # grey stays one channel until it is 32x32
                im = im.convert("RGB")
            im = im.resize((SIDE, SIDE), Image.Resampling.BILINEAR).convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except Unreadable:
        raise
    except UnidentifiedImageError:
        raise Unreadable("not an image Pillow can read (PNG, JPEG, ...)")
    except Exception as e:  # decoders raise OSError, SyntaxError, DecompressionBombError, MemoryError, ...
        raise Unreadable(f"unreadable image ({why(e)})")


def _eight_bit(a: np.ndarray, is_float: bool) -> np.ndarray:
    """A 16/32-bit integer or float image as uint8: integers from 0..65535 (clipped), floats from 0..1 if all
    lie in it, else clipped to 0..255; ROWS rows at a time, so memory stays at the image's own size."""
    bands = range(0, a.shape[0], ROWS)
    unit = False
    if is_float:
        if not all(np.isfinite(a[i:i + ROWS]).all() for i in bands):
            raise Unreadable("a float image holding NaN or infinite values")
        unit = min(a[i:i + ROWS].min() for i in bands) >= 0 and max(a[i:i + ROWS].max() for i in bands) <= 1
    out = np.empty(a.shape, np.uint8)
    for i in bands:
        b = a[i:i + ROWS].astype(np.float64)
        b = (b * 255 if unit else b).clip(0, 255) if is_float else b.clip(0, 65535) / 257
        out[i:i + ROWS] = b.round()
    return out


def predict(ref, inputs, top: int = 5, log=print) -> dict:
    """Top-`top` classes and probabilities for each image in inputs (files and directories). Bad
    files are named (log) and skipped; BadInput only when no image at all could be read."""
    from tqdm import tqdm

    if top < 1:
        raise BadInput(f"--top {top}: must be at least 1.")
    ex.require("fastcifar predict", ("PIL",))
    files, skipped = gather(inputs, log)
    for s in skipped:
        log(f"skipped {s['file']}: {s['error']}")
    c, run, kind = open_model(ref)
    k = min(top, c["num_classes"])
    names, preds = c["class_names"], []
    side = c["preprocess"]["image_size"]
    batch = batch_for(side)
    too_big = (lambda e: BadInput(f"Predicting with {ref} ran out of memory ({runtime.memory_error(e)}) on batches of "
                                  f"{batch} images of {side}x{side} px; free some memory and run it again."))
    with tqdm(total=len(files), unit="img", desc="predict", disable=None, leave=False) as bar:
        for start in range(0, len(files), batch):
            images, ok = [], []
            for f in files[start:start + batch]:
                try:
                    images.append(read_image(f))
                    ok.append(f)
                except ValueError as e:
                    skipped.append({"file": str(f), "error": str(e)})
                    log(f"skipped {f}: {e}")
            if images:
                try:
                    with runtime.out_of_memory_as(too_big):  # torch's allocator
                        x = ex.preprocess(torch.from_numpy(np.stack(images)), c)
                        logits = torch.as_tensor(np.asarray(run(x)))
                except MemoryError as e:  # numpy's
                    raise too_big(e) from None
                if logits.shape != (len(images), c["num_classes"]):  # an export's graph and card disagree
                    raise BadInput(f"{ref} gives logits of shape {tuple(logits.shape)} for {len(images)} images, but "
                                   f"its fastcifar metadata names {c['num_classes']} classes; export the model again.")
                prob, idx = torch.softmax(logits.float(), 1).topk(k, 1)
                preds += [{"file": str(f), "top": [{"class": names[j], "index": j, "prob": round(q, 6)}
                                                   for q, j in zip(pr.tolist(), ix.tolist())]}
                          for f, pr, ix in zip(ok, prob, idx)]
            bar.update(len(files[start:start + batch]))
    if not preds:
        raise BadInput("No image to predict: " + "; ".join(f"{s['file']}: {s['error']}" for s in skipped[:5])
                       + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "") + ".")
    return {"model": str(ref), "format": kind, "predictions": preds, "skipped": skipped}
