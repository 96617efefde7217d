"""Training IGNN (spec section 9): `ignn-triton train ...` or `python -m ignn_triton.train ...`.

Here: the loop, the run's state and its records. Elsewhere: the data in `train_data`
(random crops, each a pure function of the seed and its sample number, so a resumed,
multi-worker or DDP run sees exactly the same batches), the checkpoint `last.pt` in
`train_checkpoint`, initial weights from another checkpoint (`--init`) in `transfer`.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .atomic import atomic_write
from .checkpoint import CheckpointError, save_model
from .images import image_size, quantise, read_image
from .imresize import imresize
from .metrics import psnr_y, ssim_y
from .model import IGNN, config_problems
from .train_checkpoint import (build_model, load_checkpoint, model_with, restore_rng,
                               rng_state, save_checkpoint)
from .train_data import PatchDataset, StepSampler, image_files
from .transfer import initialise

DEFAULT_CROP = {2: 160, 3: 198, 4: 160}  # HR crop sizes of the paper (spec section 9)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    val_files = _validation_files(args)
    out = _run_folder(args)
    resume = _resume_path(args, out)
    ckpt = load_checkpoint(resume, args) if resume else None
    run = TrainingRun.create(args, device, out, ckpt, resume)
    stop = min(args.steps, args.stop_at or args.steps)
    if run.start >= stop:
        raise ValueError(f"the checkpoint is at step {run.start}; --steps {args.steps} "
                         f"(--stop-at {args.stop_at}) leaves nothing to train")

    net = _network(run.model, args, device, world, local_rank)
    loader = DataLoader(dataset, batch_size=args.batch // world,
                        sampler=StepSampler(run.start, stop, args.batch, rank, world),
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))  # not the global RNG
    log = RunLog(args, out, ckpt is not None, run.start, rank == 0)
    if rank == 0:
        n_params = sum(p.numel() for p in run.params)
        print(f"training IGNN x{args.scale} (C={args.n_feats}, {args.n_resblocks} blocks, "
              f"{n_params / 1e6:.2f}M trainable) on {device} x{world}, {len(dataset.files)} "
              f"images, batch {args.batch}, crop {args.crop}, amp {args.amp}; {run.origin}",
              file=sys.stderr)

    row: dict = {}
    meter = Meter(run.start, world)
    step = run.start
    try:
        for lr_img, hr_img in loader:
            loss = run.train_step(net, lr_img, hr_img, step)
            step += 1
            log.advance()
            validate_now = val_files and (step == stop or
                                          (args.val_every and step % args.val_every == 0))
            if step % args.log_every == 0 or step == stop or validate_now:
                row = meter.row(step, loss, run.scheduler.get_last_lr()[0])
                if validate_now and rank == 0:
                    row.update(validate(run.eval_model(), val_files, args.scale, args.amp, device))
                log.write(row)
            if rank == 0 and (step % args.ckpt_every == 0 or step == stop):
                run.save(step)
            if world > 1 and step % args.ckpt_every == 0:
                dist.barrier()
        if world > 1:
            check_replicas(run.model)
    finally:
        log.close()
        if world > 1:
            net = None  # DDP's reducer must go before its process group, or exit can hang
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: step {step}, loss {row.get('loss', float('nan')):.4f}"
              + (f", validation PSNR {row['val_psnr']:.2f} dB SSIM {row['val_ssim']:.4f}"
                 if "val_psnr" in row else "") + f"; weights in {out / 'model.safetensors'}",
              file=sys.stderr)
    return row


# --- setup: every input checked before the first step -------------------------------------

def _device(args, local_rank: int) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _validation_files(args) -> list[Path]:
    """The --val images (none without --val), each large enough to validate at the scale."""
    files = image_files(args.val) if args.val else []
    for f in files:
        h, w = image_size(f)
        if h < 3 * args.scale or w < 3 * args.scale:
            raise ValueError(f"{f}: {w}x{h} is too small to validate at x{args.scale}")
    return files


def _run_folder(args) -> Path:
    """--out: a folder, or nothing yet; one holding a previous run's files only with
    --resume (continue it) or --force (start afresh)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    previous = [name for name in ("last.pt", "model.safetensors", "log.csv") if (out / name).exists()]
    if previous and args.resume is None and not args.force:
        raise ValueError(f"--out {out}: holds a previous run ({', '.join(previous)}); continue "
                         f"it with --resume auto, or start afresh with --force")
    return out


def _resume_path(args, out: Path) -> Path | None:
    """The checkpoint to resume from: --resume's file; for 'auto', OUT/last.pt if it exists."""
    if args.resume == "auto":
        return out / "last.pt" if (out / "last.pt").is_file() else None
    if args.resume is None:
        return None
    resume = Path(args.resume)
    if not resume.is_file():
        raise ValueError(f"--resume {resume}: no such file")
    return resume


def _network(model: IGNN, args, device: torch.device, world: int,
             local_rank: int) -> torch.nn.Module:
    """What the steps run: the model (with --checkpoint-ga recomputing the graph
    aggregation's per-rank activations), wrapped in DDP over several ranks, compiled with
    --compile."""
    model.gcn.checkpoint = args.checkpoint_ga
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    else:
        net = model
    if args.compile:
        net = torch.compile(net, dynamic=False)  # fixed crops: static shapes
    return net


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


# --- the run's state: what a step updates and last.pt saves -------------------------------

@dataclass
class TrainingRun:
    """The model and everything that updates it (optimiser, schedule, gradient scaler,
    EMA), on this rank's device, saved to and restored from the run folder's last.pt."""

    args: argparse.Namespace
    device: torch.device
    out: Path
    model: IGNN
    params: list[torch.nn.Parameter]
    optimiser: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: EMA | None
    origin: str  # where the initial weights came from, said once at the start
    start: int = 0  # the step the run starts (or resumes) at

    @classmethod
    def create(cls, args, device: torch.device, out: Path, ckpt: dict | None,
               resume: Path | None) -> TrainingRun:
        """Seed the global RNG and build the model with the checkpoint's weights when
        resuming, else --init's or its seeded random ones; then the optimiser, schedule,
        scaler and EMA, and, when resuming, their state and the RNG's from ckpt."""
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
        run = cls(args, device, out, model, params, optimiser, scheduler, scaler, ema, origin)
        if ckpt is not None:
            run.optimiser.load_state_dict(ckpt["optimiser"])
            run.scheduler.load_state_dict(ckpt["scheduler"])
            run.scaler.load_state_dict(ckpt["scaler"])
            if run.ema is not None:
                run.ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
            restore_rng(ckpt["rng"])
            run.start = ckpt["step"]
        return run

    def train_step(self, net: torch.nn.Module, lr_img: torch.Tensor, hr_img: torch.Tensor,
                   step: int) -> torch.Tensor:
        """One optimiser step on a batch through net (the model, maybe wrapped): forward
        under --amp's autocast, L1 loss, backward through the gradient scaler, --clip-grad,
        then the schedule and the EMA. Returns the loss; a non-finite one raises
        FloatingPointError before anything is updated."""
        args = self.args
        lr_img = lr_img.to(self.device, non_blocking=True)
        hr_img = hr_img.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, AMP_DTYPES.get(args.amp, torch.float32),
                            enabled=args.amp != "off"):
            sr = net(lr_img)
        loss = F.l1_loss(sr.float(), hr_img)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}; stopping "
                                     f"(last good checkpoint: {self.out / 'last.pt'})")
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if args.clip_grad:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(self.params, args.clip_grad)
        self.scaler.step(self.optimiser)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        return loss

    def eval_model(self) -> torch.nn.Module:
        """The model to validate: the EMA's weights when --ema is on, else the model."""
        if self.ema is None:
            return self.model
        return model_with(self.args, self.ema.state).to(self.device)

    def save(self, step: int) -> None:
        """last.pt (all of the state, to resume from) and model.safetensors (the weights to
        use: the EMA's when --ema is on), each written atomically."""
        ema = self.ema.state if self.ema is not None else None
        save_checkpoint(self.out / "last.pt", model=self.model.state_dict(),
                        optimiser=self.optimiser.state_dict(),
                        scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                        ema=ema, rng=rng_state(), step=step, args=_jsonable(self.args))
        save_model(model_with(self.args, ema if ema is not None else self.model.state_dict()),
                   self.out / "model.safetensors")


# --- records: log.csv, TensorBoard, the progress bar --------------------------------------

class Meter:
    """A logged row's numbers: the loss (averaged over the ranks), the learning rate, and
    the speed since the previous row. Every rank computes them (the average is collective)."""

    def __init__(self, start: int, world: int):
        self.world = world
        self.tic, self.last_step = time.perf_counter(), start

    def row(self, step: int, loss: torch.Tensor, lr: float) -> dict:
        loss = loss.detach()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        now = time.perf_counter()
        row = dict(step=step, loss=loss.item(), lr=lr,
                   it_per_s=(step - self.last_step) / (now - self.tic), seconds=now - self.tic)
        self.tic, self.last_step = now, step
        return row


class RunLog:
    """Rank 0's records of the run: args.json, log.csv (a resumed run drops the rows past
    its checkpoint: they are about to be redone), TensorBoard events when tensorboard is
    installed, and the progress bar. On the other ranks it writes nothing."""

    FIELDS = ["step", "loss", "lr", "it_per_s", "seconds", "val_psnr", "val_ssim"]

    def __init__(self, args, out: Path, resumed: bool, start: int, rank0: bool):
        self.file = self.csv = self.tensorboard = self.bar = None
        if not rank0:
            return
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "args.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(_jsonable(args), indent=2) + "\n"))
        new_log = not resumed or not (out / "log.csv").exists()
        if not new_log:
            with open(out / "log.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
            atomic_write(out / "log.csv", lambda tmp: _write_rows(tmp, self.FIELDS, rows))
        self.file = open(out / "log.csv", "w" if new_log else "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        if new_log:
            self.csv.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(out / "tensorboard")
        except ImportError:
            pass
        if not args.no_progress:
            from tqdm import tqdm
            self.bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.csv.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 **({"psnr": f"{row['val_psnr']:.2f}"}
                                    if "val_psnr" in row else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _write_rows(path, fields, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# --- the schedule, the EMA, validation -----------------------------------------

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


# --- command line -------------------------------------------------------------------------

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


def _jsonable(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list)
                and v and isinstance(v[0], Path) else v) for k, v in vars(args).items()}


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
