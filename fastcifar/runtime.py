"""Where and how a run executes, shared by `train`, `eval` and `bench`: the device and the process
group, precision (autocast and the AMP dtypes), memory format, the backend flags (cuDNN autotune,
TF32, deterministic kernels) as a context manager that puts every flag back, and Ctrl-C/SIGTERM
as a request to stop after the current step."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading

import torch

from fastcifar import BadInput, stop_signals
from fastcifar import dist as fdist

# train.amp -> autocast dtype (None = fp32). fp16 also needs a GradScaler; bf16 has fp32's range.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def wants_cuda(device: str) -> bool:
    """Whether a `train.device` / `--device` value asks for a GPU ("auto" does when there is one)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@contextlib.contextmanager
def distributed(device: str):
    """(torch.device, rank, world size) for `train.device`, inside the torchrun process group when
    launched by torchrun (one process per GPU: cuda:<local rank>); leaves the group on exit."""
    cuda = wants_cuda(device)
    if cuda and not torch.cuda.is_available():
        raise BadInput(f"train.device = {device!r} but torch sees no CUDA device; use train.device=cpu or auto.")
    rank, world, local_rank = fdist.init("cuda" if cuda else "cpu")
    try:
        if cuda:
            index = int(device.split(":")[1]) if device.startswith("cuda:") and world == 1 else local_rank
            if index >= torch.cuda.device_count():
                raise BadInput(f"train.device = {device!r}, but torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s), numbered from 0; use train.device=cuda or auto.")
            dev = torch.device("cuda", index)
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        yield dev, rank, world
    finally:
        fdist.destroy()


# train.tf32 -> (cuDNN convolutions, fp32 matmuls) may run on TF32 tensor cores (10-bit mantissa).
# "conv" is PyTorch's own default, which the tutorial's Lightning "precision 32" ran under.
TF32 = {"on": (True, True), "conv": (True, False), "off": (False, False)}


@contextlib.contextmanager
def backend_settings(deterministic: bool, tf32: str = "on"):
    """The kernel-choice flags a run sets, restored on exit: deterministic kernels or cuDNN autotune,
    and where fp32 may use TF32 (TF32[tf32])."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            cudnn.benchmark = False
        else:
            cudnn.benchmark = True  # fixed shapes: cuDNN times its kernels once and keeps the fastest
        cudnn.allow_tf32, matmul.allow_tf32 = TF32[tf32]
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved[1:4]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def autocast(device: torch.device, amp: str):
    """A factory of autocast contexts for `train.amp` (fp32 = a disabled one): `with autocast(): ...`."""
    dtype = AMP_DTYPES[amp]
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (channels_last: faster convolutions on tensor cores) or the default NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


class StopSignals:
    """Ctrl-C / SIGTERM / SIGHUP as a request to stop after the current step (`requested`); a second
    one quits at once (KeyboardInterrupt). A context manager: the previous handlers come back on
    exit. Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self, say=print):
        self.signal, self.say, self._saved = None, say, {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        self.say(f"\n{signal.Signals(signum).name}: saving last.pt after this step (again to quit at once).")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in stop_signals()}
        return self

    def __exit__(self, *exc):
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        return False


def out_of_memory(e: BaseException) -> bool:
    """Whether e is an allocation that failed: torch.OutOfMemoryError on a GPU; on a CPU torch
    raises a plain RuntimeError from its allocator instead."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(e))


@contextlib.contextmanager
def out_of_memory_as(error):
    """Run the block; an allocation that fails in it (out_of_memory) raises error(e), a BadInput
    saying what to lower, instead of torch's allocator traceback."""
    try:
        yield
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise error(e) from None


def memory_error(e: RuntimeError) -> str:
    """The first line of torch's out-of-memory message (what it tried to allocate), without the
    allocator advice that follows it."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
    first = first.split("DefaultCPUAllocator: ", 1)[-1]  # the CPU's: after "[enforce fail at alloc_cpu.cpp:N] ..."
    return first[:200].rstrip(". ")


def command_device(spec: str | None, option: str = "--device") -> torch.device:
    """The device a command's --device names (None or auto: cuda when torch sees one, else cpu),
    or BadInput saying why it cannot be used here (eval and bench; training's is `distributed`)."""
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise BadInput(f"{option} {spec!r} is not a device; use auto, cpu, cuda or cuda:N.")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"{option} {spec!r}: use auto, cpu, cuda or cuda:N.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"{option} {dev} asked for a GPU, but torch sees no CUDA device here; use {option} cpu.")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise BadInput(f"{option} {dev}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    return dev
