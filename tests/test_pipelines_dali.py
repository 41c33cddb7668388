"""The DALI backend's own contract: one conversion to torch for the CPU and the GPU, what it
relies on in DALI 2.x, only the inputs its graph reads, and conditional branches that no image
of a batch takes (DALI runs them on an empty batch). DALI in its CPU mode here; the GPU check
(`fastcifar doctor`) repeats the agreement on a GPU."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

from fastcifar.errors import BadInput
from fastcifar.pipelines import AugSpec, make_loader
from fastcifar.pipelines.draw import batch_rng, draw
from fastcifar.pipelines.spec import tutorial_oneof

nvidia_dali = pytest.importorskip("nvidia.dali", reason="DALI does not import here")
from nvidia.dali import fn, pipeline_def  # noqa: E402

from fastcifar.pipelines import dali as pd  # noqa: E402


def test_to_torch_converts_a_whole_batch():
    """A TensorList's shape() is one shape per image, which no torch tensor has (so feeding it to
    DALI's feed_ndarray fails on the CPU as on the GPU); to_torch gives the [N, H, W, C] tensor,
    dtype kept, values equal, for images and labels alike."""
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    labels = np.arange(5, dtype=np.int64) * 7

    @pipeline_def
    def batch():
        return tuple(fn.external_source(source=lambda: (images, labels), num_outputs=2, batch=True))

    pipe = batch(batch_size=5, num_threads=1, device_id=None)
    pipe.build()
    out_images, out_labels = pipe.run()
    assert out_images.shape() == [(6, 7, 3)] * 5
    x, y = pd.to_torch(out_images), pd.to_torch(out_labels)
    assert x.shape == (5, 6, 7, 3) and x.dtype == torch.uint8 and np.array_equal(x.numpy(), images)
    assert y.shape == (5,) and y.dtype == torch.int64 and np.array_equal(y.numpy(), labels)


def test_kept_batches_are_not_overwritten(store):
    """On the CPU a float32 batch stays in DALI's memory (no copy): batches held while the pipeline
    runs on stay as they were when yielded (DALI 2.x's dynamic executor never reuses an output)."""
    spec = AugSpec(pad_crop=4, hflip=0.5, **tutorial_oneof(0.5))
    loader = make_loader(store, "train", spec, batch_size=50, backend="dali", seed=3)
    copies = [(x.clone(), y.clone()) for x, y in loader]
    kept = list(loader)
    assert len(kept) == len(copies) == len(loader)
    for (xa, ya), (xb, yb) in zip(kept, copies):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_gpus_batch_is_copied_into_torch_memory_and_dalis_held_until_the_next_is_taken(store, monkeypatch):
    """With the GPU's setting (copy on), run here on the CPU: no yielded tensor is in DALI's memory,
    the values are those of the uncopied batches, and DALI's outputs of a batch are held until the
    next batch is taken (on a GPU, until torch's stream has also run the copies), then released;
    none are held after the epoch."""
    make = lambda: make_loader(store, "train", AugSpec(hflip=0.5, pad_crop=2), batch_size=50, backend="dali", seed=3,
                               sizes=(32, 40))
    want = list(make())
    spans = []  # DALI's memory: [start, end) of each view to_torch made for the batch being taken
    view = pd.to_torch

    def spy(batch):
        t = view(batch)
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(pd, "to_torch", spy)
    loader = make()
    assert loader.impl.copy is False  # the CPU's setting: in DALI's memory, where nothing reads it later
    loader.impl.copy = True
    it, held = iter(loader), []
    for (p32, p40), q in want:
        spans.clear()
        (x32, x40), y = next(it)
        assert len(spans) == 3  # both views and the labels came from DALI (and are held: not reused yet)
        for t in (x32, x40, y):
            assert not any(a <= t.data_ptr() < b for a, b in spans), "a yielded tensor is in DALI's memory"
        assert torch.equal(x32, p32) and torch.equal(x40, p40) and torch.equal(y, q)
        assert x32.is_contiguous(memory_format=torch.channels_last) and x40.dtype == torch.float32
        assert len(loader.impl.held) == 1  # this batch's outputs only: the previous ones are released
        held.append(loader.impl.held[0][0])
    with pytest.raises(StopIteration):
        next(it)
    assert len({id(h) for h in held}) == len(held) == len(loader) and not loader.impl.held


def _input_threads(before=()) -> list:
    """The backend's input threads alive now, but those in `before`."""
    return [t for t in threading.enumerate() if t.name == "fastcifar-dali-inputs" and t not in before]


def test_host_inputs_are_made_ahead_in_a_thread_that_ends_with_the_epoch(store, monkeypatch):
    """The memmap reads and draws of the next batches are made by a thread, AHEAD batches before
    DALI asks; an early break (or Ctrl-C) stops and joins it, and the next epoch is still exact."""
    made, drawn, taken, feed = [], pd.draw, [], pd._Feed.__call__
    monkeypatch.setattr(pd, "draw", lambda *a: (made.append(threading.current_thread().name), drawn(*a))[1])
    monkeypatch.setattr(pd._Feed, "__call__", lambda self: (taken.append(1), feed(self))[1])  # DALI asks
    spec = AugSpec(pad_crop=4, hflip=0.5)
    loader = make_loader(store, "train", spec, batch_size=25, backend="dali", seed=5)
    want = [x for x, _ in make_loader(store, "train", spec, batch_size=25, backend="dali", seed=5)]
    made.clear()
    taken.clear()
    before = _input_threads()
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 30
    while len(made) < len(taken) + pd.AHEAD and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # had the thread no bound, it would go on
    # AHEAD ready in the queue, and at most one more made, waiting for room
    assert len(taken) + pd.AHEAD <= len(made) <= len(taken) + pd.AHEAD + 1 < len(loader)
    assert set(made) == {"fastcifar-dali-inputs"}
    assert len(_input_threads(before)) == 1
    del it  # an early break: the epoch's generator is closed
    assert not _input_threads(before)
    assert all(torch.equal(x, w) for (x, _), w in zip(loader, want, strict=True)) and not _input_threads(before)


def test_an_error_made_ahead_is_raised_by_the_loader_and_ends_the_thread(store, monkeypatch):
    """A failure while making a batch's inputs ahead (here: the draws of the third batch) is raised
    where the loader is iterated, as itself, and leaves no thread behind."""
    calls, drawn = [], pd.draw

    def fail_third(*a):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("the third batch cannot be read")
        return drawn(*a)

    monkeypatch.setattr(pd, "draw", fail_third)
    loader = make_loader(store, "train", AugSpec(hflip=0.5), batch_size=25, backend="dali", seed=5)
    before = _input_threads()
    with pytest.raises(OSError, match="the third batch cannot be read"):
        list(loader)
    assert not _input_threads(before)


@pytest.mark.parametrize("backend", ["dali", "auto"])
def test_dali_older_than_2_is_bad_input(store, monkeypatch, backend):
    """A DALI 1.x (as in older NGC containers) cannot hand batches over as this backend does: a
    clear message naming the installed version and the fix, before any pipeline is built."""
    monkeypatch.setattr(nvidia_dali, "__version__", "1.44.0")
    with pytest.raises(BadInput, match=r"DALI >= 2\.0.*DALI 1\.44\.0 is installed.*data\.backend=torch"):
        make_loader(store, "test", AugSpec(), 50, backend=backend)


def test_dali_version_that_does_not_parse_is_refused(monkeypatch):
    """A version string whose major part is not a number (a local build, say) is not taken for a
    new enough DALI: the same clear refusal, naming what is installed."""
    monkeypatch.setattr(nvidia_dali, "__version__", "custom-build")
    with pytest.raises(BadInput, match=r"DALI >= 2\.0.*DALI custom-build is installed"):
        pd.check_dali()


SPECS = {
    "eval": (AugSpec(), ("images", "labels")),
    "flip": (AugSpec(hflip=0.5), ("images", "labels", "flip")),
    "crop+flip": (AugSpec(pad_crop=4, hflip=0.5), ("images", "labels", "shift", "flip")),
    "jitter": (AugSpec(jitter_p=0.5), ("images", "labels", "jitter", "colour", "offset")),
    "erase": (AugSpec(erase_p=0.5), ("images", "labels", "erase", "anchor", "shape")),
    "rrc": (AugSpec(rrc_scale=(0.3, 1.0)), ("images", "labels", "warp", "affine")),
    "oneof off": (AugSpec(**tutorial_oneof(0.0), hflip=0.5), ("images", "labels")),  # listed ops ignore their own p
    "oneof": (AugSpec(**tutorial_oneof(1.0)),
              ("images", "labels", "warp", "affine", "flip", "jitter", "colour", "offset", "erase", "anchor", "shape")),
    "trivialaugment": (AugSpec(policy="trivialaugment", pad_crop=2),
                       ("images", "labels", "warp", "affine", "shift", "op0", "lin0", "lin_c0", "sharp0", "thresh0",
                        "bits0")),
    "randaugment": (AugSpec(policy="randaugment", hflip=0.5),
                    ("images", "labels", "warp", "affine", "flip", "op0", "lin0", "lin_c0", "sharp0", "thresh0", "bits0",
                     "op1", "lin1", "lin_c1", "sharp1", "thresh1", "bits1")),
}


@pytest.mark.parametrize("name", SPECS)
def test_graph_is_fed_only_what_it_reads(store, name):
    """The external source feeds the inputs the spec's graph reads and no more: DALI warns about
    (and the host would compute for nothing) any output it does not read."""
    spec, names = SPECS[name]
    augment = name != "eval"
    assert pd.graph_inputs(spec, augment) == names
    loader = make_loader(store, "train", spec, batch_size=50, backend="dali", augment=augment, seed=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        next(iter(loader))
    assert not [str(w.message) for w in seen if "external source" in str(w.message)]


def _gpu_graph_ops(spec: AugSpec, augment: bool, sizes=(32, 224)):
    """The GPU graph of a spec as DALI's Python front end defines it, without building it (building
    needs CUDA): [(operator, device, [input devices])] and the output devices."""
    import re

    pipe = pd.graph(pd._Feed(), spec, augment, sizes, (0.5,) * 3, (0.25,) * 3, True, batch_size=4,
                    num_threads=1, device_id=None, exec_dynamic=True)
    pipe._build_graph()  # DALI's own first step of build(): the Python graph, device placement included
    ops = []
    for op in pipe._ops:
        text = str(op.spec)
        name = re.match(r"OpSpec for (\w+)", text).group(1)
        device = re.search(r"^\s*device: (\w+)", text, re.M).group(1)
        ops.append((name, device, [i.device for i in op.inputs]))
    return ops, [o.device for o in pipe._graph_outputs]


@pytest.mark.parametrize("name", SPECS)
def test_gpu_graph_runs_every_image_op_on_the_gpu(name):
    """With a GPU the same graph moves its image ops to the GPU. CI has none, so this checks what
    DALI's Python front end places there, which is what a GPU build would run: every output is on
    the GPU, every GPU op has a GPU kernel in this DALI (a CPU-only op on GPU data would only fail
    on a GPU machine), and the CPU keeps the external source and the per-image draws alone (the
    branch predicates DALI requires on the CPU, and the constants)."""
    spec, _ = SPECS[name]
    augment = name != "eval"
    ops, outputs = _gpu_graph_ops(spec, augment)
    assert outputs == ["gpu"] * 3  # 32 px, 224 px, labels
    gpu_kernels = set(nvidia_dali.backend.RegisteredGPUOps(True))
    on_gpu = {n for n, device, _ in ops if device == "gpu"}
    assert on_gpu and on_gpu <= gpu_kernels, on_gpu - gpu_kernels
    assert "Resize" in on_gpu and "CropMirrorNormalize" in on_gpu
    cpu_only = {"ExternalSource", "_conditional__Split", "_ArithmeticGenericOp", "Constant", "_TensorSubscript"}
    assert {n for n, device, _ in ops if device == "cpu"} <= cpu_only
    for n, device, inputs in ops:
        if device == "cpu":  # nothing goes back from the GPU: CPU ops read CPU data only
            assert set(inputs) <= {"cpu"}, (n, inputs)
    # the images are split per image on the GPU, steered by a CPU predicate (its last input)
    splits = [inputs for n, device, inputs in ops if n == "_conditional__Split" and device == "gpu"]
    assert all(inputs[-1] == "cpu" for inputs in splits)
    branched = {"warp", "jitter", "erase", "op0"} & set(pd.graph_inputs(spec, augment))
    assert bool(splits) == bool(branched), (splits, branched)


from fastcifar.pipelines import agree  # noqa: E402


@pytest.mark.parametrize("name", agree.RARE)
def test_branches_no_image_takes(store, name):
    """Batches of 1-4 images over two seeds and two epochs, where an op's branch is often taken by
    no image of the batch (and sometimes by some): DALI gives the torch backend's images, within
    1/255, batch for batch (pipelines/agree.py; `fastcifar doctor` repeats it on the machine at hand)."""
    (row,) = agree.branches(store, torch.device("cpu"), specs={name: agree.RARE[name]}, seeds=(0, 1))
    assert row["ok"], row
    spec = agree.RARE[name]
    if spec.rrc_scale:  # nearly every image warps: the whole-pixel branch is the one left empty
        assert "pixel moves" in row["empty"] and "warp" in row["taken"]
    else:  # every branch this spec has (a policy: each step's colour ops too) was skipped by a whole batch, and taken
        has = set(agree.branch_masks(spec, draw(spec, 1, batch_rng(0, 0, 0, 0))))
        assert len(has) >= 5 * spec.policy_steps and has <= set(row["empty"]) & set(row["taken"]), row
