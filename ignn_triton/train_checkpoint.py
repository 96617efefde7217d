"""The trainer's checkpoint, `last.pt`: the model a run's arguments build, saving the full
training state, and loading it checked in full against the arguments of the run that
resumes it (one CheckpointError listing every problem) before anything is restored.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .atomic import atomic_write
from .checkpoint import (CheckpointError, is_safetensors, is_training_checkpoint,
                         load_torch_file, state_problems)
from .model import IGNN

# Arguments a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("scale", "n_feats", "n_resblocks", "res_scale", "k", "window", "crop", "batch",
               "seed", "lr", "schedule", "milestones", "gamma", "warmup", "amp", "ema",
               "clip_grad", "rgb_permute")


def build_model(args) -> IGNN:
    """The IGNN the run's arguments describe, initialised from the global RNG."""
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


def rng_state() -> dict:
    """torch's generators (the data stream needs none: it is a function of seed and step)."""
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the generators to what `rng_state` saved (CUDA's where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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
