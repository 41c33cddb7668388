"""fastcifar export and predict: tiny trained runs (a linear head, a linear head on a CIFAR stem, an
ArcFace head at 40 px cubic) exported in each format give fastcifar's top-1 in onnxruntime, timm
and plain Python; predict reads real image files of any kind; bad input exits 2 and writes nothing."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort  # the export extra, part of dev
import pytest
import torch
from PIL import Image

import fastcifar.export as ex
from fastcifar import checkpoint, owned
from fastcifar.config import from_dict
from fastcifar.data import open_store
from fastcifar.errors import BadInput
from fastcifar.models import build_model
import fastcifar.predict as pr
from fastcifar.pipelines.loader import make_loader
from fastcifar.predict import gather, predict, read_image
from fastcifar.train import evaluate_checkpoint
from helpers import QUIET, cli


ROOT = Path(__file__).resolve().parent.parent
def reference(run: Path, data: Path):
    """fastcifar's own evaluation of a run, built as `fastcifar eval` builds it: (net, recipe,
    the torch backend's test images, their logits)."""
    ck = checkpoint.load(run / "best.pt")
    r = from_dict(ck["recipe"])
    r.model.pretrained = False
    net = build_model(r.model, r.head, 100)
    net.load_state_dict(ck["model"])
    net.eval()
    loader = make_loader(open_store(data), "test", r.aug, 64, backend="torch", augment=False)
    loader.set_epoch(0)
    x = torch.cat([images for images, _ in loader]).contiguous()
    with torch.no_grad():
        return net, r, x, net(x)


def assert_same_top1(ours: torch.Tensor, theirs, atol: float):
    """theirs is within atol of our logits, and picks our top-1 wherever the difference it shows
    could not flip it (our top two further apart than twice that difference)."""
    theirs = torch.as_tensor(np.asarray(theirs))
    diff = (ours - theirs).abs().max().item()
    assert diff < atol
    top2 = ours.topk(2, 1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
    assert clear.float().mean() > 0.9  # the comparison covers (nearly) every image
    assert torch.equal(ours.argmax(1)[clear], theirs.argmax(1)[clear])


def _cli(*args):
    """helpers.cli, and fastcifar printed no traceback."""
    code, out, err = cli(*args)
    assert "Traceback" not in err
    return code, out, err


def _write(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


# ---- the formats ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "arcface"])
def test_onnx_gives_fastcifar_top1_with_a_dynamic_batch(export_runs, small_store_dir, onnx_files, kind):
    net, r, x, ours = reference(export_runs / kind, small_store_dir)
    sess = ort.InferenceSession(str(onnx_files[kind]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, out.name) == ("images", "logits")
    assert inp.shape[1:] == [3, r.aug.image_size, r.aug.image_size] and isinstance(inp.shape[0], str)
    theirs = sess.run(None, {"images": x.numpy()})[0]
    assert theirs.shape == (64, 100)
    assert_same_top1(ours, theirs, atol=1e-3 * max(1, ours.abs().max().item()))
    assert np.allclose(sess.run(None, {"images": x[:1].numpy()})[0], theirs[:1], atol=1e-4 * max(1, ours.abs().max().item()))
    # the same accuracy as `fastcifar eval`
    acc = 100 * (theirs.argmax(1) == open_store(small_store_dir).labels("test")).mean()
    assert acc == pytest.approx(evaluate_checkpoint(str(export_runs / kind), data_dir=small_store_dir)["acc"])
    card = json.loads(sess.get_modelmeta().custom_metadata_map["fastcifar"])
    assert card["head"]["kind"] == kind and card["preprocess"]["image_size"] == r.aug.image_size


def test_onnx_export_reports_its_check(onnx_files, onnx_log):
    checks = [line for line in onnx_log if line.startswith("checked: onnxruntime vs torch")]
    assert len(checks) == 2
    for check in checks:
        assert "8 store test images" in check and "max |logit difference|" in check and "top-1 agrees on 8/8" in check
    assert any(line.startswith(f"wrote {onnx_files['arcface']}") and "40x40 (cubic" in line for line in onnx_log)


@pytest.mark.parametrize("fmt", ["safetensors", "timm"])
def test_export_check_refuses_an_export_that_does_not_reproduce_the_model(export_runs, small_store_dir, monkeypatch, tmp_path, fmt,
                                                                        capsys):
    name = {"safetensors": "to_safetensors", "timm": "to_timm"}[fmt]
    real = getattr(ex, name)

    def wrong_weights(net, c, *a):  # an exporter bug: one class's bias off by 1
        net = copy.deepcopy(net)
        net.head.fc.bias.data[3] += 1
        return real(net, c, *a)

    monkeypatch.setattr(ex, name, wrong_weights)
    code, out, err = _cli("export", str(export_runs / "linear"), "-f", fmt, "--out", str(tmp_path),
                     "--data-dir", str(small_store_dir))
    assert code == 1 and "does not reproduce" in err and "Nothing was written" in err.replace("\n", " ")
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_onnxruntime_cannot_run_is_not_written(export_runs, small_store_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ex, "to_onnx", lambda net, c, x: b"\x08\x07 not a model")  # an exporter that went wrong
    code, out, err = _cli("export", str(export_runs / "linear"), "-f", "onnx", "--out", str(tmp_path),
                     "--data-dir", str(small_store_dir))
    assert code == 1 and "onnxruntime cannot run" in err and list(tmp_path.iterdir()) == []


def _example(name: str):
    """A function of docs/examples/load_export.py, the code docs/export.md gives users without fastcifar."""
    scope = {}
    exec(compile((ROOT / "docs" / "examples" / "load_export.py").read_text(), "load_export.py", "exec"), scope)
    return scope[name]


@pytest.mark.parametrize("kind", ["linear", "stem", "arcface"])
def test_safetensors_loads_in_plain_python_as_the_docs_say(export_runs, small_store_dir, kind):
    net, r, x, ours = reference(export_runs / kind, small_store_dir)
    path = ex.export(export_runs / kind, "safetensors", data_dir=small_store_dir, **QUIET)
    logits, card = _example("load_safetensors_export")(str(path))
    store = open_store(small_store_dir)
    assert card["class_names"] == store.class_names and card["num_classes"] == 100
    assert card["preprocess"]["mean"] == pytest.approx(store.mean) and card["preprocess"]["std"] == pytest.approx(store.std)
    assert card["preprocess"]["interpolation"] == r.aug.interpolation and card["model"]["name"] == "test_resnet"
    with torch.no_grad():
        assert_same_top1(ours, logits(x), atol=1e-4 * max(1, ours.abs().max().item()))


def test_a_run_evaluated_on_the_plain_cosine_exports_and_predicts_s_scaled_logits(export_runs, small_store_dir):
    """head.eval_logits=cosine (the tutorial's evaluation) ranks as s * cosine does, but its softmax
    is near uniform: exports and predict give s * cosine, which is what the card's head (no
    eval_logits) rebuilds, so the export's own check passes and probabilities mean something."""
    from fastcifar.predict import open_model

    net, r, x, cosine = reference(export_runs / "arcface_cosine", small_store_dir)
    assert r.head.eval_logits == "cosine" and r.head.s > 1
    path = ex.export(export_runs / "arcface_cosine", "safetensors", data_dir=small_store_dir, **QUIET)
    for ref in (path, export_runs / "arcface_cosine"):  # the export, and the checkpoint itself
        _, logits, _ = open_model(ref)
        with torch.no_grad():
            assert torch.allclose(logits(x), r.head.s * cosine, atol=1e-4 * r.head.s), ref


def test_timm_export_loads_strict_into_plain_timm(export_runs, small_store_dir):
    import timm

    net, r, x, ours = reference(export_runs / "linear", small_store_dir)
    lines = []
    path = ex.export(export_runs / "linear", "timm", data_dir=small_store_dir, log=lines.append)
    assert path.name == "best-timm.pth"
    m = timm.create_model("test_resnet", num_classes=100)
    m.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        assert_same_top1(ours, m.eval()(x), atol=1e-5)
    assert "model.load_state_dict" in "\n".join(lines) and "set_submodule" not in "\n".join(lines)


def test_timm_export_of_a_cifar_stem_needs_the_printed_stem(export_runs, small_store_dir):
    import timm

    net, r, x, ours = reference(export_runs / "stem", small_store_dir)
    lines = []
    path = ex.export(export_runs / "stem", "timm", data_dir=small_store_dir, log=lines.append)
    code = "\n".join(lines).split("load it with:\n", 1)[1]
    scope = {}
    exec(code, scope)  # the code export prints, as a user would paste it
    with torch.no_grad():
        assert_same_top1(ours, scope["model"](x), atol=1e-5)
        # test_resnet's stem conv has the same shape either way: a strict load succeeds without the
        # stem lines, and computes something else. That is why export prints them.
        plain = timm.create_model("test_resnet", num_classes=100)
        plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
        assert (plain.eval()(x) - ours).abs().max() > 0.1


def test_timm_refuses_a_margin_head(export_runs, small_store_dir, monkeypatch, capsys):
    code, _, err = _cli("export", str(export_runs / "arcface"), "--format", "timm", "--data-dir", str(small_store_dir))
    assert code == 2 and "onnx" in err and "safetensors" in err
    assert not (export_runs / "arcface" / "best-timm.pth").exists()


# ---- predict ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "arcface"])
def test_predict_on_store_pngs_matches_fastcifar_eval_for_checkpoint_and_exports(export_runs, small_store_dir, onnx_files, kind, tmp_path):
    net, r, x, ours = reference(export_runs / kind, small_store_dir)
    test = open_store(small_store_dir).images("test")
    files = [_write(tmp_path / f"{i:02d}.png", np.array(test[i])) for i in range(16)]
    probs = torch.softmax(ours[:16], 1)
    for ref in (export_runs / kind, onnx_files[kind], ex.export(export_runs / kind, "safetensors", out=tmp_path, data_dir=small_store_dir, **QUIET)):
        res = predict(ref, [tmp_path], top=3, **QUIET)
        assert [p["file"] for p in res["predictions"]] == [str(f) for f in files]
        for p, want, prob in zip(res["predictions"], ours[:16].argmax(1).tolist(), probs):
            assert p["top"][0]["index"] == want and p["top"][0]["class"] == open_store(small_store_dir).class_names[want]
            assert p["top"][0]["prob"] == pytest.approx(prob.max().item(), abs=1e-4)
            assert [t["prob"] for t in p["top"]] == sorted((t["prob"] for t in p["top"]), reverse=True)


def test_read_image_makes_any_picture_a_32px_rgb_cifar_image(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(read_image(_write(tmp_path / "rgb.png", rgb)), rgb)  # 32x32 passes untouched
    rgba = np.dstack([rgb, rng.integers(0, 256, (32, 32), dtype=np.uint8)])
    assert np.array_equal(read_image(_write(tmp_path / "rgba.png", rgba)), rgb)  # alpha dropped
    grey = rgb[..., 0]
    assert np.array_equal(read_image(_write(tmp_path / "grey.png", grey)), np.stack([grey] * 3, -1))
    few = (rgb // 64) * 64  # 64 colours: a palette image holds them exactly
    assert np.array_equal(read_image(_palette(tmp_path / "pal.png", few)), few)
    deep = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    got = read_image(_write(tmp_path / "deep.png", deep))
    assert np.array_equal(got[..., 0], np.round(deep / 257).astype(np.uint8))  # scaled, not clipped at 255
    # wide: red | blue square | green; the centre square is what is left
    wide = np.zeros((90, 270, 3), np.uint8)
    wide[:, :90, 0], wide[:, 90:180, 2], wide[:, 180:, 1] = 255, 255, 255
    assert np.array_equal(read_image(_write(tmp_path / "wide.jpg", wide, quality=100)).argmax(-1), np.full((32, 32), 2))
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[100:200, :, 1] = 200
    got = read_image(_write(tmp_path / "tall.png", tall))
    assert got.shape == (32, 32, 3) and (got == [0, 200, 0]).all()  # the centre square, not the top one
    tiny_img = read_image(_write(tmp_path / "tiny.png", rgb[:8, :8]))  # upsampled
    assert tiny_img.shape == (32, 32, 3)
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): the white top edge ends up on the right
    half = np.zeros((64, 64, 3), np.uint8)
    half[:32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = read_image(_write(tmp_path / "exif.jpg", half, exif=exif, quality=100)).astype(int)
    assert rotated[:, 16:].mean() > 200 and rotated[:, :16].mean() < 50
    for bad, content in (("text.png", b"not an image"), ("empty.jpg", b""),
                         ("cut.png", (tmp_path / "rgb.png").read_bytes()[:300])):
        (tmp_path / bad).write_bytes(content)
        with pytest.raises(ValueError):
            read_image(tmp_path / bad)


def test_a_shrunk_photo_is_filtered_not_sampled_and_32_bit_images_are_scaled(tmp_path):
    """Stripes of one pixel shrunk 10x become their average grey (an antialiased filter), not
    stripes or one flat colour of them (sampling: aliasing); a 32-bit integer image (Pillow's mode I,
    e.g. a TIFF) is scaled as a 16-bit one, not clipped at 255."""
    stripes = np.zeros((320, 320, 3), np.uint8)
    stripes[:, ::2] = 255
    got = read_image(_write(tmp_path / "stripes.png", stripes)).astype(int)
    assert np.abs(got - 127.5).max() < 10
    deep = np.random.default_rng(0).integers(0, 65536, (32, 32), dtype=np.int32)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I"
    assert np.array_equal(read_image(tmp_path / "deep.tif")[..., 0], np.round(deep / 257).astype(np.uint8))


def test_a_palette_image_with_alpha_is_read_without_a_pillow_warning(tmp_path):
    import warnings

    rgba = np.random.default_rng(0).integers(0, 4, (32, 32, 4), dtype=np.uint8) * 85  # 256 colours with alpha
    Image.fromarray(rgba).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as im:
        assert im.mode == "P" and isinstance(im.info.get("transparency"), bytes)
        expected = np.asarray(im.convert("RGBA"))[..., :3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "should be converted to RGBA" would be a line on the user's stderr
        assert np.array_equal(read_image(tmp_path / "pal.png"), expected)


def _palette(path: Path, rgb: np.ndarray) -> Path:
    Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MAXCOVERAGE, dither=Image.Dither.NONE).save(path)
    assert Image.open(path).mode == "P"
    return path


def test_predict_cli_names_and_skips_bad_files_and_predicts_the_rest(export_runs, small_store_dir, onnx_files, tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "mixed"
    good = [_write(d / "photo.jpg", rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)),
            _write(d / "sub" / "grey.png", rng.integers(0, 256, (50, 50), dtype=np.uint8)),
            _write(d / "sub" / "rgba.png", rng.integers(0, 256, (20, 40, 4), dtype=np.uint8)),
            _write(d / "z.JPEG", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))]
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    (d / "truncated.jpg").write_bytes(good[0].read_bytes()[:2000])
    (d / "notes.txt").write_text("not an image, not named like one: left out")
    (d / ".hidden.png").write_bytes(b"hidden files are left out")
    os.mkfifo(d / "sub" / "pipe.png")  # opening it would wait for a writer for ever
    (d / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "fastcifar", "predict", str(onnx_files["arcface"]), str(d),
                        str(tmp_path / "empty"), str(tmp_path / "missing.png"), "--json", "--top", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert sorted(p["file"] for p in res["predictions"]) == sorted(str(f) for f in good)
    assert all(len(p["top"]) == 2 for p in res["predictions"])
    skipped = {Path(s["file"]).name: s["error"] for s in res["skipped"]}
    assert set(skipped) == {"corrupt.png", "truncated.jpg", "empty", "missing.png", "pipe.png", "gone.jpg"}
    assert skipped["pipe.png"] == "not a regular file" and skipped["gone.jpg"] == "a link to nothing"
    assert "truncated" in skipped["truncated.jpg"] or "incomplete" in skipped["truncated.jpg"].lower()
    for name in skipped:
        assert f"skipped {next(s['file'] for s in res['skipped'] if Path(s['file']).name == name)}" in r.stderr
    assert "Traceback" not in r.stderr


def test_predict_prints_each_file_then_its_classes(export_runs, small_store_dir, tmp_path, monkeypatch, capsys):
    img = _write(tmp_path / "img.jpg", np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    code, out, err = _cli("predict", str(export_runs / "linear"), str(img), "--top", "1000")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == str(img) and len(lines) == 1 + 100  # --top clamps to the classes there are
    assert all(re.fullmatch(r"\s+\d+\.\d\d%  \w+", line) for line in lines[1:])


def test_gather_gives_a_folders_pictures_sorted_once_each_without_hidden_ones(tmp_path):
    """A folder gives its pictures in name order; hidden files and folders (.thumbnails, .git) are
    left out, a FIFO is skipped unopened; a file named twice, or named and found again in its
    folder, is predicted once."""
    d = tmp_path / "imgs"
    pics = [_write(d / f"{name}.png", np.zeros((4, 4, 3), np.uint8)) for name in ("b", "f", "a", "e", "c", "d")]
    _write(d / ".hidden.png", np.zeros((4, 4, 3), np.uint8))
    _write(d / ".thumbnails" / "a.png", np.zeros((4, 4, 3), np.uint8))
    os.mkfifo(d / "pipe.png")
    files, skipped = gather([d, pics[0], d / "." / "b.png"], **QUIET)
    assert files == sorted(pics) and skipped == [{"file": str(d / "pipe.png"), "error": "not a regular file"}]


def test_predict_takes_the_ema_weights_and_every_image_across_forward_batches(export_runs, small_store_dir, tmp_path, monkeypatch):
    """A checkpoint that holds EMA weights is predicted with them, as eval and export use them; images
    beyond one forward batch are all predicted, each under its own file name, in order."""
    ck = checkpoint.load(export_runs / "linear" / "best.pt")
    ema = {k: v.clone() for k, v in ck["model"].items()}
    ema["head.fc.bias"][7] += 1000.0  # the EMA weights say class 7, surely, whatever the image
    checkpoint.save(tmp_path / "ema.pt", {**ck, "ema": ema})
    monkeypatch.setattr(pr, "BATCH", 3)  # 7 images: batches of 3, 3 and 1
    rng = np.random.default_rng(3)
    files = [_write(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(7)]
    res = predict(tmp_path / "ema.pt", [tmp_path / "imgs"], top=2, **QUIET)
    assert [p["file"] for p in res["predictions"]] == [str(f) for f in files]
    assert all(p["top"][0]["index"] == 7 and p["top"][0]["prob"] == 1.0 for p in res["predictions"])
    raw = predict(export_runs / "linear", files, top=2, **QUIET)
    assert [p["file"] for p in raw["predictions"]] == [str(f) for f in files]
    # the raw weights (no +1000 on class 7) do not give that same certain answer for all seven noise images
    assert not all(p["top"][0]["index"] == 7 and p["top"][0]["prob"] == 1.0 for p in raw["predictions"])


def test_export_takes_the_ema_weights_and_says_so_in_its_card(export_runs, small_store_dir, tmp_path):
    """A checkpoint that holds EMA weights is exported with them (as eval and predict use them), and
    the card's source names them."""
    ck = checkpoint.load(export_runs / "linear" / "best.pt")
    ema = {k: v.clone() for k, v in ck["model"].items()}
    ema["head.fc.bias"][7] += 1000.0
    checkpoint.save(tmp_path / "ema.pt", {**ck, "ema": ema})
    path = ex.export(tmp_path / "ema.pt", "safetensors", data_dir=small_store_dir, **QUIET)
    c, state = ex.read_safetensors(path)
    assert c["source"]["weights"] == "ema" and state["head.fc.bias"][7] > 500
    assert ex.read_safetensors(ex.export(export_runs / "linear", "safetensors", out=tmp_path / "raw.safetensors",
                                         data_dir=small_store_dir, **QUIET))[0]["source"]["weights"] == "raw"


def test_a_full_disk_during_export_leaves_the_earlier_export_whole(export_runs, small_store_dir, tmp_path):
    """--force replaces an export by a rename: when the disk fills mid-write (RLIMIT_FSIZE: writes
    fail with EFBIG) the earlier export is left as it was, with no temporary file, and it is bad input."""
    import resource
    import signal

    path = ex.export(export_runs / "linear", "safetensors", out=tmp_path / "model.safetensors", data_dir=small_store_dir, **QUIET)
    before = path.read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, limits[1]))  # the export is ~1 MB
        with pytest.raises(BadInput, match="Cannot write"):
            ex.export(export_runs / "linear", "safetensors", out=path, force=True, data_dir=small_store_dir, **QUIET)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [owned.MANIFEST,
                                                                                          "model.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["predict", "{run}", "{empty}"], "No image to predict"),
    (["predict", "{run}", "{text}"], "not an image"),
    (["predict", "{run}", "{img}", "--top", "0"], "--top 0"),
    (["predict", "{nowhere}", "{img}"], "does not exist"),
    (["predict", "{text}", "{img}"], "not a readable checkpoint"),
    (["predict", "{fake_onnx}", "{img}"], "not a readable ONNX model"),
    (["predict", "{plain_st}", "{img}"], "without fastcifar metadata"),
    (["export", "{run}", "--format", "tflite"], "choose one of onnx, safetensors, timm"),
    (["export", "{nowhere}", "--format", "onnx"], "does not exist"),
    (["export", "{text}", "--format", "safetensors"], "not a readable checkpoint"),
    (["export", "{run}", "--format", "safetensors", "--out", "{text}"], "*.safetensors"),
    (["export", "{run}", "--format", "safetensors", "--out", "{user_st}"], "--force"),
    (["export", "{run}", "--format", "timm", "--out", "{run}/best.pt", "--force"], "the checkpoint being exported"),
    (["export", "{run}", "--format", "safetensors", "--out", "{text}/x.safetensors"], "is not a writable directory"),
    # --force replaces an export, never a run's checkpoint (here the run's last.pt: its resume point)
    (["export", "{run}", "--format", "timm", "--out", "{run}/last.pt", "--force"], "`fastcifar export` did not write"),
    # exports whose fastcifar metadata was altered after export (a hostile or damaged file)
    (["predict", "{crafted}/classes.safetensors", "{img}"], "its weights have 100 classes"),
    (["predict", "{crafted}/nan_mean.safetensors", "{img}"], "unusable (mean [nan"),
    (["predict", "{crafted}/huge_side.safetensors", "{img}"], "unusable (input size 100000"),
    (["predict", "{crafted}/vast_std.safetensors", "{img}"], "unusable (OverflowError"),
    (["predict", "{crafted}/side.onnx", "{img}"], "does not run on the input"),
    (["predict", "{crafted}/classes.onnx", "{img}"], "names 10 classes"),
    (["predict", "{crafted}/plain.onnx", "{img}"], "is an ONNX model without fastcifar metadata"),
])
def test_bad_input_exits_2_and_leaves_files_alone(export_runs, small_store_dir, crafted, tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"run": export_runs / "linear", "empty": tmp_path / "empty", "text": tmp_path / "notes.txt",
             "img": _write(tmp_path / "img.png", np.zeros((32, 32, 3), np.uint8)), "nowhere": tmp_path / "nowhere",
             "fake_onnx": tmp_path / "fake.onnx", "plain_st": tmp_path / "plain.safetensors",
             "user_st": tmp_path / "mine.safetensors", "crafted": crafted}
    paths["text"].write_text("a user's notes")
    paths["fake_onnx"].write_bytes(b"\x08\x07garbage")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(paths["plain_st"]))
    paths["user_st"].write_bytes(b"a user's file")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    run_files = {p.name: p.stat().st_mtime_ns for p in (export_runs / "linear").iterdir()}
    code, out, err = _cli(*[a.format(**paths) for a in args],
                     *(["--data-dir", str(small_store_dir)] if args[0] == "export" else []))
    assert code == 2, out
    assert message in err.replace("\n", " ")
    assert "\nerror: " in "\n" + err  # the one-paragraph message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed
    assert {p.name: p.stat().st_mtime_ns for p in (export_runs / "linear").iterdir()} == run_files


def test_an_unwritable_out_is_refused_before_the_checkpoint_is_loaded(export_runs, small_store_dir, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("a user's notes")
    monkeypatch.setattr(ex.checkpoint, "load", lambda *a, **k: pytest.fail("loaded the checkpoint first"))
    with pytest.raises(BadInput, match="is not a writable directory"):  # not after a minute of ONNX export
        ex.export(export_runs / "linear", "onnx", out=tmp_path / "notes.txt" / "model.onnx", data_dir=small_store_dir, **QUIET)


def test_force_replaces_a_timm_export_but_not_a_checkpoint(export_runs, small_store_dir, tmp_path):
    path = ex.export(export_runs / "linear", "timm", out=tmp_path / "model.pth", data_dir=small_store_dir, **QUIET)
    assert ex.export(export_runs / "linear", "timm", out=path, force=True, data_dir=small_store_dir, **QUIET) == path
    checkpoint.save(tmp_path / "other-run.pt", checkpoint.load(export_runs / "linear" / "best.pt"))
    before = (tmp_path / "other-run.pt").read_bytes()
    with pytest.raises(BadInput, match="did not write"):  # a checkpoint, or any file export did not write
        ex.export(export_runs / "linear", "timm", out=tmp_path / "other-run.pt", force=True, data_dir=small_store_dir, **QUIET)
    assert (tmp_path / "other-run.pt").read_bytes() == before


def test_out_force_and_directory(export_runs, small_store_dir, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "model.safetensors"
    mine.write_bytes(b"a user's file")
    code, _, _ = _cli("export", str(export_runs / "linear"), "-f", "safetensors", "--out", str(mine),
                   "--data-dir", str(small_store_dir))
    assert code == 2 and mine.read_bytes() == b"a user's file"
    code, out, err = _cli("export", str(export_runs / "linear"), "-f", "safetensors", "--out", str(mine),
                     "--force", "--data-dir", str(small_store_dir))  # --force replaces only an export fastcifar wrote
    assert code == 2 and mine.read_bytes() == b"a user's file" and "earlier export" in err.replace("\n", " ")
    mine.unlink()
    for force, want in (([], 0), ([], 2), (["--force"], 0)):  # an export of its own: replaced with --force only
        code, out, err = _cli("export", str(export_runs / "linear"), "-f", "safetensors", "--out", str(mine),
                         *force, "--data-dir", str(small_store_dir))
        assert code == want and ex.read_safetensors(mine)[0]["num_classes"] == 100, err
    code, out, err = _cli("export", str(export_runs / "linear"), "-f", "safetensors", "--out", str(tmp_path),
                     "--data-dir", str(small_store_dir))
    assert code == 0 and (tmp_path / "best.safetensors").is_file()  # a directory takes the default name
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "best.safetensors").mkdir()
    code, out, err = _cli("export", str(export_runs / "linear"), "-f", "safetensors", "--out",
                     str(tmp_path / "deeper"), "--force", "--data-dir", str(small_store_dir))
    assert code == 2 and "is a directory" in err.replace("\n", " ")
    assert sorted(p.name for p in tmp_path.iterdir()) == [owned.MANIFEST, "best.safetensors", "deeper",
                                                          "model.safetensors"]  # no temp files


# ---- class names and mean/std: from the checkpoint -----------------------------------------------

def test_a_checkpoint_that_records_classes_and_preprocessing_needs_no_store(export_runs, small_store_dir, tmp_path, monkeypatch, capsys):
    ck = checkpoint.load(export_runs / "arcface" / "best.pt")
    ck["class_names"] = [f"class{i}" for i in range(100)]
    ck["preprocess"] = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "image_size": 40, "interpolation": "cubic"}
    checkpoint.save(tmp_path / "new.pt", ck)
    img = _write(tmp_path / "img.png", np.full((32, 32, 3), 128, np.uint8))
    lines = []
    path = ex.export(tmp_path / "new.pt", "safetensors", data_dir=tmp_path / "no-store", log=lines.append)
    c, _ = ex.read_safetensors(path)
    assert c["class_names"][7] == "class7" and c["preprocess"]["mean"] == [0.5, 0.4, 0.3]
    assert not any("taken from the store" in line for line in lines) and "noise images" in lines[-1]
    res = predict(tmp_path / "new.pt", [img], top=1, log=lines.append)
    assert res["predictions"][0]["top"][0]["class"].startswith("class")
    # a record that is not one, or none: exit 2, naming it
    for key, value in (("class_names", "cat"), ("class_names", ["a"] * 3), ("preprocess", {"mean": "grey", "std": [1] * 3}),
                       ("class_names", None), ("preprocess", None)):
        broken = {k: v for k, v in dict(ck, **{key: value}).items() if v is not None}
        checkpoint.save(tmp_path / "broken.pt", broken)
        with pytest.raises(BadInput, match="unusable"):
            ex.export(tmp_path / "broken.pt", "safetensors", out=tmp_path / "b.safetensors", data_dir=small_store_dir, **QUIET)


# ---- the optional dependencies --------------------------------------------------------------------

@pytest.mark.parametrize("blocked, args", [
    ("onnxscript", ["export", "{run}", "--format", "onnx"]),
    ("safetensors", ["export", "{run}", "--format", "safetensors"]),
    ("onnxruntime", ["predict", "{onnx}", "{img}"]),
])
def test_without_the_export_extra_it_says_what_to_install(export_runs, small_store_dir, onnx_files, tmp_path, monkeypatch, capsys,
                                                          blocked, args):
    img = _write(tmp_path / "img.png", np.zeros((32, 32, 3), np.uint8))
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now raises ImportError
    code, _, err = _cli(*[a.format(run=export_runs / "linear", onnx=onnx_files["linear"], img=img)
                                            for a in args], *(["--data-dir", str(small_store_dir)] if args[0] == "export" else []))
    err = err.replace("\n", " ")
    assert code == 2 and blocked in err and 'pip install "fastcifar[export]"' in err


@pytest.mark.parametrize("kind", ["linear", "arcface"])
def test_docs_preprocessing_is_what_predict_does(export_runs, small_store_dir, tmp_path, kind):
    c = ex.card(checkpoint.load(export_runs / kind / "best.pt"), from_dict(checkpoint.load(export_runs / kind / "best.pt")["recipe"]),
                "run")
    preprocess_image = _example("preprocess_image")
    rng = np.random.default_rng(2)
    for name, shape in (("a.png", (32, 32, 3)), ("b.jpg", (120, 90, 3)), ("c.png", (17, 40, 3))):
        f = _write(tmp_path / name, rng.integers(0, 256, shape, dtype=np.uint8))
        ours = ex.preprocess(torch.from_numpy(read_image(f))[None], c)
        theirs = preprocess_image(str(f), c)
        assert ours.shape == theirs.shape == (1, 3, c["preprocess"]["image_size"], c["preprocess"]["image_size"])
        assert (ours - theirs).abs().max() < 1e-5


def test_float_images_are_scaled_and_big_ones_refused_before_decoding(tmp_path, monkeypatch):
    import warnings

    from PIL import ImageFile

    ramp = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)  # a float TIFF's usual 0..1
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    got = read_image(tmp_path / "unit.tif")
    assert np.array_equal(got[..., 0], np.round(ramp * 255).astype(np.uint8))  # not clipped to 0..1 (black)
    Image.fromarray(ramp * 300, mode="F").save(tmp_path / "wide.tif")  # not 0..1: taken as 0..255, clipped
    assert np.array_equal(read_image(tmp_path / "wide.tif")[..., 0], np.round(ramp * 300).clip(0, 255).astype(np.uint8))
    ramp[3, 4] = np.nan
    Image.fromarray(ramp, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN"):
        read_image(tmp_path / "nan.tif")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1024)  # 32x32 = 1024 px: at the limit, read without a warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert read_image(tmp_path / "unit.tif").shape == (32, 32, 3)
    assert not seen
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # between 1x and 2x the limit, where Pillow only warns
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im))
    with pytest.raises(ValueError, match="32x32 pixels, over the 600 that fastcifar decodes"):
        read_image(tmp_path / "unit.tif")
    assert decoded == []  # refused from the header, before a pixel was decoded
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # over twice the limit: Pillow refuses, we name it
    with pytest.raises(ValueError, match="DecompressionBomb"):
        read_image(tmp_path / "unit.tif")


def _card(**change) -> dict:
    """A well-formed card by hand (what `card` writes), with fields replaced: check_card's input."""
    c = {"fastcifar_export": ex.CARD_VERSION, "model": {"name": "resnet18", "cifar_stem": True},
         "head": {"kind": "linear"}, "num_classes": 3, "class_names": ["a", "b", "c"],
         "preprocess": {"image_size": 32, "interpolation": "linear", "normalize": "cifar",
                        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    for key, value in change.items():
        if key in c["preprocess"]:
            c["preprocess"] = {**c["preprocess"], key: value}
        else:
            c[key] = value
    return c


@pytest.mark.parametrize("change,says", [
    ({"image_size": 7}, "input size 7"), ({"std": [0.25, 0.0, 0.25]}, "std"),
    ({"class_names": ["a", "b"]}, "2 class names for 3 classes"), ({"interpolation": "sinc"}, "interpolation 'sinc'"),
    ({"model": {"name": "resnet18", "cifar_stem": "yes"}}, "'cifar_stem': 'yes'"),
    ({"head": {"kind": "linear", "bias": 1}}, "'bias': 1"), ({"fastcifar_export": 2}, "format version 2"),
])
def test_check_card_refuses_each_field_past_its_bound(change, says):
    ex.check_card(_card(), "x.safetensors")
    ex.check_card(_card(image_size=8), "x.safetensors")  # the bound itself is taken
    with pytest.raises(BadInput, match=says):
        ex.check_card(_card(**change), "x.safetensors")


def test_compare_scales_its_tolerance_and_fails_on_nan():
    """The tolerance is REL_TOL relative to the largest logit (absolute below 1); NaN fails."""
    ours = torch.tensor([[100.0, -50.0], [3.0, 1.0]])
    line = ex.compare(ours, ours + 0.05, "onnx", "2 images")  # 5e-4 of the largest logit: within
    assert "top-1 agrees on 2/2" in line
    with pytest.raises(ex.CheckFailed):
        ex.compare(ours, ours + 0.2, "onnx", "2 images")
    small = torch.tensor([[0.01, -0.02]])
    ex.compare(small, small + 5e-4, "onnx", "1 image")  # logits under 1: an absolute REL_TOL, not REL_TOL * 0.02
    with pytest.raises(ex.CheckFailed):
        ex.compare(ours, torch.full_like(ours, float("nan")), "onnx", "2 images")


def test_out_path_of_a_directory_and_never_the_checkpoint(tmp_path):
    src = tmp_path / "run" / "best.pt"
    src.parent.mkdir()
    src.write_bytes(b"checkpoint")
    (tmp_path / "exports").mkdir()
    assert ex.out_path(tmp_path / "exports", src, "onnx", False) == tmp_path / "exports" / "best.onnx"
    assert ex.out_path(None, src, "timm", False) == tmp_path / "run" / "best-timm.pth"
    with pytest.raises(BadInput, match="the checkpoint being exported"):
        ex.out_path(src, src, "timm", True)
