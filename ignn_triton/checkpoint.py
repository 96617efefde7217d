"""Loading released IGNN / EDSR checkpoints and saving this package's own (safetensors).

`load_model` reads these formats and returns a ready model in eval mode:
- released IGNN (`torch.save({'net_state_dict': ...})` from DataParallel, `module.` keys);
- a bare state_dict of IGNN or EDSR (the official EDSR-PyTorch files are these);
- this package's safetensors file, whose metadata holds the architecture and config;
- a training checkpoint of `ignn-triton train` (`last.pt`): its EMA weights when it kept an
  EMA, else its model weights (a warning says which).

Nothing in a file is trusted: the config (from the metadata, or inferred from the tensor
shapes) is checked against the model's limits, and every tensor's name, shape and dtype
against the shapes a model of that config has (computed on the meta device), before any
real model is allocated. Any problem raises one `CheckpointError` that names the file and
lists every problem; a model is never half loaded. Torch files are read with
`torch.load(weights_only=True)`: no code in a file ever runs.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .model import EDSR, IGNN, config_problems, drop_embedcnn_alias

FORMAT = "ignn_triton"
# The weights shipped in the package, by scale: small IGNNs trained on the CPU by
# recipes/builtin_x{2,3,4}.sh (see data/MODEL_CARD.md); load_model("builtin", scale=S).
BUILTIN = {scale: f"ignn_x{scale}_c64b16.safetensors" for scale in (2, 3, 4)}
BUILTIN_DEFAULT_SCALE = 4
_ARCHS = {"IGNN": IGNN, "EDSR": EDSR}
_LISTED = 12  # problems listed in full in one error; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a model; the message says why."""


def _fail(path, what: str, problems: list[str]) -> CheckpointError:
    shown = problems[:_LISTED]
    more = [f"... and {len(problems) - _LISTED} more"] if len(problems) > _LISTED else []
    return CheckpointError(f"{path}: {what}:\n  " + "\n  ".join(shown + more))


# torch.save's legacy (pre-1.6, non-zip) format begins with this pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def load_torch_file(path: Path, map_location="cpu"):
    """torch.load(weights_only=True), its failures turned into one plain explanation
    (never torch's advice to turn weights_only off, which would run code from the file)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not (head.startswith(b"PK\x03\x04") or head == _LEGACY_MAGIC):
        raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a torch "
                              f"file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors and plain containers (code, "
            f"custom classes); such files are not loaded, since loading them could run code "
            f"from the file. Save a state_dict instead") from None
    except Exception as e:  # a truncated or damaged archive
        raise CheckpointError(f"{path}: truncated or corrupt torch file "
                              f"({type(e).__name__})") from None


def is_safetensors(path: Path) -> bool:
    """Whether the file starts like safetensors: a u64 header length, then JSON."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read(path: Path, map_location) -> tuple[object, dict | None]:
    """(object, safetensors metadata or None) from a safetensors or torch file."""
    if is_safetensors(path):
        try:
            tensors = load_file(path, device=str(map_location))
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
        return tensors, metadata
    return load_torch_file(path, map_location), None


def is_training_checkpoint(obj) -> bool:
    """Whether obj looks like a `last.pt` of ignn-triton train (checked in full by the trainer)."""
    return isinstance(obj, dict) and {"model", "args", "step"} <= set(obj)


def _unwrap(path: Path, obj) -> tuple[dict, dict | None]:
    """(state_dict, config or None) out of whatever a torch file held."""
    config = None
    if is_training_checkpoint(obj):
        ema = obj.get("ema")
        args = obj["args"] if isinstance(obj["args"], dict) else {}
        which = "EMA weights" if ema is not None else "model weights (it kept no EMA)"
        warnings.warn(f"{path}: a training checkpoint of ignn-triton train (step "
                      f"{obj['step']!r}); loading its {which}. The run folder's "
                      f"model.safetensors holds the same weights", stacklevel=5)
        config = {key: args.get(key) for key in ("scale", "n_feats", "n_resblocks",
                                                   "res_scale", "k", "window")}
        config.update(patch_size=3, stride=2)  # the trainer's IGNN always uses these
        obj = ema if ema is not None else obj["model"]
    elif isinstance(obj, dict) and "net_state_dict" in obj:
        obj = obj["net_state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a state_dict (or a dict with "
                              f"'net_state_dict') of tensors; got {_describe(obj)}")
    bad = [f"{key!r}: {_describe(value)}" for key, value in obj.items()
           if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise _fail(path, "expected a state_dict of tensors, but some entries are not tensors",
                    bad)
    return obj, config


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {', '.join(map(repr, list(obj)[:6]))}" if obj else "an empty dict"
    return type(obj).__name__


def _strip_prefix(state: dict) -> dict:
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def _normalised(state: dict) -> dict:
    """A new dict of state without the `module.` prefix and the VGG alias."""
    state = dict(_strip_prefix(state))
    drop_embedcnn_alias(state, "")
    return state


def identify(obj, name="state_dict") -> tuple[str, dict, dict]:
    """(architecture, constructor config, state_dict) of a checkpoint already in memory: what
    a torch file held (a released IGNN dict, a bare IGNN or EDSR state_dict, a training
    checkpoint) or a safetensors file's tensors. The config is the training checkpoint's,
    else inferred from the shapes (`infer_config`); keys are normalised in a new dict (obj is
    left as it is). Not validated (`validate`); errors name `name`."""
    state, config = _unwrap(name, obj)
    state = _normalised(state)
    if config is not None:
        return "IGNN", config, state
    try:
        arch, config = infer_config(state)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    return arch, config, state


def _count_blocks(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.body\.0\.weight$")
    return len({m.group(1) for key in state if (m := pattern.match(key))})


def infer_config(state: dict) -> tuple[str, dict]:
    """Architecture name and constructor arguments from the tensor shapes of a state_dict
    (never from a key's mere presence); CheckpointError (without a file name) if the shapes
    tell no consistent story."""
    def shape(key):
        value = state.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    head = shape("head.0.weight")
    if head is None or len(head) != 4 or head[1:] != (3, 3, 3):
        raise CheckpointError(f"not an IGNN or EDSR state_dict: 'head.0.weight' is "
                              f"{head or 'missing'}, expected (C, 3, 3, 3)")
    C = head[0]
    if any(key.startswith("gcn.") for key in state):
        body1, body2 = _count_blocks(state, "body1"), _count_blocks(state, "body2")
        if body1 == 0 or body1 != body2:
            raise CheckpointError(f"IGNN state_dict with {body1} body1 and {body2} body2 "
                                  "blocks; expected the same number in each")
        up = shape("upsample.0.weight")
        s = {(4 * C, C, 3, 3): 2, (9 * C, C, 3, 3): 3}.get(up)
        if s is None:
            raise CheckpointError(f"IGNN 'upsample.0.weight' is {up or 'missing'}; expected "
                                  f"({4 * C} or {9 * C}, {C}, 3, 3) for C = {C}")
        tail0, tail1 = shape("tail.0.0.weight"), shape("tail.1.0.weight")
        if s == 2 and tail0 == (4 * C, C, 3, 3) and tail1 == (3, C, 3, 3):
            scale = 4
        elif tail0 == (3, C, 3, 3) and tail1 is None:
            scale = s
        else:
            raise CheckpointError(
                f"IGNN tail does not fit any scale: 'tail.0.0.weight' {tail0 or 'missing'}, "
                f"'tail.1.0.weight' {tail1 or 'missing'}; expected tail.0.0 (3, {C}, 3, 3) "
                f"alone (x2, x3: the released layout) or tail.0.0 ({4 * C}, {C}, 3, 3) and "
                f"tail.1.0 (3, {C}, 3, 3) (x4)")
        return "IGNN", dict(scale=scale, n_feats=C, n_resblocks=body1 + body2, res_scale=0.1,
                            k=5, patch_size=3, stride=2, window=30)
    if shape("body.0.body.0.weight") is not None:
        ups = [shape(key)[0] for key in sorted(state)
               if re.fullmatch(r"tail\.0\.\d+\.weight", key) and len(shape(key)) == 4]
        scale = {(4 * C,): 2, (9 * C,): 3, (4 * C, 4 * C): 4}.get(tuple(ups))
        if scale is None:
            raise CheckpointError(f"EDSR upsampler convs with {ups} output channels fit no "
                                  f"scale for C = {C}")
        return "EDSR", dict(scale=scale, n_feats=C, n_resblocks=_count_blocks(state, "body"),
                            res_scale=0.1 if C > 64 else 1.0)  # EDSR-L 0.1, baseline 1.0
    raise CheckpointError("not an IGNN or EDSR state_dict: found neither 'gcn.*' nor "
                          "'body.0.body.0.weight' keys")


def expected_shapes(arch: str, config: dict) -> dict[str, tuple]:
    """The state_dict shapes of a model of that config, computed on the meta device
    (nothing allocated); the config must be valid (`config_problems`)."""
    with torch.device("meta"):
        model = _ARCHS[arch](**config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def state_problems(expected: dict[str, tuple], state: dict) -> list[str]:
    """Every missing, unexpected, mis-shaped, non-float or non-finite tensor."""
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
        value = state[key]
        if tuple(value.shape) != expected[key]:
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {expected[key]}")
        elif not value.is_floating_point():
            problems.append(f"{key}: dtype {value.dtype}, expected a floating-point tensor")
        elif value.device.type != "meta" and not torch.isfinite(value).all():
            problems.append(f"{key}: holds NaN or inf")
    return problems


def validate(path, arch: str, config: dict, state: dict) -> None:
    """Raise one CheckpointError naming `path` unless config is valid and state fits it."""
    problems = config_problems(arch, config)
    if problems:
        raise _fail(path, f"invalid {arch} config {config}", problems)
    problems = state_problems(expected_shapes(arch, config), state)
    if problems:
        desc = ", ".join(f"{key} {config[key]}" for key in ("scale", "n_feats", "n_resblocks"))
        raise _fail(path, f"does not match {arch} ({desc})", problems)


def builtin_weights(scale: int = BUILTIN_DEFAULT_SCALE) -> Path:
    """The path of the weights shipped in the package for that scale (IGNN, C = 64, 16
    blocks)."""
    if scale not in BUILTIN:
        raise CheckpointError(f"there are built-in weights for x{', x'.join(map(str, BUILTIN))}"
                              f"; got scale {scale!r}")
    path = Path(__file__).parent / "data" / BUILTIN[scale]
    if not path.is_file():
        raise CheckpointError(f"{path}: the built-in weights are missing from this install "
                              "(reinstall ignn-triton, or pass a checkpoint path)")
    return path


def _metadata_config(path: Path, metadata: dict) -> tuple[str, dict]:
    arch = metadata.get("arch")
    if arch not in _ARCHS:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} in the metadata "
                              f"(expected one of {', '.join(_ARCHS)})")
    try:
        config = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the metadata's config is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the metadata's config must be a JSON object; got "
                              f"{type(config).__name__}")
    return arch, config


def read_checkpoint(path, map_location="cpu", **overrides) -> tuple[str, dict, dict]:
    """(architecture, constructor config, state_dict) of a checkpoint file, or of "builtin"
    (the shipped weights of overrides' `scale`, default 4), validated (`validate`): the
    state_dict fits a model of that config exactly. Keys are normalised (no `module.`
    prefix, no VGG alias). overrides: constructor arguments the weights cannot tell (IGNN's
    k, window, ...), applied before validation."""
    if isinstance(path, str) and path == "builtin":
        path = builtin_weights(overrides.get("scale", BUILTIN_DEFAULT_SCALE))
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj, metadata = _read(path, map_location)
    if metadata and metadata.get("format") == FORMAT:
        arch, config = _metadata_config(path, metadata)
        state = _normalised(obj)
    else:
        arch, config, state = identify(obj, path)
    config = {**config, **overrides}
    validate(path, arch, config, state)
    return arch, config, state


def load_into(model: torch.nn.Module, state: dict) -> None:
    """Load state into model, strictly, after one check that names every problem."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    problems = state_problems(expected, state)
    if problems:
        raise _fail("checkpoint", f"does not match {type(model).__name__}", problems)
    model.load_state_dict(state, strict=True)


def load_model(path, map_location="cpu", **overrides) -> torch.nn.Module:
    """A ready IGNN or EDSR (eval mode) from a checkpoint file, or "builtin" for the
    weights shipped in the package (x4, or `scale=2` / `scale=3`).

    overrides: constructor arguments the weights cannot tell (IGNN's k, window, ...).
    """
    arch, config, state = read_checkpoint(path, map_location, **overrides)
    model = _ARCHS[arch](**config)
    model.load_state_dict(state, strict=True)
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
