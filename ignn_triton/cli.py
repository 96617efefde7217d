"""Command line: `ignn-triton demo` (the README's first command)."""
from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .images import psnr_y, read_image, write_image
from .imresize import imresize
from .model import IGNN

BUNDLED_IMAGE = "astronaut.png"  # 256x256 crop of NASA's public-domain portrait (skimage)


def demo(args: argparse.Namespace) -> int:
    """Downscale the bundled photograph by the model's scale, super-resolve it, write the
    result beside a bicubic upscale and report PSNR (Y) of both against the original."""
    torch.manual_seed(0)
    if args.weights:
        model = load_model(args.weights)
        origin = str(args.weights)
    else:
        model = IGNN(scale=args.scale, n_feats=args.n_feats, n_resblocks=args.n_resblocks).eval()
        origin = (f"randomly initialised IGNN (C={args.n_feats}, {args.n_resblocks} blocks); "
                  "pass --weights for a trained checkpoint")
    scale = model.scale
    with resources.as_file(resources.files("ignn_triton") / "data" / BUNDLED_IMAGE) as path:
        hr = read_image(path)
    hr = hr[..., : hr.shape[2] // scale * scale, : hr.shape[3] // scale * scale]
    lr = imresize(hr, 1 / scale).clamp(0, 1)
    bicubic = imresize(lr, scale).clamp(0, 1)
    start = time.perf_counter()
    with torch.inference_mode():
        sr = model(lr).clamp(0, 1)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_image(lr, out / "lr.png")
    write_image(bicubic, out / f"bicubic_x{scale}.png")
    write_image(sr, out / f"ignn_x{scale}.png")
    print(f"model: {origin}")
    print(f"{tuple(lr.shape[-2:])} -> {tuple(sr.shape[-2:])} x{scale} on cpu in {seconds:.2f} s; "
          f"wrote {out}/ignn_x{scale}.png")
    print(f"PSNR (Y, border {scale}) vs original: bicubic {psnr_y(bicubic, hr, scale):.2f} dB, "
          f"IGNN {psnr_y(sr, hr, scale):.2f} dB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ignn-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="super-resolve the bundled image, compare with bicubic")
    p.add_argument("--weights", type=Path, help="IGNN/EDSR checkpoint (.pth or .safetensors)")
    p.add_argument("--out", default="ignn_demo", help="output folder (default: ignn_demo)")
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--n-feats", type=int, default=32)
    p.add_argument("--n-resblocks", type=int, default=4)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"ignn-triton: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
