"""Data that used to give silently wrong science or a late crash, caused for real:

* class folders that are symbolic links are part of the data set (scan and fingerprint alike), a link loop ends;
* every decode gives uint8 RGB: 16-bit PNGs scaled (not clipped, not left 257x too large), palettes with
  transparency, grey + alpha, RGBA, CMYK JPEGs, 1-bit and float images converted; prepare counts the conversions;
* the images a CSV manifest lists are part of `prepare`'s fingerprint, as a folder's files are;
* a truncated JPEG or PNG is found by prepare's default (header) check and listed in bad_images.json; an image
  damaged after prepare stops training with one line naming it, from a DataLoader worker too.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cli.main import main
from nst.config import load_config
from nst.data import decode_bytes, open_pil, open_split, scan_source
from nst import scan
from nst.scan import tree_digest
from tasks.prepare import PREPARE
from tasks.spec import execute, fingerprint
from test_failures import _err

REPO = Path(__file__).resolve().parents[1]
NO_LIMIT = 10**9


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit-per-sample RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def _grey16(v: np.ndarray) -> Image.Image:
    return Image.fromarray(v.astype(np.uint16))  # mode "I;16"


# ---- symbolic links ----------------------------------------------------------------------------------------------

def _link_classes(real: Path, linked: Path) -> None:
    linked.mkdir()
    for c in sorted(real.iterdir()):
        (linked / c.name).symlink_to(c.resolve(), target_is_directory=True)


def test_symlinked_class_folders_give_the_same_manifest_as_the_real_folder(tiny_project):
    root = tiny_project.parent
    store = root.parent / "store"  # the real class folders live outside the project
    shutil.move(root / "data/toy/labeled", store)
    _link_classes(store, root / "data/toy/labeled")
    real = load_config(tiny_project, ["data.labeled=" + str(store), "out_dir=out_real"])
    linked = load_config(tiny_project, ["out_dir=out_linked"])
    assert len(scan_source(linked.data.labeled)) == 40
    r_real, r_linked = execute(PREPARE, real), execute(PREPARE, linked)
    assert r_linked["classes"] == r_real["classes"] and len(r_linked["classes"]) == 10
    assert r_linked["metrics"]["n_labeled"] == 40
    assert (pq.read_table(linked.data_dir / "labeled.parquet").equals(pq.read_table(real.data_dir / "labeled.parquet")))
    assert tree_digest(root / "data/toy/labeled") == tree_digest(store)


def test_a_changed_image_behind_a_symlink_changes_the_fingerprint(tiny_project):
    root = tiny_project.parent
    store = root.parent / "store"
    shutil.move(root / "data/toy/labeled", store)
    _link_classes(store, root / "data/toy/labeled")
    cfg = load_config(tiny_project)
    execute(PREPARE, cfg)
    fp = fingerprint(PREPARE, cfg, "")
    assert execute(PREPARE, cfg).get("skipped")
    victim = sorted((store / "circle").glob("*.png"))[0]
    Image.new("RGB", (16, 16), (0, 255, 0)).save(victim)  # through the real path, as a user's other tool would
    assert fingerprint(PREPARE, cfg, "") != fp
    assert not execute(PREPARE, cfg).get("skipped")


def test_a_symlink_loop_ends_with_a_warning(tmp_path, caplog):
    d = tmp_path / "labeled"
    (d / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(d / "cats" / "a.png")
    (d / "cats" / "up").symlink_to("..", target_is_directory=True)  # back to labeled/
    (d / "cats" / "me").symlink_to(".", target_is_directory=True)
    (d / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    code = "import sys\nfrom nst.scan import walk_files\nprint(len(walk_files(sys.argv[1])))\n"
    out = subprocess.run([sys.executable, "-c", code, str(d)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]  # a.png and the dangling link
    assert [p.relative_to(d).as_posix() for p in scan.walk_files(d)] == ["cats/a.png", "dangling.png"]
    warned = [r.getMessage() for r in caplog.records if "not followed (a loop)" in r.getMessage()]
    assert len(warned) == 2 and any("cats/up: links back to the folder" in w for w in warned)
    # the dangling image is listed as unreadable, not dropped
    assert [(Path(it.path).name, it.label_name) for it in scan_source(d)] == [("a.png", "cats"),
                                                                            ("dangling.png", None)]


# ---- every decode gives uint8 RGB ---------------------------------------------------------------------------------

def _palette_with_transparency() -> Image.Image:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    return p


CASES = {  # image bytes -> the uint8 RGB pixels of its first row
    "16-bit grey PNG": (lambda: _encode(_grey16(np.array([[0, 256, 32768, 65535]])), "PNG"),
                        [[0] * 3, [1] * 3, [128] * 3, [255] * 3]),
    "16-bit RGB PNG": (lambda: png16_rgb(np.array([[[65535, 32768, 256], [0, 255, 257]]])),
                       [[255, 128, 1], [0, 0, 1]]),
    "16-bit grey TIFF": (lambda: _encode(_grey16(np.array([[0, 32768, 65535]])), "TIFF"),
                         [[0] * 3, [128] * 3, [255] * 3]),
    "palette PNG with transparency": (lambda: _encode(_palette_with_transparency(), "PNG", transparency=0),
                                      [[255, 0, 0], [0, 255, 0]]),
    "palette GIF with transparency": (lambda: _encode(_palette_with_transparency(), "GIF", transparency=0),
                                      [[255, 0, 0], [0, 255, 0]]),
    "grey + alpha PNG": (lambda: _encode(Image.fromarray(np.array([[[100, 7], [200, 255]]], np.uint8), "LA"),
                                         "PNG"), [[100] * 3, [200] * 3]),
    "RGBA PNG": (lambda: _encode(Image.new("RGBA", (1, 1), (10, 20, 30, 0)), "PNG"), [[10, 20, 30]]),
    "CMYK JPEG": (lambda: _encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100),
                  [[255, 0, 0]] * 8),
    "1-bit PNG": (lambda: _encode(Image.frombytes("1", (2, 1), b"\x40"), "PNG"), [[0] * 3, [255] * 3]),
    "float TIFF": (lambda: _encode(Image.fromarray(np.array([[0.0, 100.0, 300.0]], np.float32)), "TIFF"),
                   [[0] * 3, [100] * 3, [255] * 3]),
    "grey JPEG": (lambda: _encode(Image.new("L", (3, 2), 77), "JPEG", quality=100), [[77] * 3] * 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_decode_gives_uint8_rgb_with_the_right_values(case, tmp_path):
    make, first_row = CASES[case]
    data = make()
    x = decode_bytes(data, case, NO_LIMIT)  # training (pad_crop), evaluation, labelling, robustness
    assert x.dtype == torch.uint8 and x.shape[0] == 3
    assert x[:, 0].T.tolist() == first_row
    f = tmp_path / "img"
    f.write_bytes(data)
    im = open_pil(str(f), NO_LIMIT)  # training with rrc: the same pixels
    assert im.mode == "RGB" and np.asarray(im)[0].tolist() == first_row


def test_a_project_of_16_bit_images_prepares_decodes_and_trains(tiny_project):
    """Half the labeled images and all the test images 16-bit (mixed splits used to die stacking uint8 with
    uint16; alone the model saw inputs 257x too large): uint8 through the real dataset, equal to the 8-bit
    originals, conversions counted, and the teacher trains and evaluates."""
    from tasks.evaluate import EVALUATE
    from tasks.train import TRAIN_TEACHER

    root = tiny_project.parent
    originals = {}
    victims = sorted((root / "data/toy/labeled").rglob("*.png"))[::2] + sorted((root / "data/toy/test").rglob("*.png"))
    for p in victims:
        grey = np.asarray(Image.open(p).convert("L"))
        originals[p.resolve()] = grey.copy()
        _grey16(grey.astype(np.uint32) * 257).save(p)  # 16-bit, the same picture
    cfg = load_config(tiny_project, ["teacher.epochs=1"])
    res = execute(PREPARE, cfg)
    assert res["metrics"]["n_converted"] == len(victims) == 60
    assert res["converted"] == {"labeled": {"I;16": 20}, "test": {"I;16": 40}}
    for split in ("labeled", "test"):
        ds, _ = open_split(cfg, split)
        images = ds.all_raw()
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
        for i, p in enumerate(ds.paths.to_pylist()):
            if Path(p).resolve() in originals:
                assert torch.equal(images[i], torch.from_numpy(originals[Path(p).resolve()]).expand(3, -1, -1))
    execute(TRAIN_TEACHER, cfg, "g0")
    assert execute(EVALUATE, cfg, "g0")["metrics"]["test/top1"] >= 0


# ---- manifests: the images they list are fingerprinted -----------------------------------------------------------

def test_a_csv_manifest_source_fingerprints_the_images_it_lists(tiny_project):
    root = tiny_project.parent
    rows = ["path,label"] + [f"toy/labeled/{p.parent.name}/{p.name},{p.parent.name}"
                             for p in sorted((root / "data/toy/labeled").rglob("*.png"))]
    (root / "data" / "labeled.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(tiny_project, ["data.labeled=data/labeled.csv"])
    execute(PREPARE, cfg)
    fp = fingerprint(PREPARE, cfg, "")
    assert execute(PREPARE, cfg).get("skipped")  # an unchanged tree re-runs nothing
    victim = root / "data" / rows[5].split(",")[0]
    Image.new("RGB", (16, 16), (0, 0, 255)).save(victim)  # same path, same CSV, other pixels
    assert fingerprint(PREPARE, cfg, "") != fp
    assert not execute(PREPARE, cfg).get("skipped")
    assert execute(PREPARE, cfg).get("skipped")
    # DVC hashes only what dvc.yaml names: the manifest brings the folder its images share
    from tasks.spec import dvc_stage

    deps = dvc_stage(PREPARE, cfg, "", {})["deps"]
    assert "data/labeled.csv" in deps and "data/toy/labeled" in deps, deps


# ---- truncated images ---------------------------------------------------------------------------------------------

def test_truncated_images_are_listed_at_prepare_by_the_default_header_check(tiny_project):
    root = tiny_project.parent
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    jpeg, png = _encode(photo, "JPEG", quality=90), _encode(photo, "PNG")
    (root / "data/toy/unlabeled/zzz_cut.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (root / "data/toy/labeled/circle/zzz_cut.png").write_bytes(png[: len(png) // 2])
    (root / "data/toy/unlabeled/zzz_padded.jpg").write_bytes(jpeg + b"\0" * 64)  # complete, trailing padding: fine
    cfg = load_config(tiny_project, ["data.max_bad_fraction=0.05"])
    assert cfg.data.verify == "header"
    res = execute(PREPARE, cfg)
    bad = json.loads((cfg.data_dir / "bad_images.json").read_text())
    assert [(Path(b["path"]).name, b["error"]) for b in bad["unlabeled"]] == [
        ("zzz_cut.jpg", "truncated or corrupt (no JPEG end-of-image marker after the image data)")]
    assert [(Path(b["path"]).name, b["error"]) for b in bad["labeled"]] == [
        ("zzz_cut.png", "truncated or corrupt (the PNG ends before its IEND chunk)")]
    assert res["metrics"]["n_unlabeled"] == 121 and res["metrics"]["n_bad"] == 2


def test_an_image_damaged_after_prepare_stops_training_with_one_line_naming_it(tiny_project, capsys):
    """Decoded in a DataLoader worker (PyTorch re-raises a worker's error with the worker's traceback as message)."""
    cfg = load_config(tiny_project)
    execute(PREPARE, cfg)
    victim = sorted((tiny_project.parent / "data/toy/labeled").rglob("*.png"))[7]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    rc = main(["train-teacher", "-p", str(tiny_project), "-S", "data.num_workers=1", "-S", "data.cache_mb=0"])
    err = _err(capsys)
    assert rc == 2 and err.startswith(f"error: {victim}: cannot decode image ("), err
    assert "damaged, or changed since `nst prepare`" in err and "DataLoader worker" not in err
