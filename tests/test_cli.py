"""The README's first command: `ignn-triton demo`."""
import re
import subprocess
import sys

import pytest

from ignn_triton import IGNN, CheckpointError, load_model, save_model
from ignn_triton.cli import main


def test_demo_with_the_builtin_weights_beats_bicubic(tmp_path, capsys):
    """The README's first command: the shipped weights, on the bundled (held-out) photo."""
    assert main(["demo", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bicubic_x4.png", "ignn_x4.png", "lr.png"]
    assert "model: built-in weights" in out and "(64, 64) -> (256, 256) x4" in out
    bicubic, bicubic_ssim = map(float, re.search(r"bicubic ([\d.]+) dB / ([\d.]+)", out).groups())
    ours, ours_ssim = map(float, re.search(r"IGNN ([\d.]+) dB / ([\d.]+)", out).groups())
    assert 20 < bicubic < 40 and 0.5 < bicubic_ssim < 1  # a real photograph
    assert ours > bicubic + 1.0 and ours_ssim > bicubic_ssim  # measured: +1.66 dB


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
