"""The network: a timm backbone looked up by name (pooled features) plus a head from `HEADS`."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import timm
import torch
from torch import nn

from fastcifar import checkpoint
from fastcifar.checkpoint import torch_load
from fastcifar.config import apply_overrides, from_dict
from fastcifar.errors import BadInput, shown, why
from fastcifar.heads import HEADS
from fastcifar.runtime import memory_format


class Net(nn.Module):
    """backbone (images -> pooled features) then head (features [, targets] -> logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(images), targets)


def build_model(model_cfg, head_cfg, num_classes: int = 100) -> Net:
    """The Net a recipe's `model` and `head` sections describe (on the CPU, fp32)."""
    backbone = build_backbone(model_cfg)
    return Net(backbone, HEADS[head_cfg.kind](backbone.num_features, num_classes, head_cfg))


def num_classes(state: dict, head_kind: str, where="the checkpoint") -> int:
    """Classes of a Net state dict, read from its head's weights."""
    key = "head.fc.weight" if head_kind == "linear" else "head.weight"
    if not isinstance(state.get(key), torch.Tensor) or state[key].ndim != 2:
        raise BadInput(f"The weights in {where} do not fit a {head_kind} head ({key} is missing): is it a fastcifar "
                       f"network, of the recipe it was saved with?")
    return state[key].shape[0]


def net_from_state(model_cfg, head_cfg, state: dict, where) -> Net:
    """The Net of a recipe's model and head sections holding `state` (CPU, fp32, eval; the head's classes)."""
    model_cfg.pretrained, model_cfg.pretrained_file, model_cfg.init_from = False, "", ""  # `state` has the weights
    net = build_model(model_cfg, head_cfg, num_classes(state, head_cfg.kind, where))
    load_weights(net, state, where)
    return net.eval()


# Overrides for a net whose logits leave fastcifar (exports, predict's probabilities, a KD teacher):
# s * cosine for margin heads, whatever the recipe evaluated on. The tutorial's plain cosine ranks the
# same, but its softmax is near uniform, and an export's card rebuilds the default (scaled) head.
SCALED_LOGITS = ("head.eval_logits=scaled",)


def net_from_checkpoint(ck: dict, path, device: torch.device = torch.device("cpu"), overrides: tuple[str, ...] = ()):
    """(Net in eval mode on device, Recipe) of a loaded checkpoint, its recipe with `--set`-style overrides."""
    r = apply_overrides(from_dict(ck["recipe"]), list(overrides))
    net = net_from_state(r.model, r.head, ck["model"], path)
    return net.to(device, memory_format=memory_format(r.model.channels_last)), r


def load_weights(module: nn.Module, state_dict: dict, path) -> None:
    """module.load_state_dict(state_dict), strictly; weights that do not fit are bad input naming the file."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise BadInput(f"The weights in {path} do not fit the model its recipe describes ({detail[:600]}); "
                       f"was the file written by another model, head or number of classes?")


def check_refs(cfg, resumed: bool = False) -> None:
    """BadInput for what the model section names that is not there (init_from unless resuming), at once."""
    check_name(cfg.name)
    if cfg.init_from and not resumed:
        init_path(cfg.init_from)
    if cfg.pretrained_file and not Path(cfg.pretrained_file).is_file():
        raise BadInput(f"model.pretrained_file = {shown(cfg.pretrained_file)} does not exist.")


def init_path(ref: str) -> Path:
    """The checkpoint model.init_from names (a run dir's last.pt, a checkpoint file, a recipe's newest run)."""
    try:
        return checkpoint.resolve(ref, prefer="last.pt")
    except BadInput as e:
        raise BadInput(f"model.init_from = {shown(ref)}: {e}")  # each message already says what to give instead


def init_from(net: nn.Module, ref: str, log=print) -> dict:
    """Start net from the weights (only) of `model.init_from`, matched by name and shape; the rest keep
    the values net was built with. Logs and returns {path, loaded, missing, unexpected, other_shape}."""
    path = init_path(ref)
    try:
        sd = checkpoint.load(path, need="weights")["model"]
    except BadInput as e:
        raise BadInput(f"model.init_from = {shown(ref)}: {e}")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"model.init_from = {shown(ref)}: {path} holds no state dict (a mapping of names to tensors).")
    own = net.state_dict()
    fits = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    report = {"path": str(path), "loaded": sorted(fits), "missing": [k for k in own if k not in sd],
              "unexpected": [k for k in sd if k not in own],
              "other_shape": [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                              if k in own and own[k].shape != sd[k].shape]}
    if not fits:
        unknown = report["unexpected"]
        raise BadInput(f"model.init_from = {shown(ref)}: no weight in {path} fits this model (by name and shape): "
                       f"{len(unknown)} unknown names (e.g. {', '.join(unknown[:3]) or '-'}), "
                       f"{len(report['other_shape'])} of another shape. Was it written by another model.name?")
    net.load_state_dict(fits, strict=False)
    some = lambda keys: f"{len(keys)} ({', '.join(keys[:4])}{', ...' * (len(keys) > 4)})" if keys else "0"
    log(f"Weights from {path}: {len(fits)} of {len(own)} tensors loaded; kept as built: missing there "
        f"{some(report['missing'])}, of another shape {some(report['other_shape'])}; ignored: "
        f"unexpected {some(report['unexpected'])}.")
    return report


def check_name(name: str) -> None:
    """BadInput unless `name` is a timm model, naming close ones."""
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.7)
        raise BadInput(f"model.name = {shown(name)} is not a timm model."
                       + (f" Close names: {', '.join(near)}." if near else " See timm.list_models()."))


def build_backbone(cfg) -> nn.Module:
    """timm model `cfg.name` without its classifier (forward gives globally pooled features)."""
    check_name(cfg.name)
    hub = cfg.pretrained and not cfg.pretrained_file
    if hub and not hub_reachable():
        # Offline: use the local hub cache only. Otherwise the hub client retries for ~50 s
        # before failing; this way a cached model loads and a missing one fails at once.
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        # num_classes=0: timm keeps global average pooling and drops the classifier, which is the
        # tutorial's features_only backbone + pooling in one module
        # drop_path_rate only when asked for: models without stochastic depth (VGG, DenseNet) refuse it
        depth = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
        m = timm.create_model(cfg.name, pretrained=hub, num_classes=0, drop_rate=cfg.drop_rate, **depth)
    except TypeError as e:
        if depth and "drop_path_rate" in str(e):
            raise BadInput(f"model.drop_path = {cfg.drop_path}: timm's {cfg.name} has no stochastic depth (no "
                           f"drop_path_rate); use model.drop_path=0 or a model that has it (ResNets, ConvNeXts, ViTs).")
        raise
    except Exception as e:
        if not hub:
            raise
        raise BadInput(f"Could not get ImageNet weights for {cfg.name} from timm's hub (Hugging Face): {why(e)}. "
                       f"Without internet, save timm.create_model('{cfg.name}', pretrained=True).state_dict() "
                       f"elsewhere and set model.pretrained_file=PATH, or set model.pretrained=false.")
    stem = cifar_stem(m) if cfg.cifar_stem else None
    if cfg.pretrained_file:
        _load_file(m, Path(cfg.pretrained_file), skip=stem)
    return m


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """net with every BatchNorm on all ranks' statistics (before DDP): timm's converter on GPUs (keeps its
    BN+act layers' activation), GlooSyncBatchNorm on CPU ranks (gloo: torch's refuses); same tensor names."""
    if device.type != "cpu":
        return timm.layers.convert_sync_batchnorm(net)
    for name, m in net.named_modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            m.__class__ = GlooSyncBatchNorm  # the same state; only the forward differs
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise BadInput(f"model.sync_bn on CPU ranks handles plain BatchNorm layers only, and {name} is a "
                           f"{type(m).__name__}; on GPUs it is supported, on CPUs set model.sync_bn=false.")
    return net


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm on the global batch's statistics for CPU tensors: one all_reduce of per-channel sums, sums
    of squares and count per layer (backward all-reduces the gradients, as torch's CUDA SyncBatchNorm).
    Plain BatchNorm in eval mode or without a process group. Not a SyncBatchNorm: DDP refuses them on CPUs."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x.float()  # sums of squares in fp32, whatever autocast gave
        total = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_full((1,), x.numel() / c)]))
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean * mean).clamp(min=0)  # biased: what normalises the batch
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, f)
                self.running_var.lerp_(var * n / (n - 1), f)  # unbiased, as BatchNorm keeps it
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) takes a TCP connection (behind a proxy: assume so)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def cifar_stem(m: nn.Module) -> str:
    """Replace the first conv by a random 3x3 stride-1 one (a pretrained 7x7 stride-2 kernel means something
    else at stride 1) and drop the max-pool: 32x32 px keep 4x4 at the last stage. Returns the conv's name."""
    name = m.pretrained_cfg.get("first_conv")
    conv = m.get_submodule(name) if isinstance(name, str) else None
    if not isinstance(conv, nn.Conv2d):
        raise BadInput(f"model.cifar_stem: {type(m).__name__} names no single first conv "
                       f"(pretrained_cfg first_conv = {shown(name)}); use a ResNet-like timm model or cifar_stem=false.")
    m.set_submodule(name, nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1,
                                    bias=conv.bias is not None))
    if isinstance(getattr(m, "maxpool", None), nn.Module):
        m.maxpool = nn.Identity()
    return name


def _load_file(m: nn.Module, path: Path, skip: str | None) -> None:
    """Backbone weights from a timm/torchvision state dict (not its classifier) or a fastcifar checkpoint."""
    sd = torch_load(path, what="model.pretrained_file state dict")
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"model.pretrained_file {path} holds no state dict (a mapping of names to tensors).")
    for prefix in ("module.", "_orig_mod."):  # saved from a DDP or torch.compile wrapper
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # a fastcifar Net: keep its backbone part
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    # the new CIFAR stem conv keeps its random weights
    own = {k: v for k, v in m.state_dict().items() if not (skip and k.startswith(skip + "."))}
    missing = [k for k in own if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    if missing or wrong:
        raise BadInput(
            f"model.pretrained_file {path} does not fit {m.pretrained_cfg.get('architecture', type(m).__name__)}: "
            + (f"{len(missing)} weights missing (e.g. {', '.join(missing[:4])})" if missing else "")
            + ("; " if missing and wrong else "")
            + (f"{len(wrong)} of another shape (e.g. {', '.join(wrong[:3])})" if wrong else "")
            + ". Is it a state dict of the same model.name?")
    m.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
