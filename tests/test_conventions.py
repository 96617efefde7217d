"""The habits users bring from other SR tools (ncnn-vulkan, Real-ESRGAN, chaiNNer) and the
cases where work used to be lost: CLI conventions, image formats, refusals before writing."""
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ignn_triton import IGNN, save_model
from ignn_triton import train as trainer
from ignn_triton.cli import main
from ignn_triton.images import PNG_SIGNATURE, read_array, write_array


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "x2.safetensors"
    save_model(IGNN(scale=2, n_feats=4, n_resblocks=2, window=4), path)
    return path


def _photo(h=24, w=20, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 90 * np.sin(x / 3 + c) * np.cos(y / 4) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).round().astype(np.uint8)


def _up(weights, *argv):
    return main(["upscale", *map(str, argv), "--weights", str(weights)])


def test_version_and_python_dash_m(capsys):
    from ignn_triton import __version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ignn-triton {__version__}"
    out = subprocess.run([sys.executable, "-m", "ignn_triton", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"ignn-triton {__version__}"


def test_one_file_to_a_named_output_file(weights, tmp_path):
    write_array(_photo(), tmp_path / "in.png")
    assert _up(weights, tmp_path / "in.png", "-o", tmp_path / "sr.png") == 0
    assert (tmp_path / "sr.png").is_file() and read_array(tmp_path / "sr.png").shape == (48, 40, 3)
    (tmp_path / "folder").mkdir()
    write_array(_photo(), tmp_path / "folder" / "a.png")
    assert _up(weights, tmp_path / "folder", "-o", tmp_path / "out.png") == 0  # a folder input
    assert (tmp_path / "out.png" / "a_x2.png").is_file()


def test_jpeg_quality_follows_the_input_unless_given(weights, tmp_path):
    Image.fromarray(_photo(32, 32)).save(tmp_path / "q90.jpg", quality=90)
    with Image.open(tmp_path / "q90.jpg") as img:
        tables = img.quantization
    assert _up(weights, tmp_path / "q90.jpg", "-o", tmp_path / "a") == 0
    with Image.open(tmp_path / "a" / "q90_x2.jpg") as img:
        assert img.quantization == tables  # the input's own quantisation, not Pillow's 75
    assert _up(weights, tmp_path / "q90.jpg", "-o", tmp_path / "b", "--quality", "40") == 0
    with Image.open(tmp_path / "b" / "q90_x2.jpg") as img:
        assert img.quantization != tables
    assert _up(weights, tmp_path / "q90.jpg", "-o", tmp_path / "c", "--quality", "0") == 2


def test_recursive_skip_existing_and_rerun_into_the_input_folder(weights, tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    write_array(_photo(), tmp_path / "in" / "a.png")
    write_array(_photo(seed=1), tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".a.png_x2.png.k3j4.png").write_bytes(b"a killed run's temporary")
    assert _up(weights, tmp_path / "in", "-o", tmp_path / "in", "--recursive") == 0
    err = capsys.readouterr().err
    assert "skipped 1 file(s) that are not images (notes.txt)" in err
    assert (tmp_path / "in" / "a_x2.png").is_file() and (tmp_path / "in" / "sub" / "b_x2.png").is_file()
    # a re-run into the same folder: the first run's outputs are not inputs now
    assert _up(weights, tmp_path / "in", "-o", tmp_path / "in", "--recursive") == 0
    err = capsys.readouterr().err
    assert "skipped 2 earlier output(s) of upscale (a_x2.png, b_x2.png)" in err
    assert not (tmp_path / "in" / "a_x2_x2.png").exists()
    # without --recursive the sub-folder is not searched
    assert _up(weights, tmp_path / "in", "-o", tmp_path / "flat") == 0
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["a_x2.png"]
    stamp = (tmp_path / "flat" / "a_x2.png").stat().st_mtime_ns
    assert _up(weights, tmp_path / "in", "-o", tmp_path / "flat", "--skip-existing") == 0
    assert "skipped 1 input(s) whose output exists" in capsys.readouterr().err
    assert (tmp_path / "flat" / "a_x2.png").stat().st_mtime_ns == stamp


def test_two_inputs_for_one_output_are_refused(weights, tmp_path, capsys):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_array(_photo(), tmp_path / folder / "same.png")
    assert _up(weights, tmp_path / "x", tmp_path / "y", "-o", tmp_path / "o") == 2
    assert "two inputs" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ctrl_c_ends_with_one_line_and_nothing_partial(weights, tmp_path, capsys, monkeypatch):
    from ignn_triton.upscale import Upscaler
    write_array(_photo(), tmp_path / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Upscaler, "__call__", interrupted)
    assert _up(weights, tmp_path / "a.png", "-o", tmp_path / "o") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "ignn-triton: interrupted"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_exif_orientation_is_applied(weights, tmp_path):
    img = Image.fromarray(_photo(20, 24))  # stored 24 wide, 20 high
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert read_array(tmp_path / "phone.jpg").shape == (24, 20, 3)  # as displayed
    assert _up(weights, tmp_path / "phone.jpg", "-o", tmp_path / "sr.png") == 0
    with Image.open(tmp_path / "sr.png") as out:
        assert out.size == (40, 48) and 0x0112 not in out.getexif()


def test_tiff_precision_is_kept_or_refused(tmp_path):
    tifffile = pytest.importorskip("tifffile")  # installed with scikit-image (test extra)
    Image.fromarray(np.random.rand(8, 9).astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="mode F .* not supported; convert it to a 16-bit PNG"):
        read_array(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "rgb16.tif", (np.random.rand(8, 9, 3) * 65535).astype(np.uint16))
    with pytest.raises(ValueError, match="16/16/16-bit TIFF would be read as RGB"):
        read_array(tmp_path / "rgb16.tif")
    gray = (np.random.rand(8, 9) * 65535).astype(np.uint16)
    write_array(gray, tmp_path / "g16.tif")
    back = read_array(tmp_path / "g16.tif")
    assert back.dtype == np.uint16 and np.array_equal(back, gray)
    with pytest.raises(ValueError, match="cannot write 16-bit colour TIFF"):
        write_array(np.zeros((4, 4, 3), np.uint16), tmp_path / "c16.tif")


def test_16_bit_png_inflates_no_more_than_its_header_declares(tmp_path):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    bomb = zlib.compress(b"\0" * 50_000_000, 9)  # 50 MB of image data in about 50 KB
    (tmp_path / "bomb.png").write_bytes(
        PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 0, 0, 0, 0))
        + chunk(b"IDAT", bomb) + chunk(b"IEND", b""))
    with pytest.raises(ValueError, match="more image data than its 2x2 header declares"):
        read_array(tmp_path / "bomb.png")


def test_eval_creates_its_output_folder_and_says_what_it_crops(weights, tmp_path, capsys):
    (tmp_path / "hr").mkdir()
    write_array(_photo(101, 103), tmp_path / "hr" / "odd.png")
    out = tmp_path / "sub" / "dir" / "results.csv"
    assert main(["eval", "--hr", str(tmp_path / "hr"), "--scale", "2", "--weights", str(weights),
                 "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert "odd.png: 103x101 is cropped to 102x100" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the LR folder is --lr-data; --lr is not an abbreviation
        main(["eval", "--hr", str(tmp_path / "hr"), "--scale", "2", "--lr", str(tmp_path)])


TINY = ["--scale", "2", "--n-feats", "4", "--n-resblocks", "2", "--window", "4", "--crop", "24",
        "--batch", "2", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_array(_photo(40, 40), root / "a.png")
    return root


@pytest.mark.parametrize("argv, needle", [
    (["--n-feats", "0"], "--n-feats must be an integer in [1, 1024]; got 0"),
    (["--crop", "-4"], "--crop must be >= 1; got -4"),
    (["--crop", "25"], "--crop 25 must be a multiple of the scale 2"),
    (["--k", "0"], "--k must be an integer in [1, 64]; got 0"),
    (["--gamma", "nan"], "--gamma must be a positive number; got nan"),
    (["--res-scale", "nan"], "--res-scale must be a number in (0, 10]; got nan"),
    (["--stop-at", "0"], "--stop-at must be >= 1; got 0"),
    (["--lr", "-1"], "--lr must be a finite number >= 0; got -1.0"),
])
def test_train_refuses_bad_arguments_before_writing(train_data, tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        trainer.main(["--data", str(train_data), *TINY, "--steps", "1", "--out",
                      str(tmp_path / "run"), *argv])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_never_silently_replaces_a_previous_run(train_data, tmp_path, capsys):
    args = ["--data", str(train_data), *TINY, "--steps", "1", "--out", str(tmp_path / "run")]
    assert trainer.main(args) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    assert trainer.main(args) == 2
    assert "holds a previous run (last.pt, model.safetensors, log.csv)" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert trainer.main([*args, "--force"]) == 0


def test_train_help_shows_each_real_default_once():
    text = subprocess.run([sys.executable, "-m", "ignn_triton.train", "--help"],
                          capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    assert "(default: None)" not in flat
    for default in ("(default: 800000)", "width C (default: 256)", "(default: 32)",
                    "(default: 16)", "(default: off)", "(default: 2", "(default: 4)"):
        assert flat.count(default) >= 1, default
    assert flat.count("800000") == 1


def test_the_readmes_python_blocks_run_as_written(tmp_path):
    """Every ```python block of the README, run in a fresh process in an empty folder."""
    import re
    from pathlib import Path
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    for i, code in enumerate(blocks):
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                                text=True)
        assert result.returncode == 0, f"README python block {i}:\n{code}\n{result.stderr}"
