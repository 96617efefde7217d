"""Initial weights from another checkpoint (`ignn-triton train --init`): an IGNN of the same
scale whole, an IGNN of another scale as far as its layers fit, or an EDSR's backbone.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, load_into, read_checkpoint
from .model import IGNN


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
    for src, dst in list(zip(ups_keys, targets)) + [("tail.1", _last_conv(model.scale))]:
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
