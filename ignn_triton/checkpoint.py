"""Loading released IGNN / EDSR checkpoints and saving this package's own (safetensors).

`load_model` reads three formats and returns a ready model in eval mode, or raises one
`CheckpointError` naming everything that is wrong; a model is never half loaded:
- released IGNN (`torch.save({'net_state_dict': ...})` from DataParallel, `module.` keys);
- a bare state_dict of IGNN or EDSR (the official EDSR-PyTorch files are these);
- this package's safetensors file, whose metadata holds the architecture and config.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .images import atomic_write
from .model import EDSR, IGNN, drop_embedcnn_alias

FORMAT = "ignn_triton"
BUILTIN = "ignn_x4_c64b16.safetensors"  # trained by recipes/builtin_x4.sh; see data/MODEL_CARD.md
_ARCHS = {"IGNN": IGNN, "EDSR": EDSR}


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a model; the message says why."""


def _read(path: Path, map_location) -> tuple[dict, dict | None]:
    """(state_dict, metadata or None) from a safetensors or torch file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        try:
            tensors = load_file(path, device=str(map_location))
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
        return tensors, metadata
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a checkpoint at all
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(obj, dict) and "net_state_dict" in obj:
        obj = obj["net_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (or a dict with 'net_state_dict') "
                              f"of tensors; got {type(obj).__name__}")
    return obj, None


def _strip_prefix(state: dict) -> dict:
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def infer_config(state: dict) -> tuple[str, dict]:
    """Architecture name and constructor arguments from the tensor shapes of a state_dict."""
    def shape(key):
        if key not in state:
            raise CheckpointError(f"not an IGNN or EDSR state_dict: missing '{key}'")
        return state[key].shape

    if any(key.startswith("gcn.") for key in state):
        n_feats = shape("head.0.weight")[0]
        body1 = len({key for key in state if re.match(r"body1\.\d+\.body\.0\.weight$", key)})
        body2 = len({key for key in state if re.match(r"body2\.\d+\.body\.0\.weight$", key)})
        if body1 == 0 or body1 != body2:
            raise CheckpointError(f"IGNN state_dict with {body1} body1 and {body2} body2 blocks; "
                                  "expected the same number in each")
        s = int(round((shape("upsample.0.weight")[0] / n_feats) ** 0.5))
        scale = 4 if "tail.0.0.weight" in state else s
        return "IGNN", dict(scale=scale, n_feats=n_feats, n_resblocks=body1 + body2)
    if "body.0.body.0.weight" in state:
        n_feats = shape("head.0.weight")[0]
        n_resblocks = len([key for key in state if re.match(r"body\.\d+\.body\.0\.weight$", key)])
        ups = [state[key].shape[0] for key in sorted(state)
               if re.match(r"tail\.0\.\d+\.weight$", key)]
        scale = 3 if ups == [9 * n_feats] else 2 ** len(ups)
        res_scale = 0.1 if n_feats > 64 else 1.0  # EDSR-L uses 0.1, the baseline 1.0
        return "EDSR", dict(scale=scale, n_feats=n_feats, n_resblocks=n_resblocks,
                            res_scale=res_scale)
    raise CheckpointError("not an IGNN or EDSR state_dict: found neither 'gcn.*' nor "
                          "'body.0.body.0.weight' keys")


def _check_against(model: torch.nn.Module, state: dict) -> None:
    """One error listing every missing, unexpected, mis-shaped or non-finite tensor."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    for key in sorted(set(expected) & set(state)):
        if expected[key].shape != state[key].shape:
            problems.append(f"{key}: shape {tuple(state[key].shape)}, expected "
                            f"{tuple(expected[key].shape)}")
        elif state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            problems.append(f"{key}: holds NaN or inf")
    if problems:
        raise CheckpointError("checkpoint does not match " + type(model).__name__ + ":\n  "
                              + "\n  ".join(problems))


def builtin_weights() -> Path:
    """The path of the weights shipped in the package (IGNN x4, C = 64, 16 blocks)."""
    path = Path(__file__).parent / "data" / BUILTIN
    if not path.is_file():
        raise CheckpointError(f"{path}: the built-in weights are missing from this install "
                              "(reinstall ignn-triton, or pass a checkpoint path)")
    return path


def read_checkpoint(path, map_location="cpu") -> tuple[str, dict, dict]:
    """(architecture, constructor config, state_dict) of a checkpoint file, or of "builtin";
    the state_dict's keys normalised (no `module.` prefix, no VGG alias)."""
    path = builtin_weights() if isinstance(path, str) and path == "builtin" else Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state, metadata = _read(path, map_location)
    state = _strip_prefix(state)
    drop_embedcnn_alias(state, "")
    if metadata and metadata.get("format") == FORMAT:
        arch = metadata.get("arch")
        if arch not in _ARCHS:
            raise CheckpointError(f"{path}: unknown architecture {arch!r} in metadata")
        return arch, json.loads(metadata["config"]), state
    return (*infer_config(state), state)


def load_into(model: torch.nn.Module, state: dict) -> None:
    """Load state into model, strictly, after one check that names every problem."""
    _check_against(model, state)
    model.load_state_dict(state, strict=True)


def load_model(path, map_location="cpu", **overrides) -> torch.nn.Module:
    """A ready IGNN or EDSR (eval mode) from a checkpoint file, or "builtin" for the
    weights shipped in the package (x4).

    overrides: constructor arguments the weights cannot tell (IGNN's k, window, ...).
    """
    arch, config, state = read_checkpoint(path, map_location)
    model = _ARCHS[arch](**{**config, **overrides})
    load_into(model, state)
    return model.eval().to(map_location)


def save_model(model: torch.nn.Module, path) -> None:
    """Write model as safetensors with its architecture and config in the metadata,
    atomically (a temporary file renamed into place: never a half-written file)."""
    arch = type(model).__name__
    if arch not in _ARCHS:
        raise CheckpointError(f"can only save IGNN or EDSR models; got {arch}")
    path = Path(path)
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": FORMAT, "arch": arch, "config": json.dumps(model.config)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
