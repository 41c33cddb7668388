"""`fastcifar doctor`: the CPU run passes and reports every check and row; a planted fault fails
the check that must catch it; the budget skips and names what does not fit; a step that crashes
or hangs is that step's failure and the rest still run; bad input is exit 2. The one compile of
this file is the CLI run's compile check."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

import fastcifar.train as T
from fastcifar import doctor
from fastcifar.doctor import STEPS, Step
from helpers import QUIET, cli, one_paragraph
from fastcifar.pipelines.loader import dali_available
from fastcifar.errors import BadInput

BY_NAME = {s.name: s for s in STEPS}


@pytest.mark.skipif(not dali_available(), reason="DALI does not import here: "
                    "test_without_dali_the_agreement_check_says_how_to_install_it_and_rows_run_on_torch runs")
def test_doctor_passes_on_the_cpu_and_reports_every_check_and_row(tmp_path):
    """The command a user runs, at toy sizes: a pass line per check, the table, the JSON with the
    versions, the checks and the rows (the targets n/a off an H100/H200)."""
    out = tmp_path / "doctor.json"
    # a loaded CI machine: no step cut short
    code, stdout, stderr = cli("doctor", "--device", "cpu", "--json", out, "--budget", "900", spawn=True, timeout=900)
    assert code == 0, stdout[-4000:] + stderr[-3000:]
    lines = stdout.splitlines()
    for name in ("agreement", "compile", "resume"):
        assert any(line.split()[:2] == ["PASS", name] for line in lines), name
    assert "| check | result | seconds | what |" in lines and "| throughput (toy sizes on a CPU) | measured | target | met |" in lines
    assert lines[-1] == f"wrote {out}"
    report = json.loads(out.read_text())
    v = report["versions"]
    assert v["torch"] == torch.__version__ and v["gpu"] is None and v["timm"] and v["dali"] is not None
    assert [c["name"] for c in report["checks"]] == ["agreement", "compile", "resume"]
    assert {c["status"] for c in report["checks"]} == {"pass"}
    assert "0 shape recompiles, 1 for evaluation" in report["checks"][1]["detail"]
    assert "bit for bit" in report["checks"][2]["detail"]
    assert [m["name"] for m in report["measurements"]] == [s.name for s in STEPS if s.kind != "check"]
    assert {m["status"] for m in report["measurements"]} == {"pass"}
    rows = {row["name"]: row for row in report["rows"]}
    assert {"resnet18_224_step", "resnet18_224_ratio", "resnet18_32_ratio", "resnet50_224_step", "torch_oneof_224"} <= set(rows)
    assert all(row["value"] > 0 and row["met"] is None for row in rows.values())
    assert rows["resnet18_224_step"]["target"] == 10_000 and "test_resnet, toy size" in rows["resnet18_224_step"]["what"]
    assert report["meta"]["precision"] in ("fp32", "bf16") and report["meta"]["toy"] is True
    assert rows["dali_oneof_224"]["target"] == 100_000 and "dali-cpu and torch" in report["checks"][0]["detail"]
    assert "in which branches" in report["checks"][0]["detail"]


@pytest.mark.skipif(dali_available(), reason="DALI imports here: the CLI run above measures its rows (this runs in "
                    "CI's pass with DALI uninstalled)")
def test_without_dali_the_agreement_check_says_how_to_install_it_and_rows_run_on_torch(tmp_path):
    """Where DALI does not install, the agreement check passes saying how to install it, the DALI
    rows are named as not measured, and end_to_end runs on the torch loader."""
    steps = [BY_NAME[n] for n in ("agreement", "dali_oneof_224", "resnet18_32", "torch_oneof_224")]
    code, text, report = inline(steps, tmp_path)
    assert code == 0, text
    assert report["versions"]["dali"] is None
    assert "DALI is not installed here (pip install nvidia-dali-cuda120" in report["checks"][0]["detail"]
    rows = {row["name"]: row for row in report["rows"]}
    assert "dali_oneof_224" not in rows and "torch loader" in rows["resnet18_32_e2e"]["what"]
    assert rows["torch_oneof_224"]["value"] > 0
    dali = [m for m in report["measurements"] if m["name"].startswith("dali_")]
    assert dali and all(m["detail"] == "not measured: DALI is not installed here" for m in dali)
    assert "| dali_oneof_224: pass | not measured: DALI is not installed here | | |" in text.splitlines()


def inline(steps, tmp_path, **kw):
    """doctor.run on the CPU with the given steps in this process (where a test can plant a fault);
    returns (exit status, printed lines, the JSON)."""
    lines, out = [], tmp_path / "doctor.json"
    code = doctor.run(device="cpu", json_path=out, log=lines.append, isolate=False, steps=steps, **kw)
    return code, "\n".join(lines), json.loads(out.read_text())


@pytest.mark.skipif(not dali_available(), reason="DALI does not import here: nothing to compare the torch backend with")
def test_a_torch_backend_one_pixel_off_fails_the_agreement_check(tmp_path, monkeypatch):
    import fastcifar.pipelines.torch_backend as tb

    real = tb.augment

    def shifted(x, p, spec):  # the first pixel of every image 40 grey levels off
        y = real(x, p, spec).clone()
        y[:, 0, 0] = torch.where(y[:, 0, 0] < 128, y[:, 0, 0] + 40, y[:, 0, 0] - 40)
        return y

    monkeypatch.setattr(tb, "augment", shifted)
    code, text, report = inline([BY_NAME["agreement"]], tmp_path)
    assert code == 1 and "FAIL    agreement (" in text
    detail = report["checks"][0]["detail"]
    assert "agreement oneof dali-cpu vs torch at 32: max" in detail and "branches" in detail


def test_a_resume_that_skips_a_step_fails_the_resume_check(tmp_path, monkeypatch):
    real = T.Progress.load_state_dict

    def skip_one(self, d):
        real(self, d)
        self.batches_done += 1  # the resumed epoch starts a batch too late

    monkeypatch.setattr(T.Progress, "load_state_dict", skip_one)
    code, text, report = inline([BY_NAME["resume"]], tmp_path)
    assert code == 1 and "FAIL    resume (" in text
    assert report["checks"][0]["detail"].endswith("NOT so, model, optimizer and step differ")


def test_shape_recompiles_are_told_from_the_switch_to_evaluation():
    """dynamo's reasons as its recompiles log gives them: grad mode and the training flag are the
    switch between the train and eval graphs; a size mismatch is a shape recompile."""
    evaluation = "Recompiling function forward in m.py:30\n    triggered by the following guard failure(s):\n" \
                 "    - 0/0: GLOBAL_STATE changed: grad_mode "
    shape = evaluation + "\n    - 0/1: tensor 'args[0]' size mismatch at index 0. expected 100, actual 70"
    assert doctor.shape_recompiles([evaluation]) == []
    assert doctor.shape_recompiles([evaluation, shape]) == [shape]


def passes(ctx, emit):
    emit({"name": "resnet50_224_step", "what": "a figure", "value": 5})
    return {"ok": True, "detail": "fine"}


def crashes(ctx, emit):
    os._exit(3)


def hangs(ctx, emit):
    time.sleep(600)


def test_the_budget_skips_and_names_what_does_not_fit(tmp_path):
    """A step needing more than what is left is skipped and named: a measurement is then a gap in
    the table (exit 0), a check a failure (exit 1)."""
    steps = [Step("first", "target", passes, cap=(5, 5), need=(0, 0)),
             Step("big", "target", passes, cap=(5, 5), need=(10_000, 10_000))]
    code, text, report = inline(steps, tmp_path, budget=600)
    assert code == 0
    assert "SKIPPED big: did not fit: needs about 10000 s" in text and "Did not fit in the budget: big;" in text
    assert [(m["name"], m["status"]) for m in report["measurements"]] == [("first", "pass"), ("big", "skipped")]
    assert report["rows"][0]["target"] == 4_000 and report["rows"][0]["met"] is None  # not an H100/H200
    code, text, report = inline([Step("big check", "check", passes, cap=(5, 5), need=(10_000, 10_000))], tmp_path)
    assert code == 1 and report["checks"][0]["status"] == "skipped"


def test_a_step_that_crashes_or_hangs_fails_alone_and_the_rest_still_run(tmp_path):
    """Each step in a process of its own: one that dies is named with its exit status, one that
    hangs is stopped at its cap (a timeout: exit 1), one the budget cuts short is named apart, and
    the steps after them run and report."""
    steps = [Step("crash", "check", crashes, cap=(60, 60), need=(0, 0)),
             Step("hang", "target", hangs, cap=(2, 2), need=(0, 0)),
             Step("fine", "check", passes, cap=(60, 60), need=(0, 0)),
             Step("long", "extra", hangs, cap=(10_000, 10_000), need=(0, 0))]
    lines, out = [], tmp_path / "doctor.json"
    code = doctor.run(device="cpu", json_path=out, log=lines.append, steps=steps, budget=20)
    report = json.loads(out.read_text())
    status = {e["name"]: (e["status"], e["detail"]) for e in report["checks"] + report["measurements"]}
    assert code == 1
    assert status["crash"] == ("fail", "its process died (exit status 3)")
    assert status["hang"] == ("timeout", "stopped after 2 s: its cap")
    assert status["fine"] == ("pass", "fine") and report["rows"][0]["step"] == "fine"
    assert status["long"][0] == "cut" and status["long"][1].endswith("the budget ran out")
    assert 19 <= report["meta"]["seconds"] < 50


def test_ctrl_c_prints_what_was_done_and_stops(tmp_path):
    """Ctrl-C during a step (here while one hangs in its process): that process is ended, the table
    shows the steps done and the one stopped, --json says so, and Stopped (exit 130) follows."""
    steps = [Step("fine", "check", passes, cap=(60, 60), need=(0, 0)),
             Step("hang", "target", hangs, cap=(600, 600), need=(0, 0))]
    lines, out = [], tmp_path / "doctor.json"

    def ctrl_c_once_hang_runs():
        while not any(" hang (at most" in line for line in lines):
            time.sleep(0.1)
        time.sleep(1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # to the main thread, as a terminal's Ctrl-C

    threading.Thread(target=ctrl_c_once_hang_runs, daemon=True).start()
    with pytest.raises(doctor.Stopped, match="Stopped by Ctrl-C or SIGTERM in step hang"):
        doctor.run(device="cpu", json_path=out, log=lines.append, steps=steps)
    report = json.loads(out.read_text())
    assert report["meta"]["stopped"] is True and report["checks"][0]["status"] == "pass"
    assert report["measurements"][0]["status"] == "interrupted" and report["meta"]["seconds"] < 60
    assert "(stopped by Ctrl-C)" in "\n".join(lines)


def test_the_targets_come_first_then_the_extras():
    """The checks, then the target rows in the order that matters most when time runs short, then
    the extras; every target is measured by a step."""
    kinds = [s.kind for s in STEPS]
    assert kinds == sorted(kinds, key=["check", "target", "extra"].index)
    assert [s.name for s in STEPS if s.kind == "target"] == ["dali_oneof_224", "resnet18_224", "resnet18_32", "resnet50_224"]
    assert all(any(t.startswith(s.name) for s in STEPS if s.kind == "target") for t in doctor.TARGETS)


@pytest.mark.parametrize("kw, message", [
    ({"budget": 0}, "--budget 0: give the seconds"),
    ({"budget": float("nan")}, "--budget nan"),
    ({"json_path": "-"}, "--json - : doctor prints to stdout"),
    ({"device": "cuda"}, "asked for a GPU, but torch sees no CUDA device here"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, kw, message):
    with pytest.raises(BadInput, match=message.replace("(", r"\(")):
        doctor.run(**{"device": "cpu", **QUIET, **kw})


def test_json_replaces_only_a_file_doctor_wrote(tmp_path):
    """A user's file at --json is refused before anything runs and left as it was; doctor's own
    JSON from an earlier run is replaced (owned.py's rule)."""
    mine = tmp_path / "notes.json"
    mine.write_text('{"doctor": "0.1.0"}')  # looks like one, but doctor did not write it
    with pytest.raises(BadInput, match=f"`fastcifar doctor` did not write {mine}, or it was changed since"):
        doctor.run(device="cpu", json_path=mine, **QUIET)
    assert mine.read_text() == '{"doctor": "0.1.0"}'
    quick = [Step("first", "target", passes, cap=(5, 5), need=(0, 0))]
    for _ in range(2):  # the second run replaces the first one's file
        assert inline(quick, tmp_path)[0] == 0


def test_cuda_without_a_gpu_is_exit_2_in_one_paragraph():
    code, out, err = cli("doctor", "--device", "cuda")
    assert code == 2 and out == ""
    assert err.startswith("error: --device cuda asked for a GPU") and one_paragraph(err), err
