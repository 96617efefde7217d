"""The README's first command: `ignn-triton demo`."""
import re
import subprocess
import sys

from ignn_triton import IGNN, save_model
from ignn_triton.cli import main


def test_demo_writes_images_and_reports_psnr(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out"), "--n-feats", "4",
                 "--n-resblocks", "2"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bicubic_x4.png", "ignn_x4.png", "lr.png"]
    assert "(64, 64) -> (256, 256) x4" in out
    bicubic, ssim = re.search(r"bicubic ([\d.]+) dB / ([\d.]+)", out).groups()
    assert 20 < float(bicubic) < 40  # a real photograph downscaled and upscaled again
    assert 0.5 < float(ssim) < 1


def test_demo_with_weights_and_a_bad_checkpoint(tmp_path, capsys):
    save_model(IGNN(scale=2, n_feats=4, n_resblocks=2), tmp_path / "m.safetensors")
    assert main(["demo", "--weights", str(tmp_path / "m.safetensors"),
                 "--out", str(tmp_path / "o")]) == 0
    assert "(128, 128) -> (256, 256) x2" in capsys.readouterr().out
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert main(["demo", "--weights", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "p")]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "ignn_triton.cli", "--help"],
                            capture_output=True, text=True, check=True)
    assert "demo" in result.stdout
