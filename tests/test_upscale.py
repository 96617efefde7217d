"""`upscale` (API), 16-bit PNG codec, and the `upscale` / `eval` commands, with tiny
randomly initialised models."""
import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ignn_triton import EDSR, IGNN, imresize, save_model
from ignn_triton.cli import main
from ignn_triton.images import PNG_SIGNATURE, quantise, read_array, read_image, write_array
from ignn_triton.metrics import psnr_y, ssim_y
from ignn_triton.upscale import Upscaler, upscale


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return IGNN(scale=2, n_feats=4, n_resblocks=2, window=4).eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "ignn_x2.safetensors"
    save_model(model, path)
    return path


def _photo(h=24, w=20, seed=0):
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([128 + 100 * np.sin(x / 3 + c) * np.cos(y / 4) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).round().astype(np.uint8)


# --- API ----------------------------------------------------------------------------------

def test_array_kinds_round_trip(weights):
    rgb = _photo()
    up = Upscaler(weights)
    base = up(rgb)
    assert base.shape == (48, 40, 3) and base.dtype == np.uint8
    rgb16 = rgb.astype(np.uint16) * 257
    out16 = up(rgb16)
    assert out16.shape == (48, 40, 3) and out16.dtype == np.uint16
    assert np.abs(out16 / 257.0 - base).max() <= 1.0  # same model output, finer quantisation
    gray = rgb[..., 0]
    g = up(gray)
    assert g.shape == (48, 40) and g.dtype == np.uint8
    promoted = up(np.repeat(gray[..., None], 3, 2)).astype(np.float64).mean(2)
    assert np.abs(g - promoted).max() <= 1.0
    assert up(gray.astype(np.uint16) * 257).dtype == np.uint16
    alpha = np.linspace(0, 255, 24 * 20).reshape(24, 20).round().astype(np.uint8)
    rgba = up(np.dstack([rgb, alpha]))
    assert rgba.shape == (48, 40, 4) and rgba.dtype == np.uint8
    assert np.array_equal(rgba[..., :3], base)
    a_ref = imresize(torch.from_numpy(alpha).float()[None, None] / 255, 2).clamp(0, 1)
    assert np.array_equal(rgba[..., 3], (a_ref[0, 0] * 255).round().byte().numpy())


def test_pil_and_tensor_round_trip(weights, model):
    rgb = _photo()
    up = Upscaler(weights)
    base = up(rgb)
    for mode, channels in (("RGB", 3), ("L", 1), ("RGBA", 4)):
        img = Image.fromarray(rgb).convert(mode)
        out = up(img)
        assert isinstance(out, Image.Image) and out.mode == mode and out.size == (40, 48)
        assert len(out.getbands()) == channels
    assert np.array_equal(np.asarray(up(Image.fromarray(rgb))), base)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    y3 = up(x)
    y4 = upscale(x[None], weights=model)
    assert y3.shape == (3, 48, 40) and y4.shape == (1, 3, 48, 40) and y3.dtype == torch.float32
    assert torch.equal(y3, y4[0])
    with torch.no_grad():
        direct = model(x[None]).clamp(0, 1)
    assert torch.allclose(y4, direct, atol=1e-6)
    assert np.array_equal((y3.permute(1, 2, 0) * 255).round().byte().numpy(), base)


@pytest.mark.parametrize("tile,overlap,min_db", [(12, 8, 35), (14, 4, 35), (20, 8, 40)])
def test_tiled_close_to_untiled(model, tile, overlap, min_db):
    x = torch.from_numpy(_photo(24, 24, seed=1)).permute(2, 0, 1)[None].float() / 255
    up = Upscaler(model)
    full = up(x)
    tiled = up(x, tile=tile, tile_overlap=overlap)
    assert tiled.shape == full.shape
    assert psnr_y(tiled, full, 0) > min_db
    assert not torch.equal(tiled, full)  # tiling did happen
    assert torch.equal(up(x, tile=24, tile_overlap=8), full)  # one tile = no tiling


def test_self_ensemble_is_the_eight_way_average(model):
    x = torch.from_numpy(_photo(16, 20)).permute(2, 0, 1)[None].float() / 255
    ours = upscale(x, weights=model, self_ensemble=True)
    outs = []
    with torch.no_grad():
        for t in (False, True):
            for dims in ((), (-1,), (-2,), (-2, -1)):
                v = x.flip(dims) if dims else x
                v = v.transpose(-2, -1).contiguous() if t else v
                y = model(v)
                y = y.transpose(-2, -1) if t else y
                outs.append(y.flip(dims) if dims else y)
    manual = torch.stack(outs).mean(0).clamp(0, 1)
    assert torch.allclose(ours, manual, atol=1e-5)
    assert (ours - upscale(x, weights=model)).abs().max() > 1e-4


def test_oom_retry_halves_the_tile(model, capsys):
    class Flaky(torch.nn.Module):
        scale = 2

        def __init__(self):
            super().__init__()
            self.inner, self.sizes = model, []

        def forward(self, x):
            self.sizes.append(tuple(x.shape[-2:]))
            if max(x.shape[-2:]) > 12:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)

    x = torch.from_numpy(_photo(40, 40)).permute(2, 0, 1)[None].float() / 255
    flaky = Flaky()
    out = upscale(x, weights=flaky, tile_overlap=4)
    err = capsys.readouterr().err
    assert err.count("warning: out of memory") == 2  # 40 -> 20 -> 10
    assert "retrying with tile 20" in err and "retrying with tile 10" in err
    assert flaky.sizes[0] == (40, 40) and max(max(s) for s in flaky.sizes[-16:]) == 10
    assert torch.allclose(out, upscale(x, weights=model, tile=10, tile_overlap=4), atol=1e-6)


def test_refusals(weights, model):
    x = _photo()
    with pytest.raises(ValueError, match=r"scale x3 requested but the model .* is x2"):
        upscale(x, weights=weights, scale=3)
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        upscale(x, weights=model, precision="fp16", device="cpu")
    with pytest.raises(ValueError, match=r"x4 requested.*x2"):
        upscale(x, scale=4, weights=weights)
    assert upscale(x, scale=2, weights=weights).shape == (48, 40, 3)
    with pytest.raises(ValueError, match="at least 1x1"):
        upscale(np.zeros((0, 4, 3), np.uint8), weights=model)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        upscale(x.astype(np.float32), weights=model)
    with pytest.raises(ValueError, match="a size larger than tile_overlap"):
        upscale(x, weights=model, tile=8, tile_overlap=8)


def test_bf16_on_cpu_and_compile_flag(model, monkeypatch):
    x = torch.from_numpy(_photo(16, 16)).permute(2, 0, 1)[None].float() / 255
    fp32 = upscale(x, weights=model)
    bf16 = upscale(x, weights=model, precision="bf16")
    assert bf16.dtype == torch.float32 and psnr_y(bf16, fp32, 0) > 25
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    assert torch.equal(upscale(x, weights=model, compile=True), fp32) and compiled == [model]


# --- 16-bit PNG codec ---------------------------------------------------------------------

def _filtered_png16(a):
    """A 16-bit RGB PNG whose rows cycle through all five filter types."""
    h, w, c = a.shape
    raw = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(h, -1).astype(np.int64)
    bpp = 2 * c
    rows = []
    for r in range(h):
        line = raw[r]
        up = raw[r - 1] if r else np.zeros_like(line)
        left = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        kind = r % 5
        if kind == 4:
            p = left + up - ul
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
        else:
            pred = [0 * line, left, up, (left + up) // 2][kind]
        rows.append(bytes([kind]) + ((line - pred) & 255).astype(np.uint8).tobytes())

    def chunk(k, b):
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_png16_codec(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, (11, 7, 3)).astype(np.uint16)
    (tmp_path / "f.png").write_bytes(_filtered_png16(a))
    assert np.array_equal(read_array(tmp_path / "f.png"), a)
    for shape in ((5, 6), (5, 6, 3), (5, 6, 4)):
        b = rng.integers(0, 65536, shape).astype(np.uint16)
        write_array(b, tmp_path / "b.png")
        back = read_array(tmp_path / "b.png")
        assert back.dtype == np.uint16 and np.array_equal(back, b)
    g = rng.integers(0, 65536, (9, 8)).astype(np.uint16)
    Image.fromarray(g).save(tmp_path / "pil.png")  # Pillow's own (filtered) 16-bit gray
    assert np.array_equal(read_array(tmp_path / "pil.png"), g)
    data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_array(tmp_path / "t.png")


# --- `ignn-triton upscale` ----------------------------------------------------------------

def _inputs(folder):
    folder.mkdir()
    rgb = _photo(20, 16)
    Image.fromarray(rgb).save(folder / "rgb.png")
    write_array(rgb.astype(np.uint16) * 257, folder / "deep.png")
    Image.fromarray(rgb[..., 1]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 16), 200, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=95)
    return rgb


def test_cli_upscale_folder_and_files(weights, tmp_path, capsys):
    rgb = _inputs(tmp_path / "in")
    assert main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                 "--weights", str(weights), "--tile", "12", "--tile-overlap", "4"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "deep_x2.png", "gray_x2.png", "photo_x2.jpg", "rgb_x2.png", "rgba_x2.png"]
    assert out.count("16x20 -> 32x40") == 5 and out.count("on cpu (fp32)") == 5
    kinds = {p.stem: read_array(p) for p in (tmp_path / "out").iterdir()}
    assert kinds["deep_x2"].dtype == np.uint16 and kinds["deep_x2"].shape == (40, 32, 3)
    assert kinds["gray_x2"].shape == (40, 32) and kinds["gray_x2"].dtype == np.uint8
    assert kinds["rgba_x2"].shape == (40, 32, 4) and (kinds["rgba_x2"][..., 3] == 200).all()
    assert kinds["photo_x2"].shape == (40, 32, 3)
    expected = upscale(rgb, weights=weights, tile=12, tile_overlap=4)
    assert np.array_equal(kinds["rgb_x2"], expected)
    assert np.abs(kinds["deep_x2"] / 257.0 - expected).max() <= 1.0
    # single files, another extension
    assert main(["upscale", str(tmp_path / "in" / "rgb.png"), str(tmp_path / "in" / "gray.png"),
                 "-o", str(tmp_path / "o2"), "--weights", str(weights), "--scale", "2",
                 "--ext", "jpg"]) == 0
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["gray_x2.jpg", "rgb_x2.jpg"]
    assert psnr_y(read_array(tmp_path / "o2" / "rgb_x2.jpg"), upscale(rgb, weights=weights),
                  0) > 30


def _bad(tmp_path, weights, capsys, argv, message):
    out = tmp_path / "bad_out"
    code = main(["upscale", *argv, "-o", str(out), "--weights", str(weights)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ignn-triton: error: ") and message in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_upscale_bad_inputs(weights, tmp_path, capsys):
    _inputs(tmp_path / "in")
    good = str(tmp_path / "in" / "rgb.png")
    data = (tmp_path / "in" / "rgb.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    _bad(tmp_path, weights, capsys, [good, str(tmp_path / "trunc.png")], "cannot read image")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _bad(tmp_path, weights, capsys, [str(tmp_path / "junk.png")], "cannot read image")
    (tmp_path / "notes.txt").write_text("hello")
    _bad(tmp_path, weights, capsys, [str(tmp_path / "notes.txt")], "unsupported format")
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, weights, capsys, [str(tmp_path / "empty")], "holds no images")

    def chunk(k, b):
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
    (tmp_path / "zero.png").write_bytes(
        PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    _bad(tmp_path, weights, capsys, [str(tmp_path / "zero.png")], "at least 1x1")
    _bad(tmp_path, weights, capsys, [good, "--tile", "8", "--tile-overlap", "8"],
         "a size larger than tile_overlap (8)")
    _bad(tmp_path, weights, capsys, [str(tmp_path / "missing.png")], "no such file")
    _bad(tmp_path, weights, capsys, [str(tmp_path / "in" / "rgba.png"), "--ext", "jpg"],
         "JPEG cannot store")
    # output path is an existing file
    (tmp_path / "file").write_text("x")
    assert main(["upscale", good, "-o", str(tmp_path / "file"), "--weights", str(weights)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"
    # scale the checkpoint does not support
    assert main(["upscale", good, "-o", str(tmp_path / "o"), "--weights", str(weights),
                 "--scale", "4"]) == 2
    assert "scale x4 requested but the model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # another architecture
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    assert main(["upscale", good, "-o", str(tmp_path / "o"), "--weights",
                 str(tmp_path / "other.pth")]) == 2
    assert "not an IGNN or EDSR state_dict" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # --scale with a checkpoint of another scale is refused
    assert main(["upscale", good, "-o", str(tmp_path / "o"), "--scale", "3", "--weights",
                 str(weights)]) == 2
    assert "scale x3 requested but the model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # no --weights: the built-in weights of --scale (default 4)
    h, w = read_array(good).shape[:2]
    for scale in (None, 2, 3):
        out = tmp_path / f"b{scale}"
        assert main(["upscale", good, "-o", str(out)] + (["--scale", str(scale)] if scale else [])) == 0
        S = scale or 4
        assert read_array(out / f"{Path(good).stem}_x{S}.png").shape[:2] == (S * h, S * w)
    # never overwrite an input
    Image.fromarray(_photo(8, 8)).save(tmp_path / "in" / "rgb_x2.png")
    before = (tmp_path / "in" / "rgb_x2.png").read_bytes()
    assert main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "in"),
                 "--weights", str(weights)]) == 2
    assert "would overwrite an input" in capsys.readouterr().err
    assert (tmp_path / "in" / "rgb_x2.png").read_bytes() == before
    assert len(list((tmp_path / "in").iterdir())) == 6


# --- `ignn-triton eval` -------------------------------------------------------------------

def test_cli_eval_matches_direct_metrics(weights, tmp_path, capsys):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    Image.fromarray(_photo(25, 27, seed=3)).save(hr_dir / "a.png")  # cropped to 24x26
    Image.fromarray(_photo(24, 24, seed=4)).save(hr_dir / "b.png")
    up = Upscaler(weights)
    expected = []
    for name in ("a.png", "b.png"):
        hr = read_image(hr_dir / name)
        hr = hr[..., : hr.shape[2] // 2 * 2, : hr.shape[3] // 2 * 2]
        lr = quantise(imresize(hr, 1 / 2))
        bic, sr = imresize(lr, 2).clamp(0, 1), up(lr)
        expected.append([psnr_y(bic, hr, 2), ssim_y(bic, hr, 2), psnr_y(sr, hr, 2),
                         ssim_y(sr, hr, 2)])
        Image.fromarray((lr[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(
            lr_dir / name.replace(".png", ".bmp"))
    out = tmp_path / "res.csv"
    assert main(["eval", "--hr", str(hr_dir), "--scale", "2", "--weights", str(weights),
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    keys = ("bicubic_psnr", "bicubic_ssim", "model_psnr", "model_ssim")
    assert [r["image"] for r in rows] == ["a.png", "b.png", "mean"]
    assert (rows[0]["width"], rows[0]["height"]) == ("26", "24")
    for row, exp in zip(rows, expected):
        assert [float(row[k]) for k in keys] == exp
    mean = np.mean(expected, axis=0)
    assert np.allclose([float(rows[2][k]) for k in keys], mean, rtol=0, atol=1e-12)
    js = json.loads(out.with_suffix(".json").read_text())
    assert [[im[k] for k in keys] for im in js["images"]] == expected
    assert np.allclose([js["mean"][k] for k in keys], mean, rtol=0, atol=1e-12)
    assert f"{expected[1][0]:12.4f}" in table and f"{mean[2]:10.4f}" in table
    assert 20 < expected[0][0] < 60 and 0 < expected[0][1] <= 1
    # paired LR files: the computed LR is 8-bit too, so the files give the same numbers
    assert main(["eval", "--hr", str(hr_dir), "--lr-data", str(lr_dir), "--scale", "2",
                 "--weights", str(weights), "--out", str(tmp_path / "paired.csv")]) == 0
    capsys.readouterr()
    paired = list(csv.DictReader((tmp_path / "paired.csv").open()))
    assert [[float(r[k]) for k in keys] for r in paired[:2]] == expected
    assert main(["eval", "--hr", str(hr_dir), "--scale", "3", "--weights", str(weights),
                 "--out", str(tmp_path / "x.csv")]) == 2
    assert "scale x3 requested but the model" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_edsr_weights_work_too(tmp_path):
    torch.manual_seed(0)
    save_model(EDSR(scale=2, n_feats=4, n_resblocks=1), tmp_path / "e.safetensors")
    out = upscale(_photo(10, 12), weights=tmp_path / "e.safetensors")
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8
