"""Training IGNN (spec section 9): `ignn-triton train ...` or `python -m ignn_triton.train ...`.

Data: folders of HR images; LR crops made on the fly with MATLAB bicubic (`imresize`) and
quantised to 8 bits, or read from a paired LR folder. Every training sample is a pure
function of (seed, sample number), so a run resumed from a checkpoint, run with any number
of data workers, or split over DDP ranks sees exactly the same batches.

Run folder (`--out`): `last.pt` (full training state, written atomically every
`--ckpt-every` steps and at the end), `model.safetensors` (the weights to use: EMA weights
when `--ema` is on), `log.csv`, `args.json`, and TensorBoard events when tensorboard is
installed. Distributed: `torchrun --nproc_per_node=N -m ignn_triton.train ...`
(nccl on CUDA, gloo on CPU); `--batch` is the global batch, split over the ranks, and only
rank 0 writes anything.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import (CheckpointError, is_safetensors, is_training_checkpoint, load_into,
                         load_torch_file, read_checkpoint, save_model, state_problems)
from .images import (IMAGE_EXTENSIONS, array_to_tensor, atomic_write, image_size, quantise,
                     read_array, read_image)
from .imresize import imresize
from .metrics import psnr_y, ssim_y
from .model import IGNN, config_problems

DEFAULT_CROP = {2: 160, 3: 198, 4: 160}  # HR crop sizes of the paper (spec section 9)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Arguments a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("scale", "n_feats", "n_resblocks", "res_scale", "k", "window", "crop", "batch",
               "seed", "lr", "schedule", "milestones", "gamma", "warmup", "amp", "ema",
               "clip_grad", "rgb_permute")


def image_files(folder: Path) -> list[Path]:
    """Image files under folder (recursively), sorted; ValueError if there are none."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such data folder")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _rgb(array: np.ndarray) -> torch.Tensor:
    """(H, W[, C]) uint8/uint16 -> (3, H, W) float32 RGB in [0, 1]: gray promoted, alpha dropped."""
    t = array_to_tensor(array)[0]
    return t.expand(3, -1, -1) if t.shape[0] == 1 else t[:3]


class PatchDataset(Dataset):
    """Random (LR, HR) training crops; sample n is a pure function of (seed, n).

    folders: HR image folders. lr_folders: optional paired LR folders, matched by stem
    (`0001.png` <- `0001.png` or `0001x4.png`, the DIV2K layout). The image of a sample is
    drawn with probability proportional to its number of crop positions. Augmentations:
    horizontal/vertical flip, transpose, and (rgb_permute) a random channel order.
    When the decoded images (as stored: 8 or 16 bit) take at most about cache_bytes, they
    are decoded once and kept in memory (shared by the data workers); otherwise every
    sample decodes its image. Samples are cropped before conversion to float.
    """

    def __init__(self, folders, scale: int, crop: int, seed: int = 0, lr_folders=None,
                 rgb_permute: bool = False, cache_bytes: int = 2 << 30):
        if crop % scale:
            raise ValueError(f"--crop {crop} must be a multiple of the scale {scale}")
        self.scale, self.crop, self.seed, self.rgb_permute = scale, crop, seed, rgb_permute
        self.files = [f for folder in folders for f in image_files(Path(folder))]
        problems, sizes = [], []
        for f in self.files:
            try:
                h, w = image_size(f)
            except ValueError as e:
                problems.append(str(e))
                continue
            sizes.append((h, w))
            if h < crop or w < crop:
                problems.append(f"{f}: {w}x{h} is smaller than the {crop}x{crop} crop "
                                f"(lower --crop or remove the image)")
        self.lr_files = None
        if lr_folders:
            by_stem = {p.stem: p for folder in lr_folders for p in image_files(Path(folder))}
            self.lr_files = []
            for f, (h, w) in zip(self.files, sizes):
                lr = by_stem.get(f.stem) or by_stem.get(f"{f.stem}x{scale}")
                if lr is None:
                    problems.append(f"{f}: no LR image named {f.stem} or {f.stem}x{scale} in "
                                    f"{', '.join(map(str, lr_folders))}")
                    continue
                self.lr_files.append(lr)
                lh, lw = image_size(lr)
                if (lh, lw) != (h // scale, w // scale):
                    problems.append(f"{lr}: LR is {lw}x{lh}, expected {w // scale}x{h // scale} "
                                    f"for {f.name} at x{scale}")
        if problems:
            raise ValueError(f"{len(problems)} problem(s) with the training data:\n  "
                             + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
        self.sizes = sizes
        positions = np.array([(h - crop + 1) * (w - crop + 1) for h, w in sizes], np.float64)
        self.weights = positions / positions.sum()
        self.cache = None
        if sum(h * w * 3 for h, w in sizes) * (1.25 if lr_folders else 1) <= cache_bytes:
            self.cache = [self._decode(i) for i in range(len(self.files))]

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        hr = read_array(self.files[i])
        lr = read_array(self.lr_files[i]) if self.lr_files else None
        return hr, lr

    def __len__(self) -> int:
        return 2 ** 62  # samples are drawn by number: any n is valid

    def __getitem__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, n])
        i = int(rng.choice(len(self.files), p=self.weights))
        hr_img, lr_img = self.cache[i] if self.cache is not None else self._decode(i)
        S, c = self.scale, self.crop
        (h, w), lc = self.sizes[i], c // S
        if lr_img is not None:  # crop on the LR grid so the pair stays aligned
            y, x = int(rng.integers(h // S - lc + 1)), int(rng.integers(w // S - lc + 1))
            hr = _rgb(hr_img[S * y: S * y + c, S * x: S * x + c])
            lr = _rgb(lr_img[y: y + lc, x: x + lc])
        else:
            y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
            hr, lr = _rgb(hr_img[y: y + c, x: x + c]), None
        hflip, vflip, transpose = (rng.random(3) < 0.5).tolist()
        order = rng.permutation(3).tolist() if self.rgb_permute else [0, 1, 2]

        def augment(t):
            t = t[order]
            t = t.flip(2) if hflip else t
            t = t.flip(1) if vflip else t
            return (t.transpose(1, 2) if transpose else t).contiguous()

        hr = augment(hr)
        lr = augment(lr) if lr is not None else quantise(imresize(hr, 1 / S))
        return lr, hr


class StepSampler(Sampler):
    """Sample numbers for steps [start, steps) of this rank: global step t, batch B, world
    size R: rank r takes t*B + r*B/R ... t*B + (r+1)*B/R - 1."""

    def __init__(self, start: int, steps: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.steps, self.batch = start, steps, batch
        self.local = batch // world
        self.offset = rank * self.local

    def __iter__(self):
        for t in range(self.start, self.steps):
            base = t * self.batch + self.offset
            yield from range(base, base + self.local)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.local


def lr_factor(step: int, args) -> float:
    """Learning-rate multiplier at `step`: linear warm-up, then MultiStep (x gamma at every
    milestone) or cosine to zero at `args.steps`."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.schedule == "cosine":
        span = max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(step - args.warmup, span) / span))
    return args.gamma ** sum(step >= m for m in args.milestones)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers. The
    decay warms up as min(decay, (1 + t) / (10 + t)) after t updates, so the random
    initialisation is forgotten (0.999 ** 3000 would still hold 5% of it)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, updates: int) -> None:
        decay = min(self.decay, (1 + updates) / (10 + updates))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.state[key].lerp_(value, 1 - decay)
            else:
                self.state[key].copy_(value)


def build_model(args) -> IGNN:
    return IGNN(scale=args.scale, n_feats=args.n_feats, n_resblocks=args.n_resblocks,
                res_scale=args.res_scale, k=args.k, window=args.window)


def model_with(args, state: dict) -> IGNN:
    """A model holding `state`, built without touching the global RNG (its random
    initialisation is overwritten anyway), so checkpoints and validation leave the
    training's random stream as it was."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(args)
    model.load_state_dict(state)
    return model


def edsr_to_ignn(state: dict, model: IGNN) -> dict:
    """Map an EDSR state_dict onto IGNN's backbone: head, the first and second half of the
    body, the body's last conv, the upsampler convs and the last conv. The graph
    aggregation, fuse layers and VGG keep their initialisation."""
    half = model.config["n_resblocks"] // 2
    out = {"head.0.weight": state["head.0.weight"], "head.0.bias": state["head.0.bias"]}
    n = len({k.split(".")[1] for k in state if k.startswith("body.") and ".body." in k})
    if n != 2 * half:
        raise CheckpointError(f"EDSR checkpoint has {n} residual blocks; the IGNN has {2 * half}")
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "body" and parts[1].isdigit() and int(parts[1]) < n:
            i = int(parts[1])
            name = f"body1.{i}" if i < half else f"body2.{i - half}"
            out[".".join([name] + parts[2:])] = value
        elif parts[0] == "body":  # body.n: the conv after the blocks
            out[".".join(["body2", str(half), "0"] + parts[2:])] = value
    ups = sorted({int(k.split(".")[2]) for k in state if k.startswith("tail.0.")})
    ups_keys = [f"tail.0.{u}" for u in ups]
    targets = ["upsample.0", "tail.0.0"] if model.scale == 4 else ["upsample.0"]
    if len(ups_keys) != len(targets):
        raise CheckpointError(f"EDSR checkpoint has {len(ups_keys)} upsampler convs; a "
                              f"x{model.scale} IGNN needs {len(targets)}")
    last = "tail.1.0" if model.scale == 4 else "tail.0.0"
    for src, dst in list(zip(ups_keys, targets)) + [("tail.1", last)]:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = state[f"{src}.{p}"]
    expected = model.state_dict()
    bad = [k for k, v in out.items() if k not in expected or expected[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"EDSR checkpoint does not fit this IGNN's backbone: "
                              f"{', '.join(bad[:8])}")
    return out


def _last_conv(scale: int) -> str:
    """The IGNN's last convolution (C -> 3): after the x4 tail's upsampler, or alone."""
    return "tail.1.0" if scale == 4 else "tail.0.0"


def ignn_across_scales(state: dict, source_scale: int, model: IGNN) -> tuple[dict, list[str]]:
    """Map an IGNN of another scale onto model: every tensor with the same name and shape
    (backbone, graph aggregation, fuse layers; the upsampler too between x2 and x4, whose
    graph scale is 2 for both), and the last convolution (C -> 3). Returns the mapped
    tensors and the layers left at their initialisation."""
    src, dst = _last_conv(source_scale), _last_conv(model.scale)
    mapped = {}
    for key, value in state.items():
        if key.startswith("tail."):
            if not key.startswith(src + "."):
                continue
            key = dst + key[len(src):]
        mapped[key] = value
    expected = model.state_dict()
    out = {k: v for k, v in mapped.items() if k in expected and expected[k].shape == v.shape}
    left = sorted({k.rsplit(".", 1)[0] for k in expected if k not in out})
    return out, left


def initialise(model: IGNN, path: Path) -> str:
    """Load an IGNN checkpoint (all of it; from another scale, what fits: see
    `ignn_across_scales`) or an EDSR one of the same scale (backbone only)."""
    arch, config, state = read_checkpoint(path)
    if arch == "EDSR" and config["scale"] != model.scale:
        raise CheckpointError(f"{path}: a x{config['scale']} EDSR checkpoint cannot "
                              f"initialise a x{model.scale} model (pass --scale "
                              f"{config['scale']} or another checkpoint)")
    if arch == "IGNN":
        # k, window and res_scale are not in a released checkpoint: the run's own apply
        fixed = ("n_feats", "n_resblocks", "patch_size", "stride")
        differ = {key: config[key] for key in fixed if config[key] != model.config[key]}
        if differ:
            raise CheckpointError(f"{path}: IGNN config {differ} differs from the model "
                                  f"being trained {model.config}")
        if config["scale"] == model.scale:
            load_into(model, state)
            return f"IGNN weights from {path}"
        mapped, left = ignn_across_scales(state, config["scale"], model)
        model.load_state_dict(mapped, strict=False)
        return (f"IGNN x{config['scale']} weights from {path} for a x{model.scale} model ("
                + (f"{', '.join(left)} at random)" if left else "every layer fits)"))
    model.load_state_dict(edsr_to_ignn(state, model), strict=False)
    return f"EDSR backbone from {path}"


def validate(model: torch.nn.Module, files: list[Path], scale: int, amp: str,
             device: torch.device) -> dict:
    """Mean PSNR/SSIM (Y, border = scale, 8-bit) of the model on HR files (LR by bicubic)."""
    was_training = model.training
    model.eval()
    psnr, ssim = [], []
    with torch.no_grad(), torch.autocast(device.type, AMP_DTYPES.get(amp, torch.float32),
                                         enabled=amp != "off"):
        for f in files:
            hr = read_image(f)
            hr = hr[..., : hr.shape[2] // scale * scale, : hr.shape[3] // scale * scale]
            lr = quantise(imresize(hr, 1 / scale))
            sr = model(lr.to(device)).float().clamp(0, 1).cpu()
            psnr.append(psnr_y(sr, hr, scale))
            ssim.append(ssim_y(sr, hr, scale))
    model.train(was_training)
    return dict(val_psnr=float(np.mean(psnr)), val_ssim=float(np.mean(ssim)))


def _rng_state() -> dict:
    """torch's generators (the data stream needs none: it is a function of seed and step)."""
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_replicas(model: torch.nn.Module) -> None:
    """Raise unless every rank holds bit-identical weights (DDP's invariant), comparing
    each tensor with rank 0's."""
    for key, value in model.state_dict().items():
        ref = value.detach().clone()
        dist.broadcast(ref, 0)
        same = torch.tensor([int(torch.equal(ref, value))], device=value.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if not same.item():
            raise RuntimeError(f"DDP ranks hold different values of {key}")


def save_checkpoint(path: Path, **state) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume_problems(ckpt: dict, args) -> list[str]:
    """Everything wrong with a training checkpoint's parts (types, shapes, step, RNG) for a
    run with these args; checked before anything is restored or written."""
    problems = []
    step = ckpt["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"step must be a non-negative integer; got {step!r}")
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        model = build_model(args)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    for part in ("model", "ema"):
        state = ckpt.get(part)
        if part == "ema" and state is None:
            continue
        if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            problems.append(f"{part}: expected a state_dict of tensors; got "
                            f"{type(state).__name__}")
            continue
        problems += [f"{part}: {problem}" for problem in state_problems(expected, state)]
    if args.ema is not None and ckpt.get("ema") is None:
        problems.append("ema: missing, but the run keeps an EMA (--ema)")
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    optimiser = ckpt.get("optimiser")
    groups = optimiser.get("param_groups") if isinstance(optimiser, dict) else None
    state = optimiser.get("state") if isinstance(optimiser, dict) else None
    if (not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != 1
            or not isinstance(groups[0], dict)
            or groups[0].get("params") != list(range(len(shapes)))):
        problems.append(f"optimiser: expected Adam's state_dict over the model's "
                        f"{len(shapes)} trainable tensors")
    else:
        for i, moments in state.items():
            if not isinstance(i, int) or not 0 <= i < len(shapes) or not isinstance(moments, dict):
                problems.append(f"optimiser: state entry {i!r} is not one of the parameters'")
                continue
            for name in ("exp_avg", "exp_avg_sq"):
                value = moments.get(name)
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != shapes[i]:
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    problems.append(f"optimiser: parameter {i} {name} is {got!r}, expected "
                                    f"a tensor of shape {shapes[i]}")
    scheduler = ckpt.get("scheduler")
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != step:
        got = scheduler.get("last_epoch") if isinstance(scheduler, dict) else scheduler
        problems.append(f"scheduler: expected a LambdaLR state_dict at step {step!r}; got "
                        f"last_epoch {got!r}")
    scaler = ckpt.get("scaler")
    if not isinstance(scaler, dict) or (args.amp == "fp16" and not (
            isinstance(scaler.get("scale"), (int, float)) and math.isfinite(scaler["scale"])
            and scaler["scale"] > 0)):
        problems.append(f"scaler: expected a GradScaler state_dict with a positive finite "
                        f"scale; got {scaler!r:.80}")
    rng = ckpt.get("rng")
    expected_rng = torch.get_rng_state()
    cpu = rng.get("torch") if isinstance(rng, dict) else None
    if (not isinstance(cpu, torch.Tensor) or cpu.dtype != expected_rng.dtype
            or cpu.shape != expected_rng.shape):
        problems.append(f"rng: expected torch's CPU generator state, a {expected_rng.dtype} "
                        f"tensor of shape {tuple(expected_rng.shape)}")
    else:
        with torch.random.fork_rng(devices=[]):
            try:
                torch.set_rng_state(cpu)
            except RuntimeError as e:
                problems.append(f"rng: not a valid generator state ({e})")
    return problems


def load_checkpoint(path: Path, args) -> dict:
    """A training checkpoint, checked in full against args before anything is restored:
    one CheckpointError listing every problem."""
    if is_safetensors(path):
        raise CheckpointError(f"{path}: model weights (safetensors), not a training checkpoint "
                              "of ignn_triton.train (use --init for model weights)")
    try:
        ckpt = load_torch_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"not a readable training checkpoint: {e}") from None
    if not is_training_checkpoint(ckpt):
        raise CheckpointError(f"{path}: not a training checkpoint of ignn_triton.train "
                              "(use --init for model weights)")
    saved = ckpt["args"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its 'args' must be the run's arguments (a dict); got "
                              f"{type(saved).__name__}")
    if saved.get("scale") != args.scale:
        raise CheckpointError(f"{path}: checkpoint of a x{saved.get('scale')} model; this run "
                              f"is x{args.scale}")
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(args, k)!r})"
              for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
    if differ:
        raise CheckpointError(f"{path}: resuming needs the same settings as the run that wrote "
                              f"it; it used " + ", ".join(differ))
    problems = _resume_problems(ckpt, args)
    if problems:
        raise CheckpointError(f"{path}: a damaged training checkpoint:\n  "
                              + "\n  ".join(problems[:12]))
    return ckpt


def parse_args(argv=None) -> argparse.Namespace:
    """The trainer's arguments, every one checked here, before anything is read or written."""
    p = argparse.ArgumentParser(prog="ignn-triton train", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", type=Path, required=True, help="HR image folders")
    g.add_argument("--lr-data", nargs="+", type=Path,
                   help="paired LR folders (default: LR crops by MATLAB bicubic)")
    g.add_argument("--val", type=Path, help="folder of HR validation images (default: none)")
    g.add_argument("--crop", type=int, help="HR crop size (default: 160 for x2/x4, 198 for x3)")
    g.add_argument("--rgb-permute", action="store_true", help="random RGB channel order")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="data loader processes (default: %(default)s, min(4, cores))")
    g.add_argument("--cache-gb", type=float, default=2.0,
                   help="keep the decoded images in memory when they fit in this many GiB "
                   "(default: %(default)s; DIV2K's 800 HR images take about 6.5)")
    g = p.add_argument_group("model")
    g.add_argument("--scale", type=int, default=4, choices=(2, 3, 4),
                   help="(default: %(default)s)")
    g.add_argument("--n-feats", type=int, default=256, help="width C (default: %(default)s)")
    g.add_argument("--n-resblocks", type=int, default=32,
                   help="residual blocks, half before the graph aggregation (default: "
                   "%(default)s)")
    g.add_argument("--res-scale", type=float, default=0.1,
                   help="residual scaling (default: %(default)s)")
    g.add_argument("--k", type=int, default=5, help="neighbours per query (default: %(default)s)")
    g.add_argument("--window", type=int, default=30,
                   help="search window in son patches (default: %(default)s)")
    g.add_argument("--init", type=Path,
                   help="initial weights: an IGNN checkpoint (of any scale: what fits), or "
                   "EDSR (backbone only)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=800_000, help="(default: %(default)s)")
    g.add_argument("--batch", type=int, default=16,
                   help="global batch, split over ranks (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: %(default)s)")
    g.add_argument("--schedule", choices=("multistep", "cosine"), default="multistep",
                   help="(default: %(default)s)")
    g.add_argument("--milestones", type=int, nargs="*",
                   default=[160_000, 320_000, 480_000, 640_000],
                   help="multistep: steps where the rate is multiplied by --gamma (default: "
                   "160000 320000 480000 640000)")
    g.add_argument("--gamma", type=float, default=0.5, help="(default: %(default)s)")
    g.add_argument("--warmup", type=int, default=0,
                   help="linear warm-up steps (default: %(default)s)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (default: off)")
    g.add_argument("--ema", type=float,
                   help="keep an EMA of the weights with this decay (default: off)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off",
                   help="mixed precision (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--checkpoint-ga", action="store_true",
                   help="recompute the graph aggregation's per-rank activations in the "
                   "backward pass instead of keeping them (less memory, same result)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="(default: %(default)s: CUDA when available)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="run folder")
    g.add_argument("--resume", help="training checkpoint to resume from, or 'auto' "
                   "(OUT/last.pt if it exists)")
    g.add_argument("--force", action="store_true",
                   help="start afresh in a run folder that holds a previous run's files")
    g.add_argument("--ckpt-every", type=int, default=1000,
                   help="steps between checkpoints (default: %(default)s)")
    g.add_argument("--stop-at", type=int, help="stop with a checkpoint after this step "
                   "(for time-limited jobs; continue with --resume auto)")
    g.add_argument("--val-every", type=int, default=0,
                   help="validate every N steps (default: 0, at the end)")
    g.add_argument("--log-every", type=int, default=10, help="(default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    args.crop = DEFAULT_CROP[args.scale] if args.crop is None else args.crop
    args.milestones = sorted(args.milestones)
    for name in ("steps", "batch", "ckpt_every", "log_every", "crop", "stop_at"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.crop % args.scale:
        p.error(f"--crop {args.crop} must be a multiple of the scale {args.scale}")
    for name in ("warmup", "val_every", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0; got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr >= 0):  # a rate of 0 freezes the weights
        p.error(f"--lr must be a finite number >= 0; got {args.lr}")
    for name in ("gamma", "cache_gb", "clip_grad"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a positive number; got {value}")
    if args.ema is not None and not 0 < args.ema < 1:
        p.error(f"--ema must be in (0, 1); got {args.ema}")
    config = dict(scale=args.scale, n_feats=args.n_feats, n_resblocks=args.n_resblocks,
                  res_scale=args.res_scale, k=args.k, patch_size=3, stride=2, window=args.window)
    for problem in config_problems("IGNN", config):  # "n_feats must ..." -> "--n-feats must ..."
        name = problem.split()[0]
        p.error(f"--{name.replace('_', '-')}{problem[len(name):]}" if name in config else problem)
    return args


def _device(args, local_rank: int) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _jsonable(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list)
                and v and isinstance(v[0], Path) else v) for k, v in vars(args).items()}


def train(args) -> dict:
    """Run (or resume) training; returns the last logged row (loss, lr, validation)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(args, local_rank)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the {world} ranks")
    # Everything that can fail on bad input fails here, before any training step.
    dataset = PatchDataset(args.data, args.scale, args.crop, args.seed, args.lr_data,
                           args.rgb_permute, int(args.cache_gb * 2 ** 30))
    val_files = image_files(args.val) if args.val else []
    for f in val_files:
        h, w = image_size(f)
        if h < 3 * args.scale or w < 3 * args.scale:
            raise ValueError(f"{f}: {w}x{h} is too small to validate at x{args.scale}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    previous = [name for name in ("last.pt", "model.safetensors", "log.csv") if (out / name).exists()]
    if previous and args.resume is None and not args.force:
        raise ValueError(f"--out {out}: holds a previous run ({', '.join(previous)}); continue "
                         f"it with --resume auto, or start afresh with --force")
    resume = args.resume
    if resume == "auto":
        resume = out / "last.pt" if (out / "last.pt").is_file() else None
    elif resume is not None:
        resume = Path(resume)
        if not resume.is_file():
            raise ValueError(f"--resume {resume}: no such file")
    ckpt = load_checkpoint(resume, args) if resume else None

    torch.manual_seed(args.seed)
    model = build_model(args)
    origin = "random initialisation"
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        origin = f"resumed from {resume} at step {ckpt['step']}"
    elif args.init is not None:
        origin = initialise(model, args.init)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda t: lr_factor(t, args))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = EMA(model, args.ema) if args.ema else None
    start = 0
    if ckpt is not None:
        optimiser.load_state_dict(ckpt["optimiser"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
        _set_rng_state(ckpt["rng"])
        start = ckpt["step"]
    stop = min(args.steps, args.stop_at or args.steps)
    if start >= stop:
        raise ValueError(f"the checkpoint is at step {start}; --steps {args.steps} "
                         f"(--stop-at {args.stop_at}) leaves nothing to train")

    model.gcn.checkpoint = args.checkpoint_ga
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    else:
        net = model
    if args.compile:
        net = torch.compile(net, dynamic=False)  # fixed crops: static shapes
    loader = DataLoader(dataset, batch_size=args.batch // world,
                        sampler=StepSampler(start, stop, args.batch, rank, world),
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))  # not the global RNG

    writer, log_file, bar = None, None, None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "args.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(_jsonable(args), indent=2) + "\n"))
        fields = ["step", "loss", "lr", "it_per_s", "seconds", "val_psnr", "val_ssim"]
        new_log = ckpt is None or not (out / "log.csv").exists()
        if not new_log:  # drop rows past the checkpoint: they are about to be redone
            with open(out / "log.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
            atomic_write(out / "log.csv", lambda tmp: _write_rows(tmp, fields, rows))
        log_file = open(out / "log.csv", "w" if new_log else "a", newline="")
        log = csv.DictWriter(log_file, fieldnames=fields)
        if new_log:
            log.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(out / "tensorboard")
        except ImportError:
            pass
        if not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True)
        n_params = sum(p.numel() for p in params)
        print(f"training IGNN x{args.scale} (C={args.n_feats}, {args.n_resblocks} blocks, "
              f"{n_params / 1e6:.2f}M trainable) on {device} x{world}, {len(dataset.files)} "
              f"images, batch {args.batch}, crop {args.crop}, amp {args.amp}; {origin}",
              file=sys.stderr)

    def checkpoint(step: int) -> None:
        if rank != 0:
            return
        save_checkpoint(out / "last.pt", model=model.state_dict(), optimiser=optimiser.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                        ema=ema.state if ema is not None else None, rng=_rng_state(),
                        step=step, args=_jsonable(args))
        save_model(model_with(args, ema.state if ema is not None else model.state_dict()),
                   out / "model.safetensors")

    row: dict = {}
    amp_dtype = AMP_DTYPES.get(args.amp, torch.float32)
    tic, last_step = time.perf_counter(), start
    step = start
    try:
        for lr_img, hr_img in loader:
            lr_img = lr_img.to(device, non_blocking=True)
            hr_img = hr_img.to(device, non_blocking=True)
            with torch.autocast(device.type, amp_dtype, enabled=args.amp != "off"):
                sr = net(lr_img)
            loss = F.l1_loss(sr.float(), hr_img)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: the loss is {loss.item()}; stopping "
                                         f"(last good checkpoint: {out / 'last.pt'})")
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            if bar is not None:
                bar.update(1)
            validate_now = val_files and (step == stop or
                                          (args.val_every and step % args.val_every == 0))
            if step % args.log_every == 0 or step == stop or validate_now:
                loss_value = loss.detach()
                if world > 1:
                    dist.all_reduce(loss_value)
                    loss_value /= world
                now = time.perf_counter()
                row = dict(step=step, loss=loss_value.item(), lr=scheduler.get_last_lr()[0],
                           it_per_s=(step - last_step) / (now - tic), seconds=now - tic)
                tic, last_step = now, step
                if validate_now and rank == 0:
                    eval_model = model_with(args, ema.state).to(device) if ema is not None else model
                    row.update(validate(eval_model, val_files, args.scale, args.amp, device))
                if rank == 0:
                    log.writerow(row)
                    log_file.flush()
                    if writer is not None:
                        for key, value in row.items():
                            if key != "step":
                                writer.add_scalar(key, value, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                        **({"psnr": f"{row['val_psnr']:.2f}"}
                                           if "val_psnr" in row else {}))
            if step % args.ckpt_every == 0 or step == stop:
                checkpoint(step)
            if world > 1 and step % args.ckpt_every == 0:
                dist.barrier()
        if world > 1:
            check_replicas(model)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        if writer is not None:
            writer.close()
        if world > 1:
            net = None  # DDP's reducer must go before its process group, or exit can hang
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: step {step}, loss {row.get('loss', float('nan')):.4f}"
              + (f", validation PSNR {row['val_psnr']:.2f} dB SSIM {row['val_ssim']:.4f}"
                 if "val_psnr" in row else "") + f"; weights in {out / 'model.safetensors'}",
              file=sys.stderr)
    return row


def _write_rows(path, fields, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    from .cli import one_line_warnings
    one_line_warnings("ignn-triton train")
    args = parse_args(argv)
    try:
        train(args)
    except (CheckpointError, ValueError, FloatingPointError, OSError) as e:
        print(f"ignn-triton train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # checkpoints are written atomically: the last one is whole
        print("ignn-triton train: interrupted (continue with --resume auto)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
