"""`fastcifar reproduce`: a table of recipes x seeds in dependency order; results with mean ± std
beside the tutorial's figures; bad input is exit 2. A table stopped by a real SIGINT and continued
without training anything twice: tests/test_many_runs.py."""

import json
from pathlib import Path

import pytest

from fastcifar import owned
from fastcifar.checkpoint import atomic_write
from fastcifar.config import to_dict
from fastcifar.errors import BadInput
from fastcifar.reproduce import collect, plan, published, results_md, state
from helpers import TUTORIAL, cli


def test_the_tutorial_table_quotes_the_tutorial_and_runs_the_teacher_first(tmp_path):
    label, jobs, names = plan("tutorial", 2, tmp_path / "out", ["train.epochs=2"])
    assert label == "tutorial" and set(names) == set(TUTORIAL) and len(jobs) == 24
    for name in names:
        got = published(next(j.info for j in jobs if j.name == name))
        # cosface: "close behind", no figure; the multi-scale experiment: none published
        assert got == (None if name in ("r18_cosface", "r18_arcface_mst") else float(TUTORIAL[name].rstrip("%"))), name
    order = [(j.name, j.seed) for j in jobs]
    assert order.index(("r50_arcface_224", 1)) < order.index(("r18_arcface_kd", 0))
    assert all(j.recipe.train.epochs == 2 and j.recipe.train.seed == j.seed for j in jobs)


def test_order_comes_from_distill_teacher(tmp_path):
    (tmp_path / "t.txt").write_text("r18_arcface_kd\nr18_baseline\nr50_arcface_224\n")
    _, jobs, names = plan(str(tmp_path / "t.txt"), 1, tmp_path / "out")
    assert names == ["r18_arcface_kd", "r18_baseline", "r50_arcface_224"]  # results keep the table's order
    assert [j.name for j in jobs] == ["r18_baseline", "r50_arcface_224", "r18_arcface_kd"]
    kd = jobs[-1]
    assert kd.teacher == "r50_arcface_224" and kd.recipe.distill.teacher == str((tmp_path / "out" / "r50_arcface_224-seed0").resolve())
    # without its teacher in the table, a student keeps the recipe's own teacher (the newest runs/<name>-*)
    (tmp_path / "s.txt").write_text("r18_arcface_kd\n")
    assert plan(str(tmp_path / "s.txt"), 1, tmp_path / "out")[1][0].recipe.distill.teacher == "r50_arcface_224"


def test_results_are_mean_and_sample_std_over_finished_seeds(tmp_path):
    (tmp_path / "t.txt").write_text("r18_baseline\n")
    _, jobs, names = plan(str(tmp_path / "t.txt"), 3, tmp_path / "out")
    for j, (best, final, finished) in zip(jobs, [(40.0, 39.0, True), (44.0, 41.0, True), (90.0, 90.0, False)]):
        j.dir.mkdir(parents=True)
        (j.dir / "summary.json").write_text(json.dumps({
            "best_acc": best, "final_acc": final, "finished": finished, "wall_seconds": 100.0,
            "train_images_per_sec": 1000.0, "stop_reason": "completed" if finished else "interrupted", "synthetic": False}))
    res = collect(tmp_path / "out", "t", 3, [], names, jobs)
    (r,) = res["recipes"]
    assert (r["n"], r["of"], r["best_acc"]["mean"], r["final_acc"]["mean"]) == (2, 3, 42.0, 40.0)
    assert r["best_acc"]["std"] == pytest.approx(2 ** 1.5) and r["published"] == 44.26
    assert r["difference"] == pytest.approx(42.0 - 44.26)
    md = results_md(res)
    assert "| r18_baseline | 2 of 3 | 42.00% ± 2.83 | 40.00% ± 1.41 | 44.26% | -2.26 | 1m 40s | 1,000 |" in md
    assert "r18_baseline seed 2 (interrupted)" in md and "SYNTHETIC" not in md


@pytest.mark.parametrize("table, seeds, sets, match", [
    ("tutorail", 1, [], "No table named 'tutorail'"),
    ("tutorial", 0, [], "--seeds 0"),
    ("tutorial", 1, ["train.seed=3"], "reproduce sets each run's seed"),
    ("tutorial", 1, ["train.epoch=3"], "Unknown key train.epoch"),
    ("tutorial", 1, ["train.epochs=0"], "r18_baseline: train.epochs = 0"),
])
def test_bad_arguments(tmp_path, table, seeds, sets, match):
    with pytest.raises(BadInput, match=match):
        plan(table, seeds, tmp_path / "out", sets)


def test_bad_table_files(tmp_path):
    cases = {"unknown.txt": ("r18_baseline\nr18_nope\n", "No recipe named 'r18_nope'"),
             "empty.txt": ("# nothing\n\n", "lists no recipe"),
             "twice.txt": ("r18_baseline\nr18_wd01\nr18_baseline  # again\n", "line 3 lists 'r18_baseline' again"),
             "binary.txt": (b"\xff\xfe\x00garbage", "Cannot read the table file")}
    for name, (content, match) in cases.items():
        p = tmp_path / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(BadInput, match=match):
            plan(str(p), 1, tmp_path / "out")
    (tmp_path / "adir").mkdir()
    with pytest.raises(BadInput, match="is not a file"):
        plan(str(tmp_path / "adir"), 1, tmp_path / "out")


def test_distillation_cycles_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    for me, other in (("ca", "cb"), ("cb", "ca")):
        (tmp_path / "recipes" / f"{me}.py").write_text(
            f'"""{me}"""\nfrom fastcifar.config import Recipe\n\n\ndef recipe():\n    r = Recipe()\n'
            f'    r.distill.teacher = "{other}"\n    return r\n')
    (tmp_path / "t.txt").write_text("ca\ncb\n")
    with pytest.raises(BadInput, match="cycle"):
        plan("t.txt", 1, tmp_path / "out")


def test_the_out_directory_holds_only_this_tables_runs(tmp_path):
    from fastcifar.reproduce import check_out

    (tmp_path / "t.txt").write_text("r18_baseline\nr18_wd01\n")
    _, jobs, names = plan(str(tmp_path / "t.txt"), 1, tmp_path / "out")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        check_out(tmp_path / "afile", names)
    out = tmp_path / "out"
    (out / "r18_baseline-seed7").mkdir(parents=True)
    atomic_write(out / "results.md", lambda f: f.write(b"old results"), by="reproduce")
    check_out(out, names)  # its own runs (any seed) and the results it wrote are fine
    (out / "results.json").write_text("{}")  # a look-alike: the user's
    with pytest.raises(BadInput, match="`fastcifar reproduce` did not write .*results.json"):
        check_out(out, names)
    (out / "results.json").unlink()
    (out / "notes.txt").write_text("mine")
    (out / "r18_augment-seed0").mkdir()
    with pytest.raises(BadInput, match="notes.txt, r18_augment-seed0, which are not runs of this table"):
        check_out(out, names)

    job = jobs[0]
    assert state(job) == "new"
    job.dir.mkdir()
    (job.dir / "recipe.json").write_text("{}")
    (job.dir / "events.out.tfevents.1.host").write_text("")
    with pytest.raises(BadInput, match="they were changed since"):  # named like a run's files: not proof
        state(job)
    owned.record([job.dir / "recipe.json", job.dir / "events.out.tfevents.1.host"], "train")  # as a run does
    assert state(job) == "restart"  # died before its first checkpoint: only files that run wrote
    (job.dir / "mine.txt").write_text("x")
    with pytest.raises(BadInput, match="`fastcifar train` did not write .*mine.txt"):
        state(job)
    (job.dir / "mine.txt").unlink()
    (job.dir / "last.pt").write_bytes(b"")
    from fastcifar.config import to_dict
    other = to_dict(jobs[1].recipe)  # r18_wd01's settings in r18_baseline's directory
    (job.dir / "recipe.json").write_text(json.dumps({"name": "r18_baseline", **other}))
    with pytest.raises(BadInput, match=r"other settings: optim.weight_decay \(0.1 -> 0.001\)"):
        state(job)
    (job.dir / "recipe.json").write_text(json.dumps(to_dict(job.recipe)))
    (job.dir / "summary.json").write_text(json.dumps({"finished": True, "epochs_done": 200}))
    assert state(job) == "done"
    job.recipe.train.log_every = 7  # how a run logs or where it ran: the same experiment
    assert state(job) == "done"
    job.recipe.train.target_acc = 40.0  # a new target: a finished run is never altered (the table has no target column)
    assert state(job) == "done"
    (job.dir / "summary.json").write_text(json.dumps({"finished": False, "stop_reason": "interrupted"}))
    with pytest.raises(BadInput, match="would replace them"):  # an unfinished one resumes, but not over files
        state(job)                                            # fastcifar did not write
    owned.record([job.dir / n for n in ("last.pt", "recipe.json", "summary.json")], "train")
    assert state(job) == "resume"
    job.recipe.train.epochs = 2  # a dry run's length is another experiment: never mixed into the results
    with pytest.raises(BadInput, match=r"train.epochs \(200 -> 2\)"):
        state(job)


def test_cli_bad_input_exits_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("reproduce", "nosuchtable", "--out", tmp_path / "o")
    assert code == 2 and "No table named" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_seed_counts_out_of_range_are_refused_before_any_recipe_loads(tmp_path, monkeypatch):
    """--seeds 1000000000 planned (loaded a recipe for) 12e9 runs before training the first."""
    from fastcifar import config

    monkeypatch.setattr(config, "load", lambda ref: pytest.fail("a recipe was loaded"))
    for seeds in (-1, 10 ** 9):
        with pytest.raises(BadInput, match=f"--seeds {seeds}: run each recipe 1 to 1,000 times"):
            plan("tutorial", seeds, tmp_path / "out")


def test_a_users_directory_named_like_a_run_is_never_emptied(tmp_path):
    """Without last.pt, a run directory is restarted (its files deleted) only when a run wrote every
    file in it (owned.py): a folder of the user's own recipe.py is not."""
    (tmp_path / "t.txt").write_text("r18_baseline\n")
    _, jobs, _ = plan(str(tmp_path / "t.txt"), 1, tmp_path / "out")
    jobs[0].dir.mkdir(parents=True)
    (jobs[0].dir / "recipe.py").write_text("# my own recipe\n")
    with pytest.raises(BadInput, match="`fastcifar train` did not write .*recipe.py"):
        state(jobs[0])
    assert (jobs[0].dir / "recipe.py").read_text() == "# my own recipe\n"


def test_out_inside_a_store_is_refused(tmp_path):
    from fastcifar.data import prepare
    from fastcifar.reproduce import check_out

    store = prepare(tmp_path / "store", synthetic=True, n_train=20, n_test=10, log=lambda *_: None)
    for out in (store, store / "tables"):
        with pytest.raises(BadInput, match="inside the data store"):
            check_out(out, ["r18_baseline"])


def test_state_of_a_diverged_run_and_of_one_run_another_way(tmp_path):
    """A run whose summary says the loss went non-finite is "failed" (skipped, never resumed); one
    that differs from the plan only in how it ran (data.backend) is the same finished experiment."""
    (tmp_path / "t.txt").write_text("r18_baseline\n")
    _, (job,), _ = plan(str(tmp_path / "t.txt"), 1, tmp_path / "out")
    job.dir.mkdir(parents=True)
    (job.dir / "last.pt").write_bytes(b"")
    (job.dir / "recipe.json").write_text(json.dumps(to_dict(job.recipe)))
    (job.dir / "summary.json").write_text(json.dumps({"finished": False, "stop_reason": "non-finite loss at step 7"}))
    assert state(job) == "failed"
    (job.dir / "summary.json").write_text(json.dumps({"finished": True, "stop_reason": "completed"}))
    job.recipe.data.backend = "tutorial" if job.recipe.data.backend != "tutorial" else "torch"
    assert state(job) == "done"


def test_results_count_only_finished_numbers_and_flag_any_synthetic_run(tmp_path):
    """Wall time is the finished runs' mean (an interrupted run's time is not a run's); a best_acc of
    true is not a number; one synthetic run marks the whole table synthetic."""
    (tmp_path / "t.txt").write_text("r18_baseline\n")
    _, jobs, names = plan(str(tmp_path / "t.txt"), 3, tmp_path / "out")
    for j, (best, finished, wall, synthetic) in zip(jobs, [(40.0, True, 100.0, False), (True, True, 50.0, False),
                                                           (30.0, False, 1000.0, True)]):
        j.dir.mkdir(parents=True)
        (j.dir / "summary.json").write_text(json.dumps({"best_acc": best, "final_acc": 39.0, "finished": finished,
                                                        "wall_seconds": wall, "synthetic": synthetic}))
    res = collect(tmp_path / "out", "t", 3, [], names, jobs)
    (r,) = res["recipes"]
    assert (r["n"], r["best_acc"]["mean"], r["wall_seconds"]) == (1, 40.0, 100.0)
    assert res["synthetic"] is True and "SYNTHETIC" in results_md(res)


def test_the_continue_command_repeats_every_option():
    from fastcifar.reproduce import command

    assert command("t.txt", 2, Path("o d"), ["train.epochs=3"], "/data/c100") == (
        "fastcifar reproduce t.txt --seeds 2 --out 'o d' --set train.epochs=3 --data-dir /data/c100")
