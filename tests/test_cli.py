"""The README's first command: `ignn-triton demo`."""
import re
import subprocess
import sys

import pytest

from ignn_triton import IGNN, CheckpointError, load_model, save_model
from ignn_triton.cli import main


@pytest.mark.parametrize("scale, lr_side, margin", [
    (None, 64, 1.5),  # the README's first command: x4; measured +2.01 dB (see MODEL_CARD.md)
    (2, 128, 2.0),  # measured +2.51 dB
    (3, 85, 1.5),  # measured +1.90 dB
])
def test_demo_with_the_builtin_weights_beats_bicubic(tmp_path, capsys, scale, lr_side, margin):
    """The shipped weights of each scale on the bundled photo, a crop of a held-out image."""
    S = scale or 4
    argv = ["demo", "--out", str(tmp_path / "out")] + (["--scale", str(scale)] if scale else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"bicubic_x{S}.png", f"ignn_x{S}.png", "lr.png"]
    hr = lr_side * S
    assert f"model: built-in weights (IGNN x{S}" in out
    assert f"({lr_side}, {lr_side}) -> ({hr}, {hr}) x{S}" in out
    bicubic, bicubic_ssim = map(float, re.search(r"bicubic ([\d.]+) dB / ([\d.]+)", out).groups())
    ours, ours_ssim = map(float, re.search(r"IGNN ([\d.]+) dB / ([\d.]+)", out).groups())
    assert 20 < bicubic < 40 and 0.5 < bicubic_ssim < 1  # a real photograph
    assert ours > bicubic + margin and ours_ssim > bicubic_ssim


def test_builtin_weights_missing_is_a_clear_error(monkeypatch):
    from ignn_triton import checkpoint
    monkeypatch.setattr(checkpoint, "BUILTIN", {4: "no_such_weights.safetensors"})
    with pytest.raises(CheckpointError, match="built-in weights are missing"):
        load_model("builtin")


def test_demo_with_weights_and_a_bad_checkpoint(tmp_path, capsys):
    save_model(IGNN(scale=2, n_feats=4, n_resblocks=2), tmp_path / "m.safetensors")
    assert main(["demo", "--weights", str(tmp_path / "m.safetensors"),
                 "--out", str(tmp_path / "o")]) == 0
    assert "(128, 128) -> (256, 256) x2" in capsys.readouterr().out
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert main(["demo", "--weights", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "p")]) == 2
    assert "not a checkpoint (neither safetensors nor a torch file)" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "ignn_triton.cli", "--help"],
                            capture_output=True, text=True, check=True)
    assert "demo" in result.stdout
