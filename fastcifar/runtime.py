"""Where and how a run executes, shared by `train`, `eval` and `bench`: the device and the process
group, precision (what train.amp=auto picks for a device, autocast and the AMP dtypes), whether to
compile, memory format, the backend flags (cuDNN autotune, TF32, deterministic kernels) as a
context manager that puts every flag back."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

from fastcifar import dist as fdist
from fastcifar.errors import BadInput

# train.amp -> autocast dtype (None = fp32). fp16 also needs a GradScaler; bf16 has fp32's range.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)  # train.amp: auto = resolve_amp's pick for the device
# CPU features that do bf16 arithmetic in hardware, as Linux's /proc/cpuinfo names them: x86
# AVX512-BF16 and AMX-BF16, aarch64 FEAT_BF16. Without one, bf16 autocast is emulated in software
# and runs slower than fp32 (`fastcifar bench --device cpu --stage train_step` shows both)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str | None:
    """The CPU feature (CPU_BF16_FLAGS) that gives this CPU native bf16 arithmetic, or None."""
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:  # not Linux: what torch itself checks (x86 only)
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return "avx512_bf16" if probe is not None and platform.machine().lower() in ("x86_64", "amd64") and probe() \
            else None
    fields = (line.partition(":") for line in lines)  # x86 names them flags, aarch64 features
    flags = {f for k, _, v in fields if k.strip().lower() in ("flags", "features") for f in v.split()}
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def resolve_amp(device: torch.device, amp: str) -> tuple[str, str]:
    """(precision, why) that train.amp means on device: "auto" becomes bf16, fp16 or none (fp32)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        native = bool(torch.version.hip) or props.major >= 8  # Ampere (8.0) and later have bf16 tensor cores
        gpu = f"{props.name} (compute capability {props.major}.{props.minor})"
        if amp != "auto":
            return amp, f"train.amp = {amp}" + (f"; {gpu} has no bf16 tensor cores (8.0 and later do): "
                                               f"train.amp=auto picks fp16" if amp == "bf16" and not native else "")
        if native:
            return "bf16", f"auto: {gpu} has bf16 tensor cores"
        return "fp16", f"auto: {gpu} has no bf16 tensor cores: fp16 with a loss-scaling GradScaler"
    flag = cpu_bf16()
    emulated = "this CPU has no native bf16 (AVX512-BF16, AMX or ARM BF16): emulated, slower than fp32"
    if amp != "auto":
        picks = f"; {emulated}, so train.amp=auto picks fp32" if amp == "bf16" and flag is None else ""
        return amp, f"train.amp = {amp}{picks}"
    return ("bf16", f"auto: this CPU has native bf16 ({flag})") if flag is not None else ("none", f"auto: {emulated}")


@contextlib.contextmanager
def distributed(device: str):
    """(torch.device, rank, world size) for `train.device`, in torchrun's process group if any."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise BadInput(f"train.device = {device!r} but torch sees no CUDA device; use train.device=cpu or auto.")
    rank, world, local_rank = fdist.init("cuda" if cuda else "cpu")
    dev = torch.device("cpu")
    try:
        if cuda:
            index = int(device.split(":")[1]) if device.startswith("cuda:") and world == 1 else local_rank
            if index >= torch.cuda.device_count():
                raise BadInput(f"train.device = {device!r}, but torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s), numbered from 0; use train.device=cuda or auto.")
            dev = torch.device("cuda", index)
            torch.cuda.set_device(dev)
        yield dev, rank, world
    finally:
        fdist.destroy()


# train.tf32 -> (cuDNN convolutions, fp32 matmuls) may run on TF32 tensor cores (10-bit mantissa).
# "conv" is PyTorch's own default, which the tutorial's Lightning "precision 32" ran under.
TF32 = {"on": (True, True), "conv": (True, False), "off": (False, False)}


@contextlib.contextmanager
def backend_settings(deterministic: bool, tf32: str = "on", autotune: bool = True):
    """The kernel-choice flags a run sets, restored on exit: deterministic kernels or cuDNN autotune
    (unless autotune=False: see autotune_note), and where fp32 may use TF32 (TF32[tf32])."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            cudnn.benchmark = False
        else:
            cudnn.benchmark = autotune  # fixed shapes: cuDNN times its kernels once per shape, keeps the fastest
        cudnn.allow_tf32, matmul.allow_tf32 = TF32[tf32]
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[1:4]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def autotune_note(scales: tuple) -> str | None:
    """Why cuDNN autotune is off for a run, or None: multi-scale training (loss.scales) brings new
    sub-batch shapes nearly every step, and autotune would time every kernel again for each."""
    return f"cuDNN autotune off: loss.scales = {','.join(map(str, scales))} gives each step new sub-batch shapes" \
        if scales else None


def compile_choice(compile: bool | None, device: torch.device, sync_bn_ddp: bool) -> tuple[bool, str | None]:
    """(compiled, why not when asked) for train.compile (None: on with CUDA); sync_bn_ddp trains eagerly."""
    wanted = device.type == "cuda" if compile is None else compile
    if wanted and sync_bn_ddp:
        return False, (f"{'train.compile=true' if compile else 'compile'} set aside: model.sync_bn under DDP trains "
                       f"eagerly (torch.compile breaks its graph at each SyncBatchNorm and is unreliable with DDP + "
                       f"SyncBatchNorm); model.sync_bn=false compiles")
    return wanted, None


def autocast(device: torch.device, amp: str):
    """A factory of autocast contexts for a resolved `train.amp` (fp32: a disabled one)."""
    dtype = AMP_DTYPES[amp]
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (channels_last: faster convolutions on tensor cores) or the default NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


def out_of_memory(e: BaseException) -> bool:
    """Whether e is a failed allocation: torch.OutOfMemoryError on a GPU, a RuntimeError on a CPU."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


@contextlib.contextmanager
def out_of_memory_as(error):
    """A failed allocation in the block raises error(e), a BadInput saying what to lower, instead."""
    try:
        yield
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise error(e) from None


def memory_error(e: RuntimeError) -> str:
    """The first line of torch's out-of-memory message (what it tried to allocate), without its advice."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
    first = first.split("DefaultCPUAllocator: ", 1)[-1]  # the CPU's: after "[enforce fail at alloc_cpu.cpp:N] ..."
    return first[:200].rstrip(". ")


def command_device(spec: str | None, option: str = "--device") -> torch.device:
    """The device a command's --device names (None or auto: cuda if any), made current, or BadInput."""
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise BadInput(f"{option} {spec!r} is not a device; use auto, cpu, cuda or cuda:N.")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"{option} {spec!r}: use auto, cpu, cuda or cuda:N.")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise BadInput(f"{option} {dev} asked for a GPU, but torch sees no CUDA device here; use {option} cpu.")
    if (dev.index or 0) >= torch.cuda.device_count():
        raise BadInput(f"{option} {dev}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    # the current device: where DALI and torch put what names no index, and whose stream they use
    dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    return dev
