"""`fastcifar bench` stages train_step and end_to_end, and the headroom ratio; bad input (a --device,
a --json or --plot path that would lose a file) is exit 2 before anything runs. Behaviour only:
no figure is asserted (speed is the bench's job, not the tests')."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fastcifar import bench
from fastcifar.errors import BadInput
from helpers import cli, contents, one_paragraph
from fastcifar.pipelines.loader import dali_available

ROW_KEYS = {"stage", "backend", "image_size", "batch_size", "device", "images_per_sec"}


def test_train_step_climbs_the_ladder(store, tiny_models, short_bench_plans):
    rows = bench.run(stages=["train_step"], quick=True, data_dir=store.dir, device="cpu", log=lambda *_: None)
    assert all(ROW_KEYS <= set(r) and r["stage"] == "train_step" and r["images_per_sec"] > 0 for r in rows)
    # --quick on a CPU leaves the compiled step out (a first compile costs ~40 s here)
    ladder = [(r["compiled"], r["memory_format"], r["precision"]) for r in rows if r["image_size"] == 32]
    assert ladder == [(False, "NCHW", "fp32"), (False, "channels_last", "fp32"), (False, "channels_last", "amp")]
    assert {r["image_size"]: r["batch_size"] for r in rows} == {32: 8, 224: 2}
    assert all(r["warmup_seconds"] >= 0 for r in rows)
    full = bench._ladder(torch.device("cpu"), quick=False)
    assert full[-1] == (True, True, True) and len(full) == 4  # the full run compiles, after the three eager settings


def test_a_rate_under_one_image_per_second_is_kept_and_divides_the_headroom(store, tiny_models, monkeypatch):
    """A slow machine's step (resnet50 at 224 on a small CPU: under 1 img/s) is a rate, not 0: the row
    keeps three significant figures and the headroom divides by it."""
    monkeypatch.setattr(bench, "_time_steps", lambda *a, **k: (0.4321, 0.0))
    rows = bench.run(stages=["train_step"], quick=True, data_dir=store.dir, device="cpu", sizes=[32],
                     settings=["nchw_fp32"], log=lambda *_: None)
    assert [r["images_per_sec"] for r in rows] == [0.432]
    pipe = {"stage": "pipeline", "backend": "torch", "image_size": 32, "aug": "oneof", "images_per_sec": 1000}
    (room,) = bench.headroom(rows + [pipe])
    assert room["headroom"] == round(1000 / 0.432, 2)
    assert bench.img_s(1234.6) == 1235 and bench.img_s(12.345) == 12.3


def test_a_compiled_bench_of_two_sizes_compiles_one_static_graph_per_size(store, tiny_models, aot_eager,
                                                                          monkeypatch):
    """Each compiled step is a static graph of its own: at 224 then 32 px in one process no step
    recompiles (dynamo caches per code object, which every model of a kind shares, so the second
    size used to recompile into a dynamic-shape graph and be timed as one), and end_to_end's step
    takes every loader's batches without recompiling (graphs to aot_eager: conftest's fixture)."""
    monkeypatch.setitem(bench.STEP_PLAN, "quick", (1, 1, 2))  # 3 steps per graph: a recompile shows by the 2nd
    loaders = ["tutorial", "torch"] + (["dali"] if dali_available() else [])
    run = lambda stage, sizes: bench.run(stages=[stage], quick=True, sizes=sizes, settings=["compiled_cl_amp"],
                                         backends=loaders, batch_size=2, data_dir=store.dir, device="cpu",
                                         log=lambda *_: None)
    with torch._dynamo.config.patch(error_on_recompile=True):
        steps, fed = run("train_step", [224, 32]), run("end_to_end", [32])
    assert [(r["image_size"], r["batch_size"], r["compiled"]) for r in steps] == [(224, 2, True), (32, 2, True)]
    assert [(r["backend"].split("-")[0], r["compiled"]) for r in fed] == [(b, True) for b in loaders]
    assert aot_eager == [{"dynamic": False}] * 3  # a step per size, and end_to_end's


def test_train_step_trains():
    """The timed step is a real training step: on a fixed batch the loss goes down."""
    torch.manual_seed(0)
    step = bench.make_train_step("test_resnet", torch.device("cpu"), compiled=False, channels_last=True, amp=True)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 100, (8,))
    losses = [step(images, labels).item() for _ in range(8)]
    assert losses[-1] < losses[0]


def test_end_to_end_and_headroom(store, tiny_models, short_bench_plans, tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.run(stages=["pipeline", "train_step", "end_to_end"], quick=True, json_path=out,
                     backends=["tutorial", "torch"], batch_size=16, data_dir=store.dir, device="cpu", log=lambda *_: None,
                     plot_path=tmp_path / "pics" / "bench.png")
    assert (tmp_path / "pics" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    e2e = [r for r in rows if r["stage"] == "end_to_end"]
    assert [(r["model"], r["image_size"], r["backend"]) for r in e2e] == [
        ("test_resnet", s, b) for s in (32, 224) for b in ("tutorial", "torch")]
    assert all(r["images_per_sec"] > 0 and r["precision"] == "amp" for r in e2e)  # the last (fastest) setting
    # the step alone is fed what the loader feeds it (bf16 under AMP): one graph, the data the only difference
    fed = {(r["image_size"], r["precision"]): r["input_dtype"] for r in rows if r["stage"] == "train_step"}
    assert fed[(32, "fp32")] == "float32" and fed[(32, "amp")] == "bfloat16"
    assert all(r["input_dtype"] == fed[(r["image_size"], "amp")] for r in e2e)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["meta"]["complete"] is True
    pipe = {(r["backend"], r["image_size"]): r["images_per_sec"] for r in rows
            if r["stage"] == "pipeline" and r["aug"] == "oneof"}
    step = {s: max(r["images_per_sec"] for r in rows if r["stage"] == "train_step" and r["image_size"] == s)
            for s in (32, 224)}
    room = saved["headroom"]
    assert sorted((h["pipeline"], h["image_size"]) for h in room) == sorted(pipe)  # one model here
    for h in room:
        assert h["pipeline_img_s"] == pipe[(h["pipeline"], h["image_size"])]
        assert h["train_step_img_s"] == step[h["image_size"]]
        assert h["headroom"] == round(h["pipeline_img_s"] / h["train_step_img_s"], 2)
        assert h["end_to_end_img_s"] == next(r["images_per_sec"] for r in e2e
                                            if (r["backend"], r["image_size"]) == (h["pipeline"], h["image_size"]))


def test_size_picks_the_sides_and_their_order(store, tiny_models, short_bench_plans):
    rows = bench.run(stages=["pipeline", "train_step"], quick=True, backends=["torch"], sizes=[224, 32, 224],
                     settings=["cl_amp"], batch_size=16, data_dir=store.dir, device="cpu", log=lambda *_: None)
    assert [r["image_size"] for r in rows if r["stage"] == "train_step"] == [224, 32]
    assert [r["image_size"] for r in rows if r["stage"] == "pipeline"] == [224] * 4 + [32] * 4
    with pytest.raises(BadInput, match="--size 64: the bench measures 32 or 224 px"):
        bench.run(stages=["pipeline"], sizes=[64], data_dir=store.dir, device="cpu", log=lambda *_: None)


def test_a_store_too_small_for_any_size_is_refused_before_measuring(store):
    """224 px fits the 500-image store and 32 px does not (pipeline: 155 batches of 4; end_to_end: 55
    of 64): refused before the 224 px rows are measured, not after them."""
    said = []
    with pytest.raises(BadInput, match="reads 620 train images in one epoch at 32 px, but the store has 500"):
        bench.run(stages=["pipeline"], backends=["torch"], sizes=[224, 32], batch_size=4, data_dir=store.dir,
                  device="cpu", log=said.append)
    assert not [line for line in said if "pipeline torch" in line]
    with pytest.raises(BadInput, match="end_to_end needs 55 batches of 64 in one epoch at 32 px; the store has 500"):
        bench.run(stages=["end_to_end"], backends=["torch"], sizes=[224, 32], models=["test_resnet"],
                  settings=["cl_amp"], data_dir=store.dir, device="cpu", log=said.append)
    assert not [line for line in said if "end_to_end" in line]


def test_cli_bench_writes_json_atomically(store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli("bench", "--stage", "pipeline", "--quick", "--backend", "torch", "--batch-size", "16",
                       "--data-dir", store.dir, "--device", "cpu", "--json", blocker / "b.json")
    assert code == 2 and "Cannot write" in err and "Traceback" not in err


def test_json_is_rewritten_after_every_row_and_a_stop_keeps_the_rows(store, tmp_path, monkeypatch):
    """Each row reaches --json as soon as it is measured (meta.complete false until the end); Ctrl-C
    prints the tables of the rows so far, writes them, and raises Stopped."""
    out, seen, said = tmp_path / "bench.json", [], []
    row = {"stage": "pipeline", "backend": "torch", "image_size": 32, "batch_size": 16, "device": "cpu",
           "images_per_sec": 1000, "aug": "oneof"}

    def stage(**_):
        for k in range(3):
            yield {**row, "images_per_sec": 1000 + k}
            saved = json.loads(out.read_text())  # written before the next row is measured
            seen.append((len(saved["rows"]), saved["meta"]["complete"]))
        raise KeyboardInterrupt  # as Ctrl-C in the middle of the fourth row

    monkeypatch.setitem(bench.STAGES, "pipeline", stage)
    with pytest.raises(bench.Stopped, match="after 3 rows"):
        bench.run(stages=["pipeline", "train_step"], json_path=out, quick=True, data_dir=store.dir, device="cpu",
                  log=said.append)
    assert seen == [(1, False), (2, False), (3, False)]
    saved = json.loads(out.read_text())
    assert [r["images_per_sec"] for r in saved["rows"]] == [1000, 1001, 1002] and saved["meta"]["complete"] is False
    text = "\n".join(said)
    assert "pipeline:" in text and ("1002" in text or "1,002" in text)  # the stopped stage's table
    assert "train_step:" not in text  # a stage that never started has no table


def test_meta_names_the_data_set_of_the_store(tmp_path, monkeypatch):
    """A bench on a CIFAR-10 store says so in meta.store (the tables' caption), not cifar100."""
    from cifar_files import write_official
    from fastcifar.data import prepare

    src, _ = write_official(tmp_path / "src", n_train=50, n_test=10, dataset="cifar10")
    prepare(tmp_path / "c10", source=src, verify=False, dataset="cifar10", log=lambda *_: None)
    monkeypatch.setitem(bench.STAGES, "pipeline", lambda **_: iter(()))
    bench.run(stages=["pipeline"], json_path=tmp_path / "b.json", quick=True, data_dir=tmp_path / "c10", device="cpu",
              log=lambda *_: None)
    assert json.loads((tmp_path / "b.json").read_text())["meta"]["store"] == "cifar10"


def test_cli_bench_stopped_by_sigterm_keeps_what_it_measured(store, tmp_path):
    """A job's time limit (SIGTERM) in the middle of a bench: exit 130, no traceback, the rows
    measured so far printed and in --json."""
    out = tmp_path / "bench.json"
    # the tutorial's path starts worker processes for each row: seconds a row, so the signal lands mid-bench
    p = subprocess.Popen([sys.executable, "-m", "fastcifar", "bench", "--stage", "pipeline", "--quick", "--backend",
                          "tutorial", "--backend", "torch", "--batch-size", "16", "--data-dir", str(store.dir),
                          "--device", "cpu", "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not out.is_file() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert p.poll() is None, "the bench ended before a row was written; give it more work"
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "Stopped after" in stdout and "meta.complete: false" in stdout
    saved = json.loads(out.read_text())
    assert saved["meta"]["complete"] is False and 1 <= len(saved["rows"]) < 16  # 2 backends x 2 sizes x 4 augs
    assert all(r["stage"] == "pipeline" and r["images_per_sec"] > 0 for r in saved["rows"])


def test_cli_bench_refuses_a_plot_path_it_cannot_write_before_measuring(store, tmp_path):
    code, out, err = cli("bench", "--stage", "pipeline", "--quick", "--backend", "torch", "--data-dir", store.dir,
                         "--device", "cpu", "--plot", tmp_path)
    assert code == 2 and one_paragraph(err, "--plot", "is a directory") and "pipeline" not in out  # however it wraps


def test_the_picture_draws_the_pipeline_table_and_the_headroom():
    """From the committed CPU bench: a bar per pipeline row, the tutorial's path hatched, and a
    headroom panel with the 1x line."""
    saved = json.loads((Path(__file__).resolve().parent.parent / "bench" / "cpu_bench.json").read_text())
    fig = bench.figure(saved)
    pipe_ax, room_ax = fig.axes
    pipe = [r for r in saved["rows"] if r["stage"] == "pipeline"]
    bars = [p for p in pipe_ax.patches if p.get_height()]  # a cell not measured (the tutorial's policies) is empty
    assert sorted(round(b.get_height()) for b in bars) == sorted(r["images_per_sec"] for r in pipe)
    assert {r["aug"] for r in pipe} == {"none", "oneof", "trivialaugment", "randaugment"}  # every policy drawn
    tutorial = [b for b in bars if b.get_gid() == "tutorial"]
    assert len(tutorial) == 4 and all(b.get_hatch() for b in tutorial)
    assert not any(b.get_hatch() for b in bars if b.get_gid() != "tutorial")
    assert "tutorial path" in " ".join(t.get_text() for t in pipe_ax.get_legend().get_texts())
    assert sorted(round(b.get_height(), 2) for b in room_ax.patches) == sorted(h["headroom"] for h in saved["headroom"])
    (parity,) = [l for l in room_ax.get_lines() if l.get_gid() == "parity"]
    assert set(parity.get_ydata()) == {1.0}
    assert pipe_ax.get_yscale() == room_ax.get_yscale() == "log"
    only_pipeline = bench.figure({"meta": {}, "rows": pipe, "headroom": []})
    assert len(only_pipeline.axes) == 1
    with pytest.raises(BadInput, match="nothing|no pipeline rows"):
        bench.figure({"meta": {}, "rows": [], "headroom": []})


def test_tables_script_draws_a_written_bench(tmp_path):
    root = Path(__file__).resolve().parent.parent
    png = tmp_path / "cpu.png"
    r = subprocess.run([sys.executable, str(root / "bench" / "tables.py"), str(root / "bench" / "cpu_bench.json"),
                        "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Measured on cpu") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the README's picture is this command's, from the committed JSON (docs/bench.md gives the command)
    assert "python bench/tables.py bench/cpu_bench.json --plot bench/cpu_bench.png" in (root / "docs" / "bench.md").read_text()
    assert "`bench/cpu_bench.png`" in (root / "README.md").read_text() and (root / "bench" / "cpu_bench.png").is_file()
    r = subprocess.run([sys.executable, str(root / "bench" / "tables.py"), str(tmp_path / "missing.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Cannot read" in r.stderr and "Traceback" not in r.stderr


def test_bad_models_and_settings(store):
    with pytest.raises(BadInput, match="not a timm model"):
        bench.run(stages=["train_step"], models=["resnet1800"], data_dir=store.dir, device="cpu", log=lambda *_: None)
    with pytest.raises(BadInput, match="Unknown step setting 'fast'"):
        bench.run(stages=["train_step"], settings=["fast"], data_dir=store.dir, device="cpu", log=lambda *_: None)
    # named settings run exactly those, in ladder order
    ladder = bench._ladder(torch.device("cpu"), quick=True, settings=["compiled_cl_amp", "cl_amp"])
    assert ladder == [(False, True, True), (True, True, True)]


def test_end_to_end_table_sets_each_loader_beside_the_step_it_fed():
    """end_to_end runs one step setting (the compiled one); the step alone it is compared with is that
    setting's train_step row, not the fastest rung (on a CPU an eager one), which the headroom uses."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    key = {"model": "resnet18", "image_size": 32, "memory_format": "channels_last", "precision": "amp"}
    rows = [{"stage": "train_step", **key, "compiled": False, "images_per_sec": 500},
            {"stage": "train_step", **key, "compiled": True, "images_per_sec": 300},
            {"stage": "end_to_end", **key, "compiled": True, "backend": "dali-cpu", "images_per_sec": 290}]
    room = [{"pipeline": "dali-cpu", "model": "resnet18", "image_size": 32, "train_step_img_s": 500, "headroom": 40.0}]
    text = tables.end_to_end_table(rows, room)
    assert "| that step alone | fastest step |" in text.splitlines()[0]
    assert text.splitlines()[2] == "| resnet18 | 32 | 290 | 300 | 500 | 40.0x |"


def test_readme_cpu_tables_are_the_committed_bench_json():
    """The README's measured tables are what bench/tables.py prints from bench/cpu_bench.json, so a
    re-measured JSON without its README tables (or the reverse) fails here."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "bench"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    assert tables.tables(json.loads((root / "bench" / "cpu_bench.json").read_text())) in (root / "README.md").read_text()


def _tables_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    return tables


def test_tables_show_the_headroom_without_end_to_end_rows_and_the_meta_note(capsys):
    """A bench of the pipeline and train_step stages has a headroom but no end_to_end rows: its
    headroom is still tabled; meta.note (stages re-measured apart) is in the caption; --plot
    without a path is a usage error (exit 2), not a traceback."""
    tables = _tables_module()
    key = {"model": "resnet18", "image_size": 32, "memory_format": "channels_last", "precision": "amp"}
    rows = [{"stage": "pipeline", "backend": "dali-cpu", "image_size": 32, "aug": "oneof", "batch_size": 250,
             "images_per_sec": 9000},
            {"stage": "train_step", **key, "compiled": False, "batch_size": 64, "images_per_sec": 300}]
    text = tables.tables({"meta": {"note": "train_step re-measured apart."}, "rows": rows,
                          "headroom": bench.headroom(rows)})
    assert text.splitlines()[0].endswith("store. train_step re-measured apart.")
    assert "headroom dali-cpu" in text and "| 30.0x |" in text
    assert tables.main(["x.json", "--plot"]) == 2 and "usage" in capsys.readouterr().err


def test_time_steps_reports_the_median_timed_repeat_and_the_warm_up_apart(monkeypatch):
    """_time_steps: the warm-up steps' seconds (a compile) are reported apart and kept out of the
    rate; a repeat's rate is its images (not steps) over its seconds; the median repeat is kept."""
    from types import SimpleNamespace

    now = [0.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    costs = iter([30.0, 1.0, 1.0, 2.0, 2.0, 0.5, 0.5])  # seconds per step: 1 warm-up, then 3 repeats of 2

    def step(images, labels):
        now[0] += next(costs)

    batch = (torch.zeros(8, 3, 4, 4), torch.zeros(8))  # 8 images a step
    # repeats: 16 images in 2 s, 4 s and 1 s -> 8, 4 and 16 img/s
    assert bench._time_steps(step, iter(lambda: batch, None), torch.device("cpu"), 1, 3, 2) == (8.0, 30.0)
    assert next(costs, None) is None  # every planned step ran, and no more


def test_end_to_end_fits_a_store_of_exactly_its_batches_and_quick_on_a_cpu_runs_the_first_model(store, monkeypatch):
    """need = warm-up + timed steps: a store of exactly that many batches is measured, a larger batch
    refused before measuring; --quick on a CPU runs the first default model only (a resnet50 step
    there takes seconds)."""
    monkeypatch.setattr(bench, "MODELS", ("test_resnet", "test_efficientnet"))
    monkeypatch.setitem(bench.STEP_PLAN, "quick", (1, 1, 4))  # 5 steps
    monkeypatch.setattr(bench, "CPU_STEP_BATCH", {32: 100, 224: 2})  # 5 x 100: the store's 500 images
    kw = dict(stages=["end_to_end"], quick=True, backends=["torch"], sizes=[32], settings=["nchw_fp32"],
              data_dir=store.dir, device="cpu", log=lambda *_: None)
    rows = bench.run(**kw)
    assert [(r["model"], r["image_size"], r["batch_size"]) for r in rows] == [("test_resnet", 32, 100)]
    monkeypatch.setattr(bench, "CPU_STEP_BATCH", {32: 101, 224: 2})
    with pytest.raises(BadInput, match="end_to_end needs 5 batches of 101 in one epoch at 32 px; the store has 500"):
        bench.run(**kw)


def test_a_full_disk_keeps_the_earlier_json_and_picture_whole(tmp_path):
    """The JSON and the picture are written beside and renamed: when the disk fills mid-write
    (RLIMIT_FSIZE: writes fail with EFBIG) the earlier files are left as they were, with no
    temporary file, and the error is bad input."""
    import resource

    bench.write_json(tmp_path / "bench.json", {"meta": {}, "rows": []})
    room = [{"pipeline": "torch", "model": "m", "image_size": 32, "headroom": 2.0}]
    bench.plot({"meta": {}, "rows": [], "headroom": room}, tmp_path / "bench.png")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bigger = {"meta": {"note": "x" * 20_000}, "rows": [], "headroom": room * 50}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 10, limits[1]))
        with pytest.raises(BadInput, match="Cannot write"):
            bench.write_json(tmp_path / "bench.json", bigger)
        with pytest.raises(BadInput, match="Cannot write"):
            bench.plot(bigger, tmp_path / "bench.png")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_a_dash_for_an_output_path_is_refused_not_written_as_a_file(tmp_path, monkeypatch, option):
    """`--json -` means stdout to most tools; bench prints its tables there, so '-' is refused with
    an example path instead of becoming a file named '-'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match=f"{option} - : bench prints to stdout"):
        bench.check_json_path(Path("-"), option)
    assert list(tmp_path.iterdir()) == []


def test_a_users_json_with_a_meta_key_is_not_taken_for_a_bench_json(tmp_path):
    """Only a JSON a bench wrote (owned.py) may be replaced by --json; a user's file with a "meta"
    key (or meta and rows) is refused and left as it was."""
    mine = tmp_path / "notes.json"
    mine.write_text('{"meta": {"author": "me"}, "notes": []}')
    with pytest.raises(BadInput, match="`fastcifar bench` did not write"):
        bench.check_json_path(mine)
    bench.check_json_path(tmp_path / "new.json")  # a new path is fine
    assert mine.read_text() == '{"meta": {"author": "me"}, "notes": []}'


# ---- bad input: a bad --device or an output path that would lose a file is exit 2 before anything runs


@pytest.mark.parametrize("device", ["foo", "cuda:x", "mps", "meta"])
def test_bench_bad_device_is_bad_input_before_the_run(bench_spy, device):
    bench, ran = bench_spy
    with pytest.raises(BadInput, match="--device"):
        bench.run(stages=["pipeline"], quick=True, device=device, log=lambda *_: None)
    assert ran == []


def test_cli_bench_device_foo_is_one_paragraph_exit_2():
    code, _, err = cli("bench", "--quick", "--device", "foo")
    assert code == 2 and one_paragraph(err, "'foo'", "cpu, cuda or cuda:N"), err


@pytest.mark.parametrize("case", ["under a file", "a directory"])
def test_bench_unwritable_json_is_refused_before_the_run(tmp_path, bench_spy, case):
    bench, ran = bench_spy
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    path = {"under a file": tmp_path / "afile" / "bench.json", "a directory": tmp_path / "adir"}[case]
    why = {"under a file": f"{tmp_path / 'afile'} is a file, not a directory", "a directory": "is a directory"}[case]
    with pytest.raises(BadInput, match=f"{path}.*{why}"):
        bench.run(stages=["pipeline"], quick=True, device="cpu", json_path=path, log=lambda *_: None)
    assert ran == []  # found before the store or a stage, not after minutes of benchmarking
    bench.run(stages=["pipeline"], quick=True, device="cpu", json_path=tmp_path / "new" / "b.json", log=lambda *_: None)
    assert ran == ["store", "pipeline"] and json.loads((tmp_path / "new" / "b.json").read_text())["rows"] == []


def no_store_and_temp_in(tmp_path, monkeypatch):
    """No prepared store (FASTCIFAR_DATA names none) and the temp dir in tmp_path, where a bench would
    make its synthetic stand-in: what a test then finds in tmp_path, the bench made."""
    monkeypatch.setenv("FASTCIFAR_DATA", str(tmp_path / "nostore"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_cli_bench_unwritable_json_is_exit_2_at_once(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    no_store_and_temp_in(tmp_path, monkeypatch)
    t = time.time()
    code, _, err = cli("bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "afile" / "b.json"))
    assert code == 2 and one_paragraph(err, tmp_path / "afile" / "b.json"), err
    assert time.time() - t < 60 and sorted(os.listdir(tmp_path)) == ["afile"]  # no synthetic store made first


def _bench_paths(tmp_path: Path) -> dict:
    """A user's JSON and picture, look-alikes of a bench's (a JSON with meta and rows, a figure
    matplotlib saved, an empty file), and an earlier bench's JSON and picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from fastcifar import bench

    (tmp_path / "notes.json").write_text('{"mine": 1}')
    Image.new("RGB", (4, 4)).save(tmp_path / "holiday.png")
    (tmp_path / "lookalike.json").write_text(json.dumps({"meta": {}, "rows": []}))
    plt.figure().savefig(tmp_path / "figure.png")  # a PNG matplotlib wrote: the user's all the same
    plt.close("all")
    (tmp_path / "empty.json").write_text("")
    bench.write_json(tmp_path / "old.json", {"meta": {}, "rows": []})
    bench.plot({"meta": {}, "rows": [], "headroom": [{"pipeline": "torch", "model": "m", "image_size": 32,
                                                      "headroom": 2.0}]}, tmp_path / "old.png")
    return {p.name: p for p in tmp_path.iterdir()}


USERS = ["notes.json", "holiday.png", "lookalike.json", "figure.png", "empty.json"]


@pytest.mark.parametrize("args, message", [
    (["--json", "{tmp}/b.json", "--plot", "{tmp}/b.json"], "name the same file"),
    (["--plot", "{tmp}/bench.jpg"], "name it *.png"),
    (["--device", ""], "--device ''"),
] + [(["--json" if name.endswith(".json") else "--plot", "{tmp}/" + name], "did not write") for name in USERS])
def test_cli_bench_output_paths_that_would_lose_a_file_are_exit_2_at_once(tmp_path, monkeypatch, args, message):
    paths = _bench_paths(tmp_path)
    before = contents(tmp_path)
    no_store_and_temp_in(tmp_path, monkeypatch)
    code, _, err = cli("bench", "--quick", "--stage", "pipeline", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and one_paragraph(err, message), err
    assert contents(tmp_path) == before and paths  # nothing written, replaced or made (no synthetic store)


def test_bench_replaces_only_its_own_outputs(tmp_path, bench_spy):
    bench, ran = bench_spy
    paths = _bench_paths(tmp_path)
    for name in USERS:  # by name, extension or content alike: not the bench's
        with pytest.raises(BadInput, match="did not write"):
            bench.check_json_path(paths[name], "--json" if name.endswith(".json") else "--plot")
    bench.check_json_path(paths["old.png"], "--plot")
    bench.run(stages=["pipeline"], quick=True, device="cpu", json_path=paths["old.json"], log=lambda *_: None)
    assert json.loads(paths["old.json"].read_text())["meta"]["complete"] is True
    paths["old.json"].write_text('{"meta": {}, "rows": [], "my note": 1}')  # edited since: the user's now
    with pytest.raises(BadInput, match="changed since"):
        bench.check_json_path(paths["old.json"])


def test_bench_measures_a_stage_or_model_named_twice_once(bench_spy, monkeypatch):
    bench, ran = bench_spy
    seen = []
    monkeypatch.setitem(bench.STAGES, "train_step", lambda models, backends, **k: seen.append((models, backends)) or [])
    bench.run(stages=["train_step", "pipeline", "train_step"], models=["test_resnet", "test_resnet"],
              backends=["torch", "torch"], quick=True, device="cpu", log=lambda *_: None)
    assert ran == ["store", "pipeline"] and seen == [(["test_resnet"], ["torch"])]


def test_bench_out_of_device_memory_is_bad_input_keeping_the_rows(tmp_path, bench_spy, monkeypatch):
    import torch

    bench, ran = bench_spy

    def stage(**k):
        yield {"stage": "pipeline", "backend": "torch", "image_size": 32, "aug": "none", "images_per_sec": 1}
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 600.00 TiB")

    monkeypatch.setitem(bench.STAGES, "pipeline", stage)
    with pytest.raises(BadInput, match=r"ran out of device memory at --batch-size 1000000000 .* smaller --batch-size"
                                       r".* 1 rows measured before are in"):
        bench.run(stages=["pipeline"], quick=True, device="cpu", batch_size=10 ** 9, json_path=tmp_path / "b.json",
                  log=lambda *_: None)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert len(saved["rows"]) == 1 and saved["meta"]["complete"] is False
