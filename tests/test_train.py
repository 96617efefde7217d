"""The trainer: exact resume, DDP on CPU (gloo), data pipeline, initialisation, bad input."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ignn_triton import EDSR, IGNN, imresize, load_model, save_model
from ignn_triton import train as trainer
from ignn_triton.atomic import _umask
from ignn_triton.images import quantise, write_array
from ignn_triton.train_checkpoint import build_model
from ignn_triton.train_data import PatchDataset, StepSampler
from ignn_triton.transfer import initialise

TINY = ["--scale", "4", "--n-feats", "8", "--n-resblocks", "2", "--crop", "48", "--batch", "4",
        "--no-progress", "--log-every", "1"]


def _photo(rng, h, w, channels=3):
    """A smooth random image (low-frequency noise, upsampled) as uint8."""
    small = rng.random((h // 8 + 2, w // 8 + 2, channels))
    big = torch.from_numpy(small).permute(2, 0, 1)[None]
    big = imresize(big, size=(h, w)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    big = big + 0.05 * rng.random(big.shape)
    return (np.clip(big, 0, 1) * 255).round().astype(np.uint8).squeeze()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    (root / "val").mkdir()
    write_array(_photo(rng, 80, 104), root / "train" / "a.png")
    write_array(_photo(rng, 64, 64, 1), root / "train" / "gray.png")  # promoted to RGB
    write_array(_photo(rng, 56, 72), root / "train" / "c.jpg")
    write_array(_photo(rng, 52, 60).astype(np.uint16) * 257, root / "train" / "d16.png")
    write_array(_photo(rng, 48, 64), root / "val" / "v.png")
    return root


def _run(argv):
    assert trainer.main([str(a) for a in argv]) == 0


def _weights(path):
    return load_file(path)


def _log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_is_exact(data, tmp_path):
    """Training 2N steps equals N steps, stop, resume, N steps: weights, EMA and log."""
    args = ["--data", data / "train", *TINY, "--steps", "4", "--schedule", "cosine",
            "--warmup", "2", "--ema", "0.9", "--clip-grad", "1.0", "--rgb-permute",
            "--ckpt-every", "2"]
    _run([*args, "--workers", "0", "--out", tmp_path / "once"])
    _run([*args, "--workers", "0", "--stop-at", "2", "--out", tmp_path / "twice"])
    first = _log(tmp_path / "twice" / "log.csv")
    assert [r["step"] for r in first] == ["1", "2"]
    # resumed with data workers this time: the sample stream does not depend on them
    _run([*args, "--workers", "2", "--resume", "auto", "--out", tmp_path / "twice"])
    a, b = _weights(tmp_path / "once" / "model.safetensors"), _weights(tmp_path / "twice" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ca = torch.load(tmp_path / "once" / "last.pt", weights_only=True)
    cb = torch.load(tmp_path / "twice" / "last.pt", weights_only=True)
    assert ca["step"] == cb["step"] == 4
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    assert ca["scheduler"] == cb["scheduler"]
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    la, lb = _log(tmp_path / "once" / "log.csv"), _log(tmp_path / "twice" / "log.csv")
    assert [(r["step"], r["loss"], r["lr"]) for r in la] == [(r["step"], r["loss"], r["lr"]) for r in lb]
    # the shipped weights are the EMA's, which differ from the raw weights
    assert not all(torch.equal(ca["model"][k], a[k]) for k in a)


def test_training_reduces_loss_and_validates(data, tmp_path):
    _run(["--data", data / "train", "--val", data / "val", *TINY, "--n-feats", "16",
          "--steps", "30", "--lr", "1e-3", "--workers", "0", "--log-every", "5",
          "--val-every", "15", "--out", tmp_path])
    rows = _log(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == ["5", "10", "15", "20", "25", "30"]
    assert rows[-1]["val_psnr"] and rows[2]["val_psnr"] and not rows[0]["val_psnr"]
    assert float(rows[-1]["val_psnr"]) > float(rows[2]["val_psnr"])
    first = np.mean([float(r["loss"]) for r in rows[:2]])
    last = np.mean([float(r["loss"]) for r in rows[-2:]])
    assert last < 0.8 * first
    model = load_model(tmp_path / "model.safetensors")
    assert isinstance(model, IGNN) and model.config["n_feats"] == 16
    assert oct(os.stat(tmp_path / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())


def test_bf16_autocast_step_on_cpu(data, tmp_path):
    _run(["--data", data / "train", *TINY, "--steps", "2", "--amp", "bf16", "--workers", "0",
          "--out", tmp_path])
    assert all(np.isfinite(float(r["loss"])) for r in _log(tmp_path / "log.csv"))


def test_fp16_grad_scaler_resumes_exactly(data, tmp_path):
    """fp16 autocast with a GradScaler (CPU autocast supports fp16): the scaler's state
    survives a resume."""
    args = ["--data", data / "train", *TINY, "--steps", "4", "--amp", "fp16", "--workers", "0"]
    _run([*args, "--out", tmp_path / "once"])
    _run([*args, "--stop-at", "2", "--out", tmp_path / "twice"])
    _run([*args, "--resume", "auto", "--out", tmp_path / "twice"])
    ca = torch.load(tmp_path / "once" / "last.pt", weights_only=True)
    cb = torch.load(tmp_path / "twice" / "last.pt", weights_only=True)
    assert ca["scaler"] == cb["scaler"] and ca["scaler"]["scale"] > 1
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key


def test_tensorboard_events_when_installed(data, tmp_path, monkeypatch):
    import types
    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append(("closed", self.log_dir))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=SummaryWriter))
    _run(["--data", data / "train", *TINY, "--steps", "2", "--workers", "0", "--out", tmp_path])
    assert ("loss", 1) in scalars and ("lr", 2) in scalars
    assert scalars[-1] == ("closed", tmp_path / "tensorboard")


def test_ddp_two_processes_gloo(data, tmp_path):
    """torchrun with 2 CPU processes: ranks end identical (the trainer checks it), only rank
    0 writes, and the result matches one process with the same global batch. The DDP run
    also recomputes the GA per rank (--checkpoint-ga), which DDP's hooks must survive."""
    args = ["--data", data / "train", *TINY, "--steps", "3", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "ignn_triton.train",
           *map(str, args), "--checkpoint-ga", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("training IGNN") == 1 and done.stderr.count("done: step 3") == 1
    assert "x2" in done.stderr.split("training IGNN")[1].splitlines()[0]
    assert [r["step"] for r in _log(tmp_path / "ddp" / "log.csv")] == ["1", "2", "3"]
    _run([*args, "--out", tmp_path / "single"])
    a = _weights(tmp_path / "ddp" / "model.safetensors")
    b = _weights(tmp_path / "single" / "model.safetensors")
    for key in a:  # gradients averaged over ranks vs over one batch: rounding only
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_samples_are_a_function_of_seed_and_number(data):
    ds = PatchDataset([data / "train"], 4, 48, seed=3, rgb_permute=True)
    lr, hr = ds[12]
    assert lr.shape == (3, 12, 12) and hr.shape == (3, 48, 48)
    assert torch.equal(ds[12][1], hr) and not torch.equal(ds[13][1], hr)
    assert torch.equal(lr, quantise(imresize(hr, 1 / 4)))
    assert torch.equal(lr * 255, (lr * 255).round())  # 8-bit LR, like a stored image
    uncached = PatchDataset([data / "train"], 4, 48, seed=3, rgb_permute=True, cache_bytes=0)
    assert ds.cache is not None and uncached.cache is None
    for n in range(40):  # cached or decoded per sample: the same crops
        assert all(torch.equal(a, b) for a, b in zip(ds[n], uncached[n]))
    other = PatchDataset([data / "train"], 4, 48, seed=4, rgb_permute=True)
    assert not torch.equal(other[12][1], hr)
    assert list(StepSampler(2, 4, 6, rank=1, world=2)) == [15, 16, 17, 21, 22, 23]


def test_paired_lr_folder_stays_aligned(tmp_path):
    """HR = LR with every pixel repeated S x S: any aligned crop pair satisfies it too."""
    rng = np.random.default_rng(1)
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    for name in ("0001", "0002"):
        lr = rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)
        write_array(lr, tmp_path / "lr" / f"{name}x4.png")  # the DIV2K naming
        write_array(np.kron(lr, np.ones((4, 4, 1), np.uint8)), tmp_path / "hr" / f"{name}.png")
    ds = PatchDataset([tmp_path / "hr"], 4, 32, lr_folders=[tmp_path / "lr"])
    for n in range(20):
        lr, hr = ds[n]
        assert torch.equal(hr, lr.repeat_interleave(4, 1).repeat_interleave(4, 2))


def test_lr_schedules():
    args = trainer.parse_args(["--data", "x", "--out", "y", "--steps", "100", "--milestones",
                               "50", "20", "--gamma", "0.5", "--warmup", "4"])
    assert [trainer.lr_factor(t, args) for t in (0, 3, 4, 19, 20, 49, 50, 99)] == \
        [0.25, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    args.schedule = "cosine"
    assert trainer.lr_factor(4, args) == 1.0
    assert trainer.lr_factor(52, args) == pytest.approx(0.5)
    assert trainer.lr_factor(100, args) == pytest.approx(0.0)


def test_init_from_edsr_backbone_and_ignn(data, tmp_path):
    torch.manual_seed(1)
    edsr = EDSR(scale=4, n_feats=8, n_resblocks=2, res_scale=1.0)
    torch.save(edsr.state_dict(), tmp_path / "edsr.pt")
    model = IGNN(scale=4, n_feats=8, n_resblocks=2, res_scale=1.0)
    assert initialise(model, tmp_path / "edsr.pt").startswith("EDSR backbone")
    own = model.state_dict()
    pairs = {"head.0.weight": "head.0.weight", "body1.0.body.0.weight": "body.0.body.0.weight",
             "body2.0.body.2.bias": "body.1.body.2.bias", "body2.1.0.weight": "body.2.weight",
             "upsample.0.weight": "tail.0.0.weight", "tail.0.0.weight": "tail.0.2.weight",
             "tail.1.0.bias": "tail.1.bias"}
    for ours, theirs in pairs.items():
        assert torch.equal(own[ours], edsr.state_dict()[theirs]), ours
    # the trainer's --init: an IGNN checkpoint loads whole
    source = IGNN(scale=4, n_feats=8, n_resblocks=2, res_scale=1.0)
    save_model(source, tmp_path / "ignn.safetensors")
    _run(["--data", data / "train", *TINY, "--res-scale", "1", "--steps", "1", "--lr", "0",
          "--workers", "0", "--init", tmp_path / "ignn.safetensors", "--out", tmp_path / "run"])
    trained = _weights(tmp_path / "run" / "model.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(trained[key], value), key


def _fails(argv, capsys, *needles):
    assert trainer.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_fails_before_training(data, tmp_path, capsys):
    base = [*TINY, "--steps", "1", "--workers", "0"]
    (tmp_path / "empty").mkdir()
    _fails(["--data", tmp_path / "empty", *base, "--out", tmp_path / "o"], capsys, "holds no images")
    _fails(["--data", tmp_path / "nope", *base, "--out", tmp_path / "o"], capsys, "no such data folder")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_array(np.zeros((30, 30, 3), np.uint8), bad / "small.png")
    _fails(["--data", bad, *base, "--out", tmp_path / "o"], capsys, "2 problem(s)",
           "broken.png: cannot read image", "small.png: 30x30 is smaller than the 48x48 crop")
    (tmp_path / "file").write_text("x")
    _fails(["--data", data / "train", *base, "--out", tmp_path / "file"], capsys, "is a file")
    assert not (tmp_path / "o").exists()  # nothing written by any of the above
    # an IGNN of another width cannot initialise the run; an EDSR of another scale neither
    save_model(IGNN(scale=4, n_feats=4, n_resblocks=2), tmp_path / "c4.safetensors")
    _fails(["--data", data / "train", *base, "--init", tmp_path / "c4.safetensors",
            "--out", tmp_path / "o"], capsys, "IGNN config {'n_feats': 4} differs")
    save_model(EDSR(scale=2, n_feats=8, n_resblocks=2), tmp_path / "edsr2.safetensors")
    _fails(["--data", data / "train", *base, "--init", tmp_path / "edsr2.safetensors",
            "--out", tmp_path / "o"], capsys, "x2 EDSR checkpoint cannot initialise a x4")
    # a x2 checkpoint cannot resume a x4 run
    save_model(IGNN(scale=2, n_feats=8, n_resblocks=2), tmp_path / "x2.safetensors")
    x2 = [a if a != "4" else "2" for a in base]
    _run(["--data", data / "train", *x2, "--out", tmp_path / "x2run"])
    _fails(["--data", data / "train", *base, "--resume", tmp_path / "x2run" / "last.pt",
            "--out", tmp_path / "o"], capsys, "checkpoint of a x2 model; this run is x4")
    _fails(["--data", data / "train", *x2, "--steps", "3", "--lr", "1e-3", "--resume",
            tmp_path / "x2run" / "last.pt", "--out", tmp_path / "o"], capsys,
           "same settings", "--lr 0.0001 (now 0.001)")
    _fails(["--data", data / "train", *base, "--resume", tmp_path / "x2.safetensors",
            "--out", tmp_path / "o"], capsys, "not a training checkpoint", "use --init")
    whole = (tmp_path / "x2run" / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    _fails(["--data", data / "train", *x2, "--resume", tmp_path / "truncated.pt",
            "--out", tmp_path / "o"], capsys, "not a readable training checkpoint")
    assert not (tmp_path / "o").exists()


def test_init_across_scales_maps_what_fits(data, tmp_path):
    """A x2 IGNN initialises a x4 run: everything but the x4 upsampler conv (tail.0.0);
    its last conv becomes the x4 model's tail.1.0."""
    torch.manual_seed(2)
    source = IGNN(scale=2, n_feats=8, n_resblocks=2, res_scale=1.0)
    model = IGNN(scale=4, n_feats=8, n_resblocks=2, res_scale=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(source, tmp_path / "x2.safetensors")
    message = initialise(model, tmp_path / "x2.safetensors")
    assert message.endswith("for a x4 model (tail.0.0 at random)")
    for key, value in model.state_dict().items():
        if key.startswith("tail.0.0."):
            assert torch.equal(value, before[key]), key
        elif key.startswith("tail.1.0."):
            assert torch.equal(value, source.state_dict()["tail.0.0." + key[9:]]), key
        else:
            assert torch.equal(value, source.state_dict()[key]), key


def _damage(ckpt: dict, part: str) -> dict:
    ckpt = {**ckpt}
    if part == "no optimiser":
        del ckpt["optimiser"]
    elif part == "misshaped model":
        ckpt["model"] = {**ckpt["model"], "head.0.weight": torch.zeros(8, 3, 5, 5)}
    elif part == "misshaped moments":
        state = {**ckpt["optimiser"]["state"], 0: {**ckpt["optimiser"]["state"][0],
                                                    "exp_avg": torch.zeros(3)}}
        ckpt["optimiser"] = {**ckpt["optimiser"], "state": state}
    elif part == "float step":
        ckpt["step"] = 1.5
    elif part == "bad rng":
        ckpt["rng"] = {"torch": torch.zeros(7, dtype=torch.uint8)}
    elif part == "int weights":
        ckpt["model"] = {k: v.long() for k, v in ckpt["model"].items()}
    elif part == "args not a dict":
        ckpt["args"] = [1, 2]
    return ckpt


@pytest.mark.parametrize("part, needle", [
    ("no optimiser", "optimiser: expected Adam's state_dict"),
    ("misshaped model", "model: head.0.weight: shape (8, 3, 5, 5), expected (8, 3, 3, 3)"),
    ("misshaped moments", "optimiser: parameter 0 exp_avg is (3,), expected a tensor of shape"),
    ("float step", "step must be a non-negative integer; got 1.5"),
    ("bad rng", "rng: expected torch's CPU generator state"),
    ("int weights", "expected a floating-point tensor"),
    ("args not a dict", "its 'args' must be the run's arguments"),
])
def test_a_damaged_training_checkpoint_is_refused_before_anything_is_written(
        data, tmp_path_factory, tmp_path, capsys, part, needle):
    run = tmp_path_factory.getbasetemp() / "resume_source"
    args = ["--data", data / "train", *TINY, "--steps", "2", "--workers", "0"]
    if not (run / "last.pt").exists():
        _run([*args, "--steps", "1", "--out", run])
    ckpt = torch.load(run / "last.pt", weights_only=True)
    torch.save(_damage(ckpt, part), tmp_path / "last.pt")
    _fails([*args, "--resume", tmp_path / "last.pt", "--out", tmp_path / "o"], capsys,
           str(tmp_path / "last.pt"), needle)
    assert not (tmp_path / "o").exists()
    # --init takes the same file as weights: the same checks on the weights
    if part in ("misshaped model", "int weights"):
        _fails([*args, "--init", tmp_path / "last.pt", "--out", tmp_path / "o"], capsys,
               needle.removeprefix("model: "))
        assert not (tmp_path / "o").exists()


def test_crash_mid_save_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    args = ["--data", data / "train", *TINY, "--workers", "0", "--ckpt-every", "1",
            "--out", tmp_path]
    _run([*args, "--steps", "1"])
    good = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    assert trainer.main([str(a) for a in [*args, "--steps", "3", "--resume", "auto"]]) == 2
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries
    _run([*args, "--steps", "2", "--resume", "auto"])  # and it resumes from it


def test_nan_loss_stops_with_a_clear_error(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer.F, "l1_loss", lambda a, b: (a - b).abs().mean() * float("nan"))
    _fails(["--data", data / "train", *TINY, "--steps", "2", "--workers", "0",
            "--out", tmp_path], capsys, "step 0: the loss is nan")
    assert not (tmp_path / "last.pt").exists()


def test_cli_train_entry_point(data, tmp_path):
    from ignn_triton.cli import main
    assert main(["train", "--data", str(data / "train"), *TINY, "--steps", "1",
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "args.json").is_file()


def test_compiled_training_matches_eager(data, tmp_path):
    """Compiled, and compiled with the GA's per-rank recomputation (--checkpoint-ga); eager
    with --checkpoint-ga is bit-identical to eager without."""
    args = ["--data", data / "train", *TINY, "--steps", "2", "--workers", "0"]
    _run([*args, "--out", tmp_path / "eager"])
    _run([*args, "--checkpoint-ga", "--out", tmp_path / "eager_ckpt"])
    _run([*args, "--compile", "--out", tmp_path / "compiled"])
    _run([*args, "--compile", "--checkpoint-ga", "--out", tmp_path / "compiled_ckpt"])
    a = _weights(tmp_path / "eager" / "model.safetensors")
    for key, value in _weights(tmp_path / "eager_ckpt" / "model.safetensors").items():
        assert torch.equal(a[key], value), key
    for run in ("compiled", "compiled_ckpt"):
        b = _weights(tmp_path / run / "model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)  # the trainer's seed: its initial weights
    init = build_model(trainer.parse_args([str(x) for x in args] + ["--out", "x"]))
    assert not torch.equal(a["head.0.weight"], init.state_dict()["head.0.weight"])
    assert torch.equal(a["vggnet.model.0.weight"], init.state_dict()["vggnet.model.0.weight"])
