"""Hostile files never crash a command: every reader of JSON, checkpoints, export cards, images,
stores and recipe files turns any failure (RecursionError and MemoryError included) into one
paragraph and exit 2, or, where a command takes many inputs, skips the bad one, names it and goes
on. A small hostile file cannot make fastcifar allocate much before it is refused; a run reference
is a name, never a pattern or a prefix; resume checks the arrays it will read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcifar import checkpoint, jsonio
from fastcifar import data as fdata
from fastcifar.config import from_dict, to_dict
from fastcifar.errors import BadInput, shown
from helpers import CPU_ALLOC, QUIET, ROOT, cli, make_run, one_paragraph, tiny

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit: json.loads raises RecursionError
NESTED = "[" * 40 + "]" * 40  # parses, but deeper than any file fastcifar writes


def _copy_store(store: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(store, to))


# ---- one JSON reader: bounded in size and depth, every failure a BadInput naming the file


@pytest.mark.parametrize("text, says", [
    (DEEP, "nests deeper than the 32 levels"),
    (NESTED, "nests deeper than the 32 levels"),
    ("1" * 5000, "not JSON (ValueError: Exceeds the limit"),  # Python's integer digit limit
    (b'{"a": "\xff"}', "not JSON (UnicodeDecodeError"),
    ('{"a": 1', "not JSON (JSONDecodeError"),
])
def test_json_that_is_not_fastcifars_is_one_bad_input_naming_where(text, says):
    with pytest.raises(BadInput, match=r"^the summary ") as e:
        jsonio.loads(text, "the summary")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_json_files_that_are_too_big_fifos_or_directories_are_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "summary.json"
    with open(big, "wb") as f:
        f.truncate(jsonio.MAX_BYTES + 1)  # sparse: 64 MB that no disk holds
    with monkeypatch.context() as m:
        m.setattr(os, "fdopen", lambda *a: pytest.fail("read a file its size already refuses"))
        with pytest.raises(BadInput, match="larger than any such file fastcifar writes"):
            jsonio.load(big)
    os.mkfifo(tmp_path / "fifo.json")  # no writer: reading it would wait for ever
    with pytest.raises(BadInput, match="not a regular file"):
        jsonio.load(tmp_path / "fifo.json")
    with pytest.raises(BadInput, match="not a regular file"):
        jsonio.load(tmp_path)
    with pytest.raises(BadInput, match="Cannot read"):
        jsonio.load(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text(json.dumps({"a": [[[{"b": 1}]]]}))
    assert jsonio.load(tmp_path / "ok.json") == {"a": [[[{"b": 1}]]]}  # what fastcifar writes reads back


def test_a_value_nested_too_deep_to_repr_is_still_shown():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert "nested too deep" in shown(deep)
    with pytest.raises(BadInput, match="loss.scales = a list nested too deep to show"):  # e.g. a checkpoint's recipe
        from_dict({"loss": {"scales": deep}})


@pytest.mark.parametrize("value", [DEEP, NESTED])
def test_a_deep_set_list_is_exit_2(tmp_path, value):
    code, _, err = cli("train", "smoke", "--set", f"loss.scales={value}", "--out", tmp_path / "r")
    assert code == 2 and one_paragraph(err) and "loss.scales expects" in err.replace("\n", " "), err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("meta", [DEEP, NESTED, '{"checksums": "abc"}'])
def test_a_store_meta_json_nested_deep_or_malformed_is_exit_2(small_store_dir, tmp_path, meta):
    d = _copy_store(small_store_dir, tmp_path / "store")
    if meta.startswith("{"):
        m = json.loads((d / "meta.json").read_text())
        m["checksums"] = "abc"
        meta = json.dumps(m)
    (d / "meta.json").write_text(meta)
    with pytest.raises(BadInput, match="nests deeper|checksums must be an object") as e:
        fdata.open_store(d)
    assert str(d) in str(e.value)
    code, _, err = cli("train", "smoke", "--data-dir", d, "--out", tmp_path / "run")
    assert code == 2 and one_paragraph(err), err
    assert not (tmp_path / "run").exists() and (d / "meta.json").read_text() == meta


def test_bench_tables_and_bench_json_refuse_deep_or_foreign_json(tmp_path):
    from fastcifar.bench import check_json_path

    for name, content, says in (("deep.json", DEEP, "nests deeper"),
                                ("rows.json", '{"rows": 5}', "is not a `fastcifar bench")):
        (tmp_path / name).write_text(content)
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "tables.py"), str(tmp_path / name)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    with pytest.raises(BadInput, match="did not write"):  # a deep file is not one bench may replace
        check_json_path(tmp_path / "deep.json")
    assert (tmp_path / "deep.json").read_text() == DEEP


# ---- export cards and checkpoints: bounded, and a damaged field is one paragraph


def _hand_made(tmp_path: Path, **change) -> Path:
    """A fastcifar checkpoint made by hand (tiny()'s untrained test_resnet, 100 classes), no training."""
    from fastcifar.models import build_model

    r = tiny()
    net = build_model(r.model, r.head, 100)
    ck = {"model": net.state_dict(), "recipe": to_dict(r), "epoch": 1, "info": {"name": "hand"},
          "class_names": [f"c{i}" for i in range(100)],
          "preprocess": {"image_size": 32, "interpolation": "linear", "mean": [0.5] * 3, "std": [0.25] * 3}}
    ck.update(change)
    checkpoint.save(tmp_path / "hand.pt", ck)
    return tmp_path / "hand.pt"


def _png(path: Path, side: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def test_a_checkpoint_whose_preprocess_is_not_a_mapping_is_exit_2(tmp_path):
    pytest.importorskip("PIL")
    ck = _hand_made(tmp_path, preprocess=[1, 2])
    img = _png(tmp_path / "a.png")
    for args in (("predict", ck, img), ("export", ck, "--format", "timm", "--out", tmp_path / "m.pth")):
        code, _, err = cli(*args)
        assert code == 2 and one_paragraph(err) and "preprocess" in err, err
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("card, says", [
    (DEEP, "its fastcifar metadata nests deeper"),
    (NESTED, "its fastcifar metadata nests deeper"),
    ("x" * (2 << 20), "over 1024 KB"),
])
def test_an_export_card_nested_deep_or_oversized_is_exit_2(tmp_path, card, says):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"), metadata={"fastcifar": card})
    code, _, err = cli("predict", tmp_path / "m.safetensors", _png(tmp_path / "a.png"))
    assert code == 2 and one_paragraph(err) and says in err.replace("\n", " "), err


def test_a_card_asking_for_a_large_input_predicts_in_small_batches(tmp_path, monkeypatch):
    """The card's input side sets the batch: 64 images at 224 px or less, fewer past it (64 at 1024
    px would run the network on gigabytes of activations)."""
    import fastcifar.export as ex
    import fastcifar.predict as pr

    assert pr.batch_for(32) == pr.batch_for(224) == 64 and pr.batch_for(448) == 16 and pr.batch_for(1024) == 3
    assert ex.MAX_SIDE == 1024  # no card asks for more than a recipe can train at
    ck = _hand_made(tmp_path, preprocess={"image_size": 448, "interpolation": "linear", "mean": [0.5] * 3,
                                          "std": [0.25] * 3})
    batches = []
    preprocess = ex.preprocess
    monkeypatch.setattr(ex, "preprocess", lambda images, c: batches.append(len(images)) or preprocess(images, c))
    res = pr.predict(ck, [_png(tmp_path / "imgs" / f"{i}.png", seed=i) for i in range(20)], log=QUIET["log"])
    assert batches == [16, 4] and len(res["predictions"]) == 20


def test_predict_running_out_of_memory_is_one_paragraph(tmp_path, monkeypatch):
    import fastcifar.export as ex

    ck, img = _hand_made(tmp_path), _png(tmp_path / "a.png")
    for error in (RuntimeError(CPU_ALLOC), MemoryError("Unable to allocate 9.0 GiB for an array")):
        monkeypatch.setattr(ex, "preprocess", lambda *a, error=error: (_ for _ in ()).throw(error))
        code, _, err = cli("predict", ck, img)
        assert code == 2 and one_paragraph(err) and "ran out of memory" in " ".join(err.split()), err
    monkeypatch.setattr(ex, "preprocess", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # another error is not called a memory error
        cli("predict", ck, img)


# ---- images: a bad one is skipped and named; a huge one refused from its header


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims width x height pixels (8-bit RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_a_small_png_claiming_100_megapixels_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    from fastcifar.predict import read_image

    bomb = _png_claiming(tmp_path / "bomb.png", 10_000, 10_000)  # 100 Mpx: Pillow only warns below 179 Mpx
    assert bomb.stat().st_size < 200
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im))
    with pytest.raises(ValueError, match="10000x10000 pixels, over the 89,478,485"):
        read_image(bomb)
    assert decoded == []  # refused from the header: no 300 MB decode


def test_predict_skips_unreadable_images_and_folders_and_predicts_the_rest(tmp_path, monkeypatch):
    ck = _hand_made(tmp_path)
    good = _png(tmp_path / "imgs" / "good.png")
    bomb = _png_claiming(tmp_path / "imgs" / "bomb.png", 10_000, 10_000)
    locked = tmp_path / "locked" / "x.png"  # a folder this user may not enter (as root, chmod cannot say so)
    sub = tmp_path / "imgs" / "private"
    sub.mkdir()
    is_dir, walk = Path.is_dir, os.walk

    def denied(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return is_dir(self)

    def walk_denied(top, onerror=None, **kw):  # os.walk meets a subfolder it cannot list
        for root, dirs, names in walk(top, onerror=onerror, **kw):
            if Path(root) == sub:
                onerror(PermissionError(13, "Permission denied", str(sub)))
                continue
            yield root, dirs, names

    monkeypatch.setattr(Path, "is_dir", denied)
    monkeypatch.setattr(os, "walk", walk_denied)
    code, out, err = cli("predict", ck, locked, tmp_path / "imgs", "--json")
    assert code in (0, None), err
    res = json.loads(out)
    assert [p["file"] for p in res["predictions"]] == [str(good)]
    skipped = {s["file"]: s["error"] for s in res["skipped"]}
    assert "Permission denied" in skipped[str(locked)] and "Permission denied" in skipped[str(sub)]
    assert "over the 89,478,485" in skipped[str(bomb)]
    assert all(f"skipped {f}" in err for f in (locked, sub, bomb))


# ---- report: a run that cannot be read is skipped and named; extreme numbers never crash it


def test_report_skips_runs_it_cannot_read_and_reports_the_rest(tmp_path, monkeypatch):
    from fastcifar.report import report

    runs = tmp_path / "runs"
    make_run(runs, "good", [10.0, 20.0])
    why = {}
    for name, file, content, says in (
            ("deep-summary", "summary.json", DEEP, "nests deeper"),
            ("deep-metrics", "metrics.jsonl", '{"epoch": 1, "test_acc": 5.0}\n' + NESTED + "\n", "line 2 nests deeper"),
            ("deep-recipe", "recipe.json", NESTED, "nests deeper"),
            ("huge-summary", "summary.json", None, "larger than any such file"),
            ("latin1-summary", "summary.json", b'{"recipe": "caf\xe9"}', "not UTF-8"),
            ("locked", None, None, "Permission denied")):
        d = make_run(runs, name, [30.0], summary=file != "recipe.json")
        if file == "recipe.json":
            (d / "metrics.jsonl").unlink()
            (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 5.0}\n')
        if file is None:
            continue
        (d / file).unlink()
        if content is None:
            with open(d / file, "wb") as f:
                f.truncate(jsonio.MAX_BYTES + 1)
        else:
            (d / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        why[name] = says
    why["locked"] = "Permission denied"
    is_file = Path.is_file

    def denied(self):  # the run directory `locked` cannot be entered (chmod 000 does not stop root)
        if self.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return is_file(self)

    monkeypatch.setattr(Path, "is_file", denied)
    warned = []
    table, files = report([runs], tmp_path / "out", warn=warned.append)
    assert [l.split("|")[1].strip() for l in table.splitlines()[2:] if l.startswith("| ")] == ["good"]
    for name, says in why.items():
        line = next(w for w in warned if w.startswith(f"skipped {runs / name}:"))
        assert says in line, (name, line)
    assert all(f.is_file() for f in files)


def test_report_formats_and_draws_extreme_finite_values(tmp_path):

    runs = tmp_path / "runs"
    d = make_run(runs, "wild", [10.0, 20.0, 30.0], wall_seconds=1e308, train_images_per_sec=1e308,
                 data_wait_fraction=1e300, best_acc=-1e308)
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    lines[0].update(test_acc=1e308, test_loss=-1e308)
    lines[1].update(epoch=1e308, test_acc=float("inf"))
    lines[2].update(test_acc=-1e308, test_loss=1e308)  # one axis from -1e308 to 1e308: its range overflows
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    make_run(runs, "tame", [5.0, 6.0])
    code, out, err = cli("report", runs, "--out", tmp_path / "out")
    assert code == 0 and "Traceback" not in err, err
    row = next(l for l in out.splitlines() if l.startswith("| wild |"))
    assert "1e+308 s" in row and "-1e+308%" in row and len(row) < 300, row
    for name in ("results.md", "test_accuracy.png", "test_loss.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


# ---- run references are names: never a pattern, never another recipe's prefix


def _runs(tmp_path: Path, *names: str) -> Path:
    for i, name in enumerate(names):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "best.pt").write_bytes(f"checkpoint of {name}".encode())
        os.utime(d, (1_000_000 + i, 1_000_000 + i))  # later in the list: newer
    return tmp_path / "runs"


def test_a_recipe_name_finds_its_own_runs_only(tmp_path):
    runs = _runs(tmp_path, "smoke-20240101-120000", "smoke-20240101-120000-2", "smoke-v2-20240301-000000",
                 "smokey-20240401-000000", "smoke-notes")
    assert checkpoint.resolve("smoke", runs_dir=runs) == runs / "smoke-20240101-120000-2" / "best.pt"
    assert checkpoint.runs_of("smoke", runs) == [runs / "smoke-20240101-120000", runs / "smoke-20240101-120000-2"]
    assert checkpoint.resolve("smoke-v2", runs_dir=runs) == runs / "smoke-v2-20240301-000000" / "best.pt"
    for pattern in ("smoke*", "s*", "smok", "smoke-v2-*", "*", "a**", "[s]moke", "smoke?20240101-120000"):
        with pytest.raises(BadInput, match="is neither a checkpoint file"):
            checkpoint.resolve(pattern, runs_dir=runs)


@pytest.mark.parametrize("args", [
    ("eval", "smoke"), ("eval", "a**"), ("eval", "[x"), ("export", "smoke", "--format", "timm"),
    ("predict", "smoke", "img.png"),
    ("train", "smoke", "--set", "model.init_from=smoke", "--set", "train.device=cpu"),
    ("train", "smoke", "--set", "distill.teacher=smoke", "--set", "train.device=cpu"),
])
def test_a_run_reference_is_never_a_pattern_or_another_recipes_prefix(tmp_path, monkeypatch, args):
    """Only smoke-v2 has run here: `smoke` names no run (it once took smoke-v2's, and init_from then
    trained from another architecture), and `a**` is no glob (it once was a ValueError traceback)."""
    runs = _runs(tmp_path, "smoke-v2-20240301-000000")
    _png(tmp_path / "img.png")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, err = cli(*args)
    assert code == 2 and one_paragraph(err), err
    assert "finished run" in err.replace("\n", " ") and "smoke-v2" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (runs / "smoke-v2-20240301-000000" / "best.pt").read_bytes() == b"checkpoint of smoke-v2-20240301-000000"


# ---- recipe files


def test_a_recipe_path_without_py_is_exit_2(tmp_path, monkeypatch):
    (tmp_path / "myrecipe").write_text('"""Mine."""\nfrom fastcifar.config import Recipe\n\ndef recipe():\n'
                                       '    return Recipe()\n')
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("train", "./myrecipe")
    assert code == 2 and one_paragraph(err) and "does not end in .py" in " ".join(err.split()), err


def test_recipes_lists_the_others_when_a_file_is_unreadable(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "huge.py").write_text('"""Huge."""\nx = ' + "1+" * 100_000 + "1\n")  # RecursionError
    (tmp_path / "recipes" / "latin.py").write_bytes(b'"""Caf\xe9."""\n')
    (tmp_path / "recipes" / "nul.py").write_bytes(b'"""a\x00b."""\n')
    (tmp_path / "recipes" / "mine.py").write_text('"""My own recipe."""\n')
    code, out, err = cli("recipes", spawn=True, cwd=tmp_path)
    assert code == 0 and "Traceback" not in err, err
    rows = {l.split()[0]: l for l in out.splitlines() if l.strip()}
    assert "(unreadable: RecursionError" in rows["huge"]
    assert "(unreadable: SyntaxError" in rows["latin"] and "(unreadable: SyntaxError" in rows["nul"]
    assert rows["mine"].endswith("My own recipe.") and "smoke" in rows  # the rest is listed


@pytest.mark.parametrize("body, line, code", [
    ('"""Bad."""\nfrom fastcifar.config import Recipe\n\n\nx = undefined_name + 1\n', 5, "x = undefined_name + 1"),
    ('"""Bad."""\nfrom fastcifar.config import Recipe\n\n\ndef recipe():\n    r = Recipe()\n'
     '    r.train.epochs = 1 // 0\n    return r\n', 7, "r.train.epochs = 1 // 0"),
    ('"""Bad."""\nfrom fastcifar.config import Recipe\n\n\ndef helper():\n    return Recipe(foo=1)\n\n\n'
     'def recipe():\n    return helper()\n', 6, "return Recipe(foo=1)"),  # the deepest line of the recipe's own
    ('"""Bad."""\n\ndef recipe(:\n    pass\n', 3, "def recipe(:"),
])
def test_a_recipes_own_error_names_its_file_line_and_code(tmp_path, monkeypatch, body, line, code):
    (tmp_path / "bad.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("train", "./bad.py")
    assert rc == 2 and one_paragraph(err), err
    assert f"At bad.py:{line}: {code}" in " ".join(err.split()), err


# ---- stores: a file of the wrong size is refused at open; resume hashes what it will read


@pytest.mark.parametrize("change, says", [(-1, "cut short"), (-5000, "cut short"), (+7, "bytes added at its end")])
def test_a_store_array_of_the_wrong_size_is_refused_at_open(small_store_dir, tmp_path, change, says):
    d = _copy_store(small_store_dir, tmp_path / "store")
    npy = d / "train_images.npy"
    size = npy.stat().st_size
    if change < 0:
        os.truncate(npy, size + change)
    else:
        with open(npy, "ab") as f:
            f.write(b"\0" * change)
    with pytest.raises(BadInput, match=f"train_images.npy: {size + change:,} bytes where its header describes "
                                       f"{size:,}: {says}"):
        fdata.open_store(d)
    code, _, err = cli("train", "smoke", "--data-dir", d, "--out", tmp_path / "run")
    assert code == 2 and one_paragraph(err) and "train_images.npy" in err, err


def test_resume_checks_the_arrays_on_disk_not_what_meta_json_claims(small_store_dir, tmp_path):
    from fastcifar.train import check_same_store

    d = _copy_store(small_store_dir, tmp_path / "store")
    s = fdata.open_store(d)
    recorded = {"dir": str(d), "sha256": s.recorded_sha256}
    check_same_store(s, recorded, "runs/x")  # untouched: resumes
    with open(d / "train_images.npy", "r+b") as f:  # one pixel changed in place; meta.json still agrees
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    s = fdata.open_store(d)
    assert s.recorded_sha256 == recorded["sha256"]
    with pytest.raises(BadInput, match=r"train_images\.npy changed on disk since prepare wrote it"):
        check_same_store(s, recorded, "runs/x")


def test_resume_on_a_store_changed_in_place_exits_2_and_writes_nothing(small_store_dir, tmp_path):
    import fastcifar.train as T

    d = _copy_store(small_store_dir, tmp_path / "store")
    run = tmp_path / "run"
    T.train(tiny(train__epochs=1, data__batch_size=50), {"name": "tiny"}, out=run, data_dir=d, **QUIET)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with open(d / "test_images.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x01\x02\x03")
    code, _, err = cli("train", "--resume", run, "--set", "train.epochs=2")
    assert code == 2 and one_paragraph(err) and "test_images.npy changed on disk" in " ".join(err.split()), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


TRUNCATE_MID_EPOCH = """
import os, sys
import numpy as np
from fastcifar.config import Recipe
from fastcifar.data import open_store
from fastcifar.pipelines.loader import make_loader

store = open_store(sys.argv[1])
spec = Recipe().aug
loader = make_loader(store, "train", spec, 50, backend=sys.argv[2], device="cpu", augment=False, shuffle=False)
loader.set_epoch(0)
seen = 0
for i, (images, labels) in enumerate(loader):
    if i == 0:  # the store's file is cut to its header while the run reads it (a `cp` over it, a full disk)
        os.truncate(os.path.join(sys.argv[1], "train_images.npy"), 128)
    seen += len(labels)
print("read", seen)
"""


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.skipif(
    not __import__("fastcifar.pipelines.loader", fromlist=["dali_available"]).dali_available(), reason="needs DALI")), "torch"])
def test_a_store_cut_short_while_a_loader_reads_it_does_not_kill_the_process(small_store_dir, tmp_path, backend):
    """The loaders read the split into RAM once: a memmap read past a file cut short meanwhile is a
    SIGBUS, which kills the run unsaved, its summary.json still saying "running"."""
    d = _copy_store(small_store_dir, tmp_path / "store")
    r = subprocess.run([sys.executable, "-c", TRUNCATE_MID_EPOCH, str(d), backend], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["read", "300"], (r.returncode, r.stderr[-2000:])
