"""The model's CPU outputs against outputs saved by an earlier version of the code: a
reorganisation must leave them bit-identical. The built-in weights at x2, x3 and x4, and a
small random IGNN with a narrow window, at sizes that take the padding paths.

    python tests/test_saved_outputs.py     # rewrite the saved file (only for a change
                                           # that is meant to alter the numbers)
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ignn_triton

SAVED = Path(__file__).parent / "data" / "saved_outputs.safetensors"
# (name, scale, input height, width); "builtin" cases use the shipped weights
CASES = [("builtin", 4, 24, 20), ("builtin", 2, 19, 26), ("builtin", 3, 22, 17),
         ("small", 4, 30, 34), ("small", 2, 15, 33)]


def _model(name: str, scale: int) -> torch.nn.Module:
    if name == "builtin":
        return ignn_triton.load_model("builtin", scale=scale).eval()
    torch.manual_seed(scale)
    return ignn_triton.IGNN(scale=scale, n_feats=8, n_resblocks=2, window=5).eval()


def _output(name: str, scale: int, h: int, w: int) -> torch.Tensor:
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    with torch.no_grad():
        return _model(name, scale)(x)


@pytest.mark.parametrize("name, scale, h, w", CASES)
def test_outputs_equal_the_saved_ones(name, scale, h, w):
    want = load_file(SAVED)[f"{name}_x{scale}_{h}x{w}"]
    got = _output(name, scale, h, w)
    assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():.3g}"


if __name__ == "__main__":
    save_file({f"{n}_x{s}_{h}x{w}": _output(n, s, h, w).contiguous() for n, s, h, w in CASES},
              SAVED)
    print(f"wrote {SAVED}")
