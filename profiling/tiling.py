"""How far tiled upscaling is from untiled: PSNR (Y) between the two, per tile size.

Graph aggregation looks for neighbours across the whole (window-limited) image, so a tile
sees fewer candidates than the full image; this measures what that costs.

    python profiling/tiling.py IMAGE... [--weights builtin] [--tiles 32 48 64 96] [--overlap 16]

Writes profiling/results/<date>-tiling.{json,md} (or --out PREFIX).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from ignn_triton.images import quantise, read_image
from ignn_triton.imresize import imresize
from ignn_triton.metrics import psnr_y
from ignn_triton.upscale import Upscaler


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", type=Path, help="HR images (LR made by bicubic)")
    p.add_argument("--weights", default="builtin")
    p.add_argument("--tiles", type=int, nargs="+", default=[32, 48, 64, 96])
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="output prefix (default profiling/results/<date>-tiling)")
    args = p.parse_args(argv)
    up = Upscaler(args.weights, device=args.device)
    S = up.scale
    rows = []
    for path in args.images:
        hr = read_image(path)
        hr = hr[..., : hr.shape[2] // S * S, : hr.shape[3] // S * S]
        lr = quantise(imresize(hr, 1 / S))
        start = time.perf_counter()
        full = up(lr)
        full_s = time.perf_counter() - start
        for tile in args.tiles:
            start = time.perf_counter()
            tiled = up(lr, tile=tile, tile_overlap=args.overlap)
            rows.append(dict(image=path.name, lr_size=list(lr.shape[-2:]), tile=tile,
                             overlap=args.overlap, psnr_tiled_vs_untiled=psnr_y(tiled, full, 0),
                             psnr_untiled_vs_hr=psnr_y(full, hr, S),
                             psnr_tiled_vs_hr=psnr_y(tiled, hr, S),
                             seconds_untiled=full_s, seconds_tiled=time.perf_counter() - start))
            print(f"{path.name} tile {tile}/{args.overlap}: tiled vs untiled "
                  f"{rows[-1]['psnr_tiled_vs_untiled']:.2f} dB; vs HR {rows[-1]['psnr_tiled_vs_hr']:.3f}"
                  f" (untiled {rows[-1]['psnr_untiled_vs_hr']:.3f}) dB", flush=True)
    date = datetime.date.today().isoformat()
    prefix = args.out or Path(__file__).parent / "results" / f"{date}-tiling"
    meta = dict(date=date, weights=args.weights, device=str(up.device), precision=up.precision,
                torch=torch.__version__, scale=S)
    prefix.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [f"# Tiled vs untiled upscaling ({date}, weights {args.weights}, x{S}, "
             f"{up.device} {up.precision}, torch {torch.__version__})", "",
             "PSNR (Y) of the tiled output against the untiled one (no border crop), and of "
             f"both against the HR original (border {S}).", "",
             "| image | LR size | tile / overlap | tiled vs untiled (dB) | untiled vs HR | "
             "tiled vs HR |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image']} | {r['lr_size'][1]}x{r['lr_size'][0]} | {r['tile']} / "
                     f"{r['overlap']} | {r['psnr_tiled_vs_untiled']:.2f} | "
                     f"{r['psnr_untiled_vs_hr']:.3f} | {r['psnr_tiled_vs_hr']:.3f} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {prefix.with_suffix('.md')}")


if __name__ == "__main__":
    main()
