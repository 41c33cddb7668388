"""Use a fastcifar export without fastcifar: read a safetensors export and preprocess an image file.

Needs torch, timm, safetensors, numpy and Pillow. With an ONNX export, onnxruntime reads the card
and runs the network; `preprocess_image` makes its input as well:

    logits, card = load_safetensors_export("runs/r18-x/best.safetensors")
    x = preprocess_image("cat.jpg", card)
    print(card["class_names"][logits(x).argmax(1).item()])
"""

import json

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import safe_open


def load_safetensors_export(path):
    """(logits of a preprocessed NCHW float32 batch, card) from a fastcifar safetensors export."""
    with safe_open(path, "pt") as f:
        card, w = json.loads(f.metadata()["fastcifar"]), {k: f.get_tensor(k) for k in f.keys()}
    backbone = timm.create_model(card["model"]["name"], num_classes=0)  # gives pooled features
    if card["model"]["cifar_stem"]:  # 3x3 stride-1 first conv, no max-pool
        name = backbone.pretrained_cfg["first_conv"]
        conv = backbone.get_submodule(name)
        backbone.set_submodule(name, torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1,
                                                     bias=conv.bias is not None))
        backbone.maxpool = torch.nn.Identity()
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in w.items() if k.startswith("backbone.")})
    backbone.eval()
    head = card["head"]

    def logits(x):
        f = backbone(x)
        if head["kind"] == "linear":
            return F.linear(f, w["head.fc.weight"], w["head.fc.bias"])
        # arcface / cosface at inference: Linear -> BatchNorm1d (running stats) -> s * cosine to the class centres
        e = F.batch_norm(F.linear(f, w["head.embed.weight"]), w["head.bn.running_mean"], w["head.bn.running_var"],
                         w["head.bn.weight"], w["head.bn.bias"])
        return head["s"] * F.normalize(e) @ F.normalize(w["head.weight"]).T

    return logits, card


def preprocess_image(path, card):
    """One image file as the (1, 3, S, S) float32 input a fastcifar export expects."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # (16-bit greys need scaling first)
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float()  # (1, 3, 32, 32), 0..255
    p, size = card["preprocess"], card["preprocess"]["image_size"]
    mean, std = torch.tensor(p["mean"]).view(1, 3, 1, 1), torch.tensor(p["std"]).view(1, 3, 1, 1)

    def norm(t):
        return (t / 255 - mean) / std

    if size == 32:
        return norm(x)
    if p["interpolation"] == "linear":  # normalise, then resize the floats
        return F.interpolate(norm(x), size=size, mode="bilinear", align_corners=False, antialias=size < 32)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)  # Keys' a = -0.5
    return norm((x + 0.5).floor().clamp(0, 255))  # cubic overshoots: rounded and clamped to 0..255
