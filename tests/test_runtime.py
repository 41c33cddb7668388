"""runtime: the backend flags a run sets are the same for train and bench, follow train.tf32, and come
back when the run ends; StopSignals puts the previous handlers back."""

import signal

import pytest
import torch

from fastcifar import bench, runtime
from fastcifar.errors import BadInput
from helpers import QUIET, backend_flags, fit, info, tiny

import fastcifar.train as T


@pytest.mark.parametrize("deterministic", [False, True])
def test_backend_settings_set_and_restore_every_flag(odd_flags, deterministic):
    with runtime.backend_settings(deterministic):
        inside = backend_flags()
    assert backend_flags() == odd_flags
    if deterministic:
        assert inside["deterministic"] and not inside["cudnn.benchmark"] and inside["CUBLAS_WORKSPACE_CONFIG"]
    else:
        assert inside["cudnn.benchmark"] and inside["cudnn.allow_tf32"] and inside["matmul.allow_tf32"]


def test_bench_measures_under_the_training_flags(store_dir, odd_flags, monkeypatch):
    seen = {}

    def probe(**kw):
        seen["bench"] = backend_flags()
        return []

    monkeypatch.setitem(bench.STAGES, "probe", probe)
    bench.run(stages=["probe"], data_dir=store_dir, device="cpu", log=lambda *a: None)
    with runtime.backend_settings(deterministic=False):
        seen["train"] = backend_flags()
    assert seen["bench"] == seen["train"] and seen["bench"]["cudnn.benchmark"]
    assert backend_flags() == odd_flags


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_training_run_leaves_the_flags_and_handlers_as_it_found_them(store_dir, tmp_path, odd_flags, deterministic):
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    T.train(tiny(train__epochs=1, train__deterministic=deterministic, data__subset=0.2), info(), out=tmp_path / "run",
            data_dir=store_dir, **QUIET)
    assert backend_flags() == odd_flags
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


# ---- precision that fits the machine (runtime.resolve_amp)


def cpuinfo(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_cpu_bf16_reads_the_flags_linux_lists(tmp_path):
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\nbugs\t\t: spectre_v1\n"
    assert runtime.cpu_bf16(cpuinfo(tmp_path, x86.format(""))) is None  # AVX-512 alone converts, it does not compute
    assert runtime.cpu_bf16(cpuinfo(tmp_path, x86.format("avx512_bf16"))) == "avx512_bf16"
    assert runtime.cpu_bf16(cpuinfo(tmp_path, x86.format("amx_tile amx_bf16"))) == "amx_bf16"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm {}\nCPU implementer\t: 0x41\n"
    assert runtime.cpu_bf16(cpuinfo(tmp_path, arm.format("i8mm bf16"))) == "bf16"
    assert runtime.cpu_bf16(cpuinfo(tmp_path, arm.format("i8mm"))) is None
    assert runtime.cpu_bf16(cpuinfo(tmp_path, "model name\t: bf16 avx512_bf16 in a name\n")) is None  # flags only


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_with_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: None)
    amp, why = runtime.resolve_amp(cpu, "auto")
    assert amp == "none" and why.startswith("auto:") and "no native bf16" in why
    amp, why = runtime.resolve_amp(cpu, "bf16")  # as asked, with the reason it is slow here
    assert amp == "bf16" and "emulated" in why and "auto picks fp32" in why
    assert runtime.resolve_amp(cpu, "none") == ("none", "train.amp = none")
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: "amx_bf16")
    assert runtime.resolve_amp(cpu, "auto") == ("bf16", "auto: this CPU has native bf16 (amx_bf16)")
    assert runtime.resolve_amp(cpu, "bf16") == ("bf16", "train.amp = bf16")


def fake_gpus(monkeypatch, major: int, count: int = 2) -> list:
    """torch.cuda as a machine with `count` GPUs of compute capability major.0 sees it; returns the
    list that records each set_device call."""
    import types

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=f"GPU{i}", major=major, minor=0))
    monkeypatch.setattr(torch.version, "hip", None)
    return calls


@pytest.mark.parametrize("major, picked", [(8, "bf16"), (9, "bf16"), (7, "fp16")])
def test_auto_on_a_gpu_is_bf16_with_bf16_tensor_cores_else_fp16(monkeypatch, major, picked):
    fake_gpus(monkeypatch, major)
    amp, why = runtime.resolve_amp(torch.device("cuda", 1), "auto")
    assert amp == picked and f"GPU1 (compute capability {major}.0)" in why
    assert ("GradScaler" in why) == (picked == "fp16")
    assert runtime.resolve_amp(torch.device("cuda"), "fp16")[0] == "fp16"  # what the recipe says, when it says


def test_command_device_makes_the_named_gpu_current(monkeypatch):
    """eval and bench --device cuda:1: DALI and torch put unindexed work on the current device, so it
    must be device 1, not 0."""
    calls = fake_gpus(monkeypatch, 8)
    assert runtime.command_device("cuda:1") == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]
    assert runtime.command_device("cuda") == torch.device("cuda", 0) and calls[-1] == torch.device("cuda", 0)
    assert runtime.command_device("cpu") == torch.device("cpu") and len(calls) == 2
    with pytest.raises(BadInput, match="numbered from 0"):
        runtime.command_device("cuda:2")
    assert len(calls) == 2


# ---- the choices made for multi-rank and multi-scale runs


def test_sync_bn_under_ddp_trains_eagerly_and_says_why():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime.compile_choice(None, gpu, sync_bn_ddp=False) == (True, None)
    assert runtime.compile_choice(None, cpu, sync_bn_ddp=False) == (False, None)
    assert runtime.compile_choice(False, gpu, sync_bn_ddp=True) == (False, None)  # not asked for: nothing to say
    for asked, device in ((None, gpu), (True, cpu), (True, gpu)):
        compiled, why = runtime.compile_choice(asked, device, sync_bn_ddp=True)
        assert not compiled and "model.sync_bn under DDP" in why and "SyncBatchNorm" in why
    assert "train.compile=true" in runtime.compile_choice(True, gpu, sync_bn_ddp=True)[1]


def test_multi_scale_training_turns_cudnn_autotune_off(store_dir, tmp_path, odd_flags):
    """loss.scales: each step's sub-batches have new shapes, which autotune would time anew every time."""
    torch.backends.cudnn.benchmark = True
    during = {"mst": [], "plain": []}  # the flag whenever the run logs (its banner, its epoch lines)
    for name, scales in (("mst", (32, 40)), ("plain", ())):
        T.train(tiny(train__epochs=1, train__deterministic=False, data__subset=0.2, loss__scales=scales), info(),
                out=tmp_path / name, data_dir=store_dir, log=lambda *a: during[name].append(torch.backends.cudnn.benchmark))
    assert during["mst"] and not any(during["mst"]) and during["plain"] and all(during["plain"])
    assert runtime.autotune_note((32, 40)).startswith("cuDNN autotune off: loss.scales = 32,40")
    assert runtime.autotune_note(()) is None


# ---- train.tf32: the flags a run sets


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("tf32, want", [("on", (True, True)), ("conv", (True, False)), ("off", (False, False))])
def test_backend_settings_honour_tf32_and_restore(odd_flags, deterministic, tf32, want):
    torch.backends.cudnn.allow_tf32 = True  # a value "off" must change
    before = backend_flags()
    with runtime.backend_settings(deterministic, tf32):
        inside = backend_flags()
    assert (inside["cudnn.allow_tf32"], inside["matmul.allow_tf32"]) == want
    assert inside["deterministic"] == deterministic
    assert backend_flags() == before


def test_a_training_run_uses_its_tf32_field(store_dir, tmp_path, odd_flags):
    seen = []
    fit(tiny(train__epochs=1, data__subset=0.2, train__tf32="conv"), info(), out=tmp_path / "run", data_dir=store_dir,
        setup=lambda t: seen.append(backend_flags()))
    assert (seen[0]["cudnn.allow_tf32"], seen[0]["matmul.allow_tf32"]) == (True, False)
    assert backend_flags() == odd_flags
