"""model.drop_path (timm's stochastic depth) and model.sync_bn on one process: what each changes in the
network, what it refuses, and what --resume may change. (SyncBN across two ranks: tests/test_ddp.py;
exact resume with drop path: tests/test_train_pins.py.)"""

import pytest
import timm
import torch
from torch import nn

import fastcifar.train as T
from fastcifar.config import Head, Model, to_dict
from fastcifar.errors import BadInput
from fastcifar.models import GlooSyncBatchNorm, build_model, sync_batchnorm
from test_train import tiny


def _outputs_twice(net, x):
    with torch.no_grad():
        return net(x), net(x)


def test_drop_path_makes_residual_blocks_stochastic_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    plain = build_model(Model(name="test_resnet"), Head(), 10).train()
    a, b = _outputs_twice(plain, x)
    assert torch.equal(a, b)  # without drop path a training forward is deterministic (BN uses the batch)
    net = build_model(Model(name="test_resnet", drop_path=0.5), Head(), 10)
    for m in net.modules():  # timm starts each residual branch at zero (its last BN's scale): wake them up
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    rates = [m.drop_prob for m in net.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.5)  # timm ramps it over the blocks, up to drop_path
    a, b = _outputs_twice(net.train(), x)
    assert not torch.equal(a, b)  # blocks dropped at random per sample
    a, b = _outputs_twice(net.eval(), x)
    assert torch.equal(a, b)  # evaluation keeps every block
    assert set(net.state_dict()) == set(plain.state_dict())  # no new weights: checkpoints load either way


def test_drop_path_on_a_model_without_stochastic_depth_is_bad_input():
    with pytest.raises(BadInput, match="model.drop_path = 0.1: timm's vgg11 has no stochastic depth"):
        build_model(Model(name="vgg11", drop_path=0.1), Head(), 10)


def test_cpu_sync_batchnorm_is_plain_batchnorm_without_a_process_group():
    """Every plain BatchNorm becomes a GlooSyncBatchNorm holding the same tensors under the same names;
    alone (no process group) it computes exactly what BatchNorm does, so one code path serves both."""
    torch.manual_seed(0)
    plain = build_model(Model(name="test_resnet"), Head(kind="arcface", embed_dim=16), 10)  # BatchNorm1d in the head
    synced = sync_batchnorm(build_model(Model(name="test_resnet"), Head(kind="arcface", embed_dim=16), 10),
                            torch.device("cpu"))
    synced.load_state_dict(plain.state_dict())
    kinds = {type(m) for m in synced.modules()}
    assert GlooSyncBatchNorm in kinds and not kinds & {nn.BatchNorm1d, nn.BatchNorm2d}
    assert list(synced.state_dict()) == list(plain.state_dict())
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    assert torch.equal(synced.train()(x, y), plain.train()(x, y))
    assert torch.equal(synced.eval()(x), plain.eval()(x))
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))


def test_cpu_sync_batchnorm_refuses_batchnorm_layers_it_cannot_stand_in_for():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4))  # BatchNorm + activation in one layer
    with pytest.raises(BadInput, match="BatchNormAct2d"):
        sync_batchnorm(net, torch.device("cpu"))


def test_resume_may_switch_sync_bn_but_not_what_the_run_means(tmp_path):
    """SyncBN is how the global batch's statistics are gathered across ranks (like the number of ranks,
    which resume may also change); drop path, the EMA and TTA change the run and are refused."""
    done = {"recipe": to_dict(tiny()), "epoch": 1, "schedule_epochs": tiny().train.epochs}
    T.check_resume(tiny(model__sync_bn=True), done, tmp_path)
    for field, value in [("model__drop_path", 0.1), ("train__ema_decay", 0.99), ("train__tta", "flip"),
                         ("train__ema_every", 2)]:
        with pytest.raises(BadInput, match=field.replace("__", ".")):
            T.check_resume(tiny(**{field: value}), done, tmp_path)
