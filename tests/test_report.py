"""`fastcifar report`: the results table and plots from run directories (DESIGN.md run contract);
runs that died early or are damaged are skipped and named, exit 2 only when none is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastcifar import owned
from fastcifar.errors import BadInput
from fastcifar.report import find_runs, report, results_table
from helpers import cli, make_run, one_paragraph


def _row(table: str, run: str) -> list[str]:
    line = next(l for l in table.splitlines() if l.startswith(f"| {run} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_has_tutorial_shape_and_flags(tmp_path):
    make_run(tmp_path, "r18_baseline-1", [30.0, 44.26, 41.0], description="timm resnet18 from scratch")
    make_run(tmp_path, "smoke-1", [10.0, 55.5], synthetic=True)
    make_run(tmp_path, "slow", [60.0])
    table = results_table(find_runs([tmp_path]))
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert head == ["run", "recipe", "what changes", "best test acc (epoch)", "final test acc", "epochs", "wall time", "train img/s"]
    assert _row(table, "r18_baseline-1") == ["r18_baseline-1", "r18_baseline", "timm resnet18 from scratch",
                                             "44.26% (2)", "41.00%", "3/3", "0m 30s", "1,234"]
    assert "synthetic data" in _row(table, "smoke-1")[1]
    assert "synthetic data" not in _row(table, "r18_baseline-1")[1]
    assert "say nothing about the real CIFAR-100 or CIFAR-10" in table
    assert _row(table, "slow")[6] == "1h 02m"


def test_validation_and_test_shown_apart(tmp_path):
    make_run(tmp_path, "withval", [40.0, 50.0, 45.0], val=[41.0, 43.0, 47.0])
    make_run(tmp_path, "noval", [20.0])
    table = results_table(find_runs([tmp_path / "withval", tmp_path / "noval"]))
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert head[4:6] == ["best val acc (epoch)", "test acc at best val"]
    row = _row(table, "withval")
    assert row[3] == "50.00% (2)"              # best on test, the tutorial's way
    assert row[4:6] == ["47.00% (3)", "45.00%"]  # selected on validation: test at that epoch
    assert _row(table, "noval")[4:6] == ["—", "—"]


def test_run_without_summary_is_derived_and_marked(tmp_path):
    make_run(tmp_path, "crashed", [12.0, 30.0, 25.0], summary=False)
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "test_a')  # cut short by the crash
    (run,) = find_runs([tmp_path / "crashed"])
    assert run.summary["best_acc"] == 30.0 and run.summary["best_epoch"] == 2 and run.summary["final_acc"] == 25.0
    assert "unfinished" in _row(results_table([run]), "crashed")[1]


def test_report_writes_table_and_pngs(tmp_path):
    make_run(tmp_path / "runs", "a", [10.0, 20.0, 30.0])
    make_run(tmp_path / "runs", "b", [15.0, 25.0], synthetic=True)
    table, files = report([tmp_path / "runs"], tmp_path / "out")
    assert (tmp_path / "out" / "results.md").read_text() == table
    for png in files[1:]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [owned.MANIFEST, "results.md", "test_accuracy.png",
                                                                    "test_loss.png"]  # and the record of them


def test_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no run directories"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(BadInput, match="not a directory"):
        find_runs([tmp_path / "missing"])
    d = make_run(tmp_path, "bad", [1.0])
    (d / "summary.json").write_text("{not json")
    with pytest.raises(BadInput, match="Cannot read"):
        find_runs([d])


def test_cli_report(tmp_path):
    make_run(tmp_path / "runs", "r18_lbsmooth-1", [44.81])
    code, out, err = cli("report", tmp_path / "runs", "--out", tmp_path / "rep")
    assert code == 0, err
    assert "44.81% (1)" in out and (tmp_path / "rep" / "test_accuracy.png").is_file()
    code, out, err = cli("report", tmp_path / "nowhere")
    assert code == 2 and "Traceback" not in err and "not a directory" in err


def prov(torch_v="2.14.1", dataset="cifar100"):
    return {"torch": torch_v, "timm": "1.0.31", "dali": "2.4.0",
            "data": {"dataset": dataset, "outputs_sha256": {"train_images.npy": "ab" if dataset == "cifar100" else "cd"}}}


def test_report_warns_about_other_data_other_software_and_test_selection(tmp_path):
    make_run(tmp_path, "a", [10.0, 20.0], val=[11.0, 19.0], provenance=prov())
    make_run(tmp_path, "b", [15.0], val=[16.0], provenance=prov())
    warned = []
    table, _ = report([tmp_path], tmp_path / "out", warn=warned.append)
    assert warned == []  # same data, same software, both selected on validation
    make_run(tmp_path, "c", [30.0], provenance=prov(torch_v="2.10.0", dataset="synthetic"))
    table, _ = report([tmp_path], tmp_path / "out", warn=warned.append)
    assert any("different data" in w and "cifar100 (store " in w and "): a, b" in w and "): c" in w for w in warned)
    assert any("different torch versions" in w and "2.10.0: c" in w for w in warned)
    assert [w for w in warned if "test set" in w] == [w for w in warned if w.startswith("warning: c selected its best "
                                                                                      "epoch on the test set")] != []
    assert sum("Warning:" in line for line in table.splitlines()) == 3  # under the table too, in results.md


def test_report_ranks_by_time_to_target_and_shows_the_data_wait(tmp_path):
    make_run(tmp_path, "slow", [50.0, 70.0], target_acc=60.0, epoch_to_target=2, seconds_to_target=300.0,
             data_wait_fraction=0.25)
    make_run(tmp_path, "fast", [65.0, 71.0], target_acc=60.0, epoch_to_target=1, seconds_to_target=100.0,
             data_wait_fraction=0.01)
    make_run(tmp_path, "never", [40.0, 50.0], target_acc=60.0, epoch_to_target=None, seconds_to_target=None)
    make_run(tmp_path, "notarget", [90.0])
    table, _ = report([tmp_path], tmp_path / "out", sort="time_to_target")
    rows = [l.split("|")[1].strip() for l in table.splitlines()[2:] if l.startswith("| ")]
    assert rows == ["fast", "slow", "never", "notarget"]
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert head[-2:] == ["data wait", "time to target (training)"]
    assert _row(table, "fast")[-2:] == ["1.0%", "1m 40s to 60% (epoch 1)"]
    assert _row(table, "never")[-1] == "not reached (60%)" and _row(table, "notarget")[-2:] == ["—", "—"]
    table, _ = report([tmp_path], tmp_path / "out", sort="best_acc")
    assert [l.split("|")[1].strip() for l in table.splitlines()[2:] if l.startswith("| ")][0] == "notarget"
    with pytest.raises(BadInput, match="--sort 'fastest'"):
        report([tmp_path], tmp_path / "out", sort="fastest")
    code, out, err = cli("report", tmp_path, "--out", tmp_path / "o2", "--sort", "time_to_target")
    assert code == 0 and out.index("| fast |") < out.index("| slow |"), err


def test_plots_have_integer_epochs_and_a_star_at_the_best_epoch(tmp_path):
    from fastcifar.report import curves_figure

    make_run(tmp_path, "a", [10.0, 30.0, 20.0])
    make_run(tmp_path, "b", [5.0, 6.0, 7.0])
    runs = find_runs([tmp_path])
    fig = curves_figure(runs, "test_acc", "acc")
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    stars = [(tuple(l.get_xdata()), tuple(l.get_ydata())) for l in ax.get_lines() if l.get_gid() == "best"]
    assert sorted(stars) == [((2,), (30.0,)), ((3,), (7.0,))]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]  # the stars stay out of the legend


# ---- damaged numbers and an --out that is not the report's


@pytest.mark.parametrize("field, value", [
    ("wall_seconds", float("nan")), ("wall_seconds", float("inf")),  # duration() raised on them
    ("best_acc", 10 ** 400),  # an int past a float's range: formatting it raised OverflowError
    ("best_epoch", [1]),  # the plots look the best epoch up in a dict: unhashable
])
def test_a_summary_with_numbers_that_are_not_finite_numbers_is_skipped_and_named(tmp_path, field, value):
    make_run(tmp_path / "runs", "good", [10.0])
    make_run(tmp_path / "runs", "bad", [20.0], **{field: value})
    warned = []
    table, _ = report([tmp_path / "runs"], tmp_path / "out", warn=warned.append)
    assert _row(table, "good")[3] == "10.00% (1)" and "| bad |" not in table
    assert any(w.startswith(f"skipped {tmp_path / 'runs' / 'bad'}:") and f"{field} must be numbers" in w for w in warned)


def test_a_nan_wall_time_in_metrics_shows_as_a_dash(tmp_path):
    d = make_run(tmp_path, "crashed", [12.0], summary=False)
    (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 12.0, "test_loss": NaN, "wall_seconds": NaN}\n')
    assert _row(results_table(find_runs([d])), "crashed")[6] == "—"


def test_provenance_that_names_no_data_set_still_warns(tmp_path):
    make_run(tmp_path, "a", [10.0], provenance={"data": {}})
    make_run(tmp_path, "b", [12.0], provenance=prov())
    warned = []
    report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", warn=warned.append)
    assert any("different data" in w and "unnamed data: a" in w for w in warned), warned


def test_out_never_replaces_what_report_did_not_write(tmp_path):
    from fastcifar.data import prepare

    run = make_run(tmp_path / "runs", "r", [10.0])
    store = prepare(tmp_path / "store", synthetic=True, n_train=20, n_test=10, log=lambda *_: None)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "results.md").write_text("my own results\n")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "test_loss.png").write_bytes(b"my plot")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, message in [(tmp_path / "afile", "is a file"), (run, "is a run directory"),
                         (store, "inside the data store"), (store / "report", "inside the data store"),
                         (tmp_path / "notes", "`fastcifar report` did not write .*results.md"),
                         (tmp_path / "pics", "`fastcifar report` did not write .*test_loss.png")]:
        with pytest.raises(BadInput, match=message):
            report([tmp_path / "runs"], out)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    report([tmp_path / "runs"], tmp_path / "rep")
    (tmp_path / "rep" / "extra.txt").write_text("mine too")
    table, _ = report([tmp_path / "runs"], tmp_path / "rep")  # its own earlier report is rewritten
    assert (tmp_path / "rep" / "results.md").read_text() == table
    (tmp_path / "rep" / "test_loss.png").write_bytes(b"my edit")  # changed since: the user's now
    with pytest.raises(BadInput, match="`fastcifar report` did not write .*test_loss.png"):
        report([tmp_path / "runs"], tmp_path / "rep")
    assert (tmp_path / "rep" / "test_loss.png").read_bytes() == b"my edit"


def test_a_run_directory_whose_name_is_not_utf8_is_reported(tmp_path):
    """Its name goes into results.md as the bytes it is, and into the plots' legends as U+FFFD
    (results.md's encoding, then matplotlib, raised UnicodeEncodeError on it)."""
    name = b"run\xff".decode("utf-8", "surrogateescape")
    make_run(tmp_path / "runs", name, [10.0])
    _, files = report([tmp_path / "runs"], tmp_path / "out")
    assert b"| run\xff |" in (tmp_path / "out" / "results.md").read_bytes()
    assert all(f.is_file() for f in files)


def test_duration_switches_to_hours_at_one_hour_and_dashes_what_is_not_a_time():
    from fastcifar.report import duration

    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 3661, 7322)] == \
        ["0m 00s", "0m 59s", "1m 01s", "59m 59s", "1h 00m", "1h 01m", "2h 02m"]
    assert duration(None) == duration(float("nan")) == duration(float("inf")) == "—"


def test_a_damaged_line_before_the_last_is_named_not_skipped(tmp_path):
    """Only the last line may be cut short (a crash mid-write); a bad line earlier means the file was
    damaged, and dropping it would silently report a run with an epoch missing."""
    d = make_run(tmp_path, "damaged", [12.0, 30.0, 25.0])
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    skipped = []
    with pytest.raises(BadInput, match="No run could be reported"):
        find_runs([d], skipped)
    assert "line 2 is not JSON" in skipped[0][1]


def test_a_run_without_summary_gets_its_mean_speed_and_the_test_selection_warning(tmp_path):
    from fastcifar.report import warnings

    make_run(tmp_path, "crashed", [12.0, 30.0, 25.0], summary=False)  # images_per_sec 1001, 1002, 1003
    (run,) = find_runs([tmp_path / "crashed"])
    assert run.summary["train_images_per_sec"] == pytest.approx(1002.0)
    assert run.summary["finished"] is False and run.summary["selection"] == "test"
    assert any(w.startswith("crashed selected its best epoch on the test set") for w in warnings([run]))


# ---- a folder where some runs died early or are damaged


def _runs_folder(root: Path) -> dict:
    """Two good runs and one of each way a run can be broken -> the words that say why it was skipped."""
    make_run(root, "good-1", [10.0, 20.0])
    make_run(root, "good-2", [15.0], summary=False)
    broken = {
        "died-in-epoch-1": (None, "stopped before its first epoch"),
        "empty-metrics": ("", "stopped before its first epoch"),
        "summary-not-json": ("{not json", "Cannot read"),
        "summary-a-list": ("[1, 2]", "holds a list"),
        "summary-acc-a-string": ('{"best_acc": "high"}', "best_acc must be numbers"),
        "metrics-garbage-line": ("metrics", "line 1 is not JSON"),
        "metrics-acc-a-string": ("metrics-str", "test_acc must be numbers"),
        "recipe-not-json": ("recipe", "Cannot read"),
    }
    for name, (content, _) in broken.items():
        d = make_run(root, name, [30.0, 40.0], summary=False)
        (d / "metrics.jsonl").unlink()
        if name == "empty-metrics":
            (d / "metrics.jsonl").write_text("")
        elif content == "metrics":
            (d / "metrics.jsonl").write_text('garbage\n{"epoch": 2, "test_acc": 5.0}\n')
        elif content == "metrics-str":
            (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": "5%"}\n')
        elif content == "recipe":
            (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 5.0}\n')
            (d / "recipe.json").write_text("{cut")
        elif content is not None:
            (d / "summary.json").write_text(content)
    return {name: why for name, (_, why) in broken.items()}


def test_report_skips_broken_runs_and_names_them(tmp_path):
    from fastcifar.report import report

    broken = _runs_folder(tmp_path / "runs")
    warnings = []
    table, files = report([tmp_path / "runs"], tmp_path / "out", warn=warnings.append)
    rows = [l.split("|")[1].strip() for l in table.splitlines() if l.startswith("| ") and "---" not in l][1:]
    assert rows == ["good-1", "good-2"]
    results = (tmp_path / "out" / "results.md").read_text()
    for name, why in broken.items():
        line = next(l for l in results.splitlines() if l.startswith(f"Skipped {tmp_path / 'runs' / name}:"))
        assert why in line, (name, line)
        assert any(w.startswith(f"skipped {tmp_path / 'runs' / name}:") and why in w for w in warnings)
    assert all(f.is_file() for f in files)


def test_cli_report_skips_broken_runs_and_exits_2_only_when_none_is_left(tmp_path):
    broken = _runs_folder(tmp_path / "runs")
    code, _, err = cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "Traceback" not in err and all(f"skipped {tmp_path / 'runs' / n}:" in err for n in broken)
    for name in ("good-1", "good-2"):
        import shutil

        shutil.rmtree(tmp_path / "runs" / name)
    code, _, err = cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out2"))
    assert code == 2 and one_paragraph(err, "No run could be reported", tmp_path / "runs" / "died-in-epoch-1"), err
    assert not (tmp_path / "out2").exists()
