"""IGNN and EDSR for spandrel, the model loader of chaiNNer and ComfyUI.

    import spandrel, ignn_triton.spandrel
    ignn_triton.spandrel.install()                       # once; a second call adds nothing
    model = spandrel.ModelLoader().load_from_file("IGNN_x4.pth")  # an ImageModelDescriptor
    sr = model(lr)                                       # (1, 3, H, W) in [0, 1] -> x4

`install()` adds two architectures to spandrel's main registry (or to the registry given):
IGNN (released `.pth` files, x2/x3/x4, `module.` keys; this package's safetensors; bare
state_dicts) and EDSR (the EDSR-PyTorch state_dicts), which spandrel (0.4.2) does not
have; should a later spandrel bring its own EDSR, that one is kept. Nothing happens at
`import ignn_triton`: spandrel is imported by `install()` only.

A state_dict is claimed when its shapes tell the architecture (`checkpoint.identify`) and
its keys are exactly those of a model of that config, so the state_dicts of spandrel's own
architectures are left to them; shapes, dtypes and values are then checked by `load`,
which raises one `CheckpointError` listing every problem. spandrel hands an architecture
the tensors only (a safetensors file's metadata is dropped), so the config is inferred
from the shapes, with the paper's values for what no shape tells (res_scale 0.1, k 5,
window 30): the built-in weights (res_scale 1.0) are recognised by their tensors and get
their own config; for another file of ours with other such settings, use `load_model`.

The descriptors:
- size_requirements: none. The model takes any H, W >= 1 (1x1, 1x2, 2x2, 5x4, 13x1, ...
  checked at every scale): it reflect-pads to what the graph aggregation needs (`IGNN.valid_size`: 14x14
  LR for x2/x4, 21x21 for x3, then multiples of s) and crops the output. Declaring that
  would make spandrel pad with its own padding first, and change the output.
- supports_bfloat16, supports_half: measured with the built-in weights, weights and input
  cast as spandrel's `.to(dtype)` does, on the CPU, on the bundled astronaut (256x256 HR,
  bicubic LR): against fp32, PSNR (Y) 57.0 / 57.6 / 56.8 dB in bf16 and 65.2 / 65.4 /
  65.2 dB in fp16 at x4 / x2 / x3; against the HR image both within 0.03 dB of fp32. The
  largest output of any stage is 430, far below fp16's 65504. EDSR is the same backbone (the
  built-in IGNNs' is the EDSR baseline's config); no trained EDSR weights were at hand.
- tiling: DISCOURAGED. A query's neighbours come from a 30x30 window of son patches
  (about 120 LR pixels across at x2/x4, 180 at x3), so a tile sees fewer candidates and
  tiled output differs from untiled (49.7 to 55.8 dB with 16-pixel overlaps,
  profiling/results/2026-11-24-tiling.md): tile only to fit memory, as `--tile auto` does.
"""
from __future__ import annotations

import torch

from .checkpoint import (BUILTIN, CheckpointError, expected_shapes, identify, read_checkpoint,
                         validate)
from .model import EDSR, IGNN, config_problems

_INSTALL_HINT = 'ignn_triton.spandrel needs spandrel: pip install "ignn-triton[spandrel]"'


def _spandrel():
    try:
        import spandrel
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return spandrel


def detect(arch: str, state: dict) -> bool:
    """Whether state is a state_dict of arch ("IGNN" or "EDSR"): the architecture its shapes
    tell, with exactly the keys of a model of that config."""
    try:
        found, config, state = identify(state)
    except CheckpointError:
        return False
    return (found == arch and not config_problems(arch, config)
            and set(state) == set(expected_shapes(arch, config)))


def _builtin_config(arch: str, config: dict, state: dict) -> dict:
    """The built-in weights' own config when state is one of them, else config."""
    if arch != "IGNN" or config["scale"] not in BUILTIN:
        return config
    _, builtin_config, builtin = read_checkpoint("builtin", scale=config["scale"])
    same = state.keys() == builtin.keys() and all(
        state[key].dtype == value.dtype and torch.equal(state[key].cpu(), value)
        for key, value in builtin.items())
    return builtin_config if same else config


def architectures() -> list:
    """spandrel `ArchSupport`s of IGNN and EDSR (for a registry of your own)."""
    spandrel = _spandrel()

    class Architecture(spandrel.Architecture):
        def __init__(self, module: type[torch.nn.Module]):
            name = module.__name__
            super().__init__(id=name, detect=lambda state: detect(name, state))
            self.module = module

        def load(self, state_dict: dict) -> spandrel.ImageModelDescriptor:
            arch, config, state = identify(state_dict)
            config = _builtin_config(arch, config, state)
            validate("state_dict", arch, config, state)
            return spandrel.ImageModelDescriptor(
                self.module(**config).eval(), state, architecture=self, purpose="SR",
                tags=[f"{config['n_feats']}nf", f"{config['n_resblocks']}nb"],
                supports_half=True, supports_bfloat16=True, scale=config["scale"],
                input_channels=3, output_channels=3,
                size_requirements=spandrel.SizeRequirements(),
                tiling=spandrel.ModelTiling.DISCOURAGED)

    return [spandrel.ArchSupport.from_architecture(Architecture(module))
            for module in (IGNN, EDSR)]


def install(registry=None) -> list:
    """Add IGNN and EDSR to spandrel's main registry (or to `registry`); architectures already
    there (a second call, or a spandrel with its own EDSR) are kept. Returns those added."""
    registry = _spandrel().MAIN_REGISTRY if registry is None else registry
    return registry.add(*architectures(), ignore_duplicates=True)
