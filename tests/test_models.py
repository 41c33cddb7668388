"""Backbones: timm by name, CIFAR stem, pretrained weights from a local file, a clear error offline."""

import socket

import huggingface_hub.constants
import pytest
import timm
import torch

from fastcifar import models
from fastcifar.config import Head, Model
from fastcifar.errors import BadInput
from fastcifar.models import build_backbone, build_model


def test_backbone_and_head_shapes():
    net = build_model(Model(name="test_resnet"), Head(kind="linear"), num_classes=100)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    net = build_model(Model(name="test_resnet"), Head(kind="arcface", embed_dim=64), num_classes=100)
    assert net(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).shape == (2, 100)


def test_cifar_stem_keeps_resolution():
    plain = build_backbone(Model(name="resnet18"))
    cifar = build_backbone(Model(name="resnet18", cifar_stem=True))
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert plain.forward_features(x).shape[-2:] == (1, 1)   # the ImageNet stem: 32 px -> 1x1
    assert cifar.forward_features(x).shape[-2:] == (4, 4)   # 3x3 stride-1, no max-pool: 4x4
    deep = build_backbone(Model(name="test_resnet", cifar_stem=True))  # a deep stem: conv1 is a Sequential
    assert deep.conv1[0].stride == (1, 1)


def test_unknown_model_is_bad_input():
    with pytest.raises(BadInput, match="not a timm model.*resnet18"):
        build_backbone(Model(name="resnet18x"))


def test_pretrained_offline_says_what_to_do(monkeypatch):
    # what an offline machine sees, without waiting for the hub's retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BadInput, match="model.pretrained_file"):
        build_backbone(Model(name="resnet18", pretrained=True))


def test_unreachable_hub_goes_offline_at_once(monkeypatch):
    """Without a connection the hub client is switched to its local cache instead of retrying."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(BadInput, match="model.pretrained_file"):
        build_backbone(Model(name="resnet18", pretrained=True))
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_hub_reachable_checks_the_endpoint(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert models.hub_reachable()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")  # closed now
    assert not models.hub_reachable()


def test_pretrained_file_loads_timm_and_fastcifar_state_dicts(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("test_resnet")  # with its 1000-class classifier, as a hub file has
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = build_backbone(Model(name="test_resnet", pretrained_file=str(tmp_path / "w.pth")))
    for k, v in m.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    # with a CIFAR stem the new first conv keeps its own (random) weights; the rest load
    m = build_backbone(Model(name="test_resnet", cifar_stem=True, pretrained_file=str(tmp_path / "w.pth")))
    assert torch.equal(m.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert m.conv1[0].weight.shape != src.conv1[0].weight.shape or not torch.equal(m.conv1[0].weight, src.conv1[0].weight)
    # a fastcifar checkpoint: {"model": Net.state_dict()}
    net = build_model(Model(name="test_resnet"), Head())
    torch.save({"model": net.state_dict(), "recipe": {}}, tmp_path / "last.pt")
    m = build_backbone(Model(name="test_resnet", pretrained_file=str(tmp_path / "last.pt")))
    assert torch.equal(m.layer4[0].conv2.weight, net.backbone.layer4[0].conv2.weight)


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        build_backbone(Model(name="test_resnet", pretrained_file=str(tmp_path / "none.pth")))
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BadInput, match="does not fit"):
        build_backbone(Model(name="test_resnet", pretrained_file=str(tmp_path / "r18.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(BadInput, match="not a readable"):
        build_backbone(Model(name="test_resnet", pretrained_file=str(tmp_path / "junk.pth")))
