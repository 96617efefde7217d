"""Command line: `ignn-triton demo` (the README's first command), `ignn-triton upscale`
(super-resolve files and folders), `ignn-triton eval` (PSNR/SSIM against HR images) and
`ignn-triton train` (the trainer, `ignn_triton.train`)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .images import (IMAGE_EXTENSIONS, MAX_PIXELS, atomic_write, quantise, read_array,
                     read_image, write_array, write_image)
from .imresize import imresize
from .metrics import psnr_y, ssim_y
from .upscale import MemoryBudgetError, check_tile, peak_memory

BUNDLED_IMAGE = "astronaut.png"  # 256x256 crop of NASA's public-domain portrait (skimage)


def demo(args: argparse.Namespace) -> int:
    """Downscale the bundled photograph by the model's scale, super-resolve it, write the
    result beside a bicubic upscale and report PSNR (Y) of both against the original."""
    model = load_model(args.weights)
    origin = ("built-in weights (IGNN x4, C=64, 16 blocks, trained on CPU; see "
              "ignn_triton/data/MODEL_CARD.md)" if args.weights == "builtin" else args.weights)
    scale = model.scale
    with resources.as_file(resources.files("ignn_triton") / "data" / BUNDLED_IMAGE) as path:
        hr = read_image(path)
    hr = hr[..., : hr.shape[2] // scale * scale, : hr.shape[3] // scale * scale]
    lr = quantise(imresize(hr, 1 / scale))  # the LR image as stored (8 bits)
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
    print(f"PSNR / SSIM (Y, border {scale}) vs original: bicubic "
          f"{psnr_y(bicubic, hr, scale):.2f} dB / {ssim_y(bicubic, hr, scale):.4f}, "
          f"IGNN {psnr_y(sr, hr, scale):.2f} dB / {ssim_y(sr, hr, scale):.4f}")
    return 0



def _collect_inputs(inputs: list[Path]) -> list[Path]:
    """Image files named or found (non-recursively) in the named folders; ValueError for a
    missing path, an unsupported file or a folder with no images."""
    files = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path}: unsupported format {path.suffix or '(no suffix)'!r}; "
                                 f"expected one of {', '.join(IMAGE_EXTENSIONS)}")
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return files


def upscale_cmd(args: argparse.Namespace) -> int:
    """Super-resolve every input image into the output folder; everything is checked
    (inputs readable, outputs distinct and not inputs, checkpoint and scale) before the
    first file is written."""
    from tqdm import tqdm

    from .upscale import Upscaler

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a folder")
    files = _collect_inputs(args.inputs)
    check_tile(args.tile, args.tile_overlap)
    ext = args.ext.lower().lstrip(".") if args.ext else None
    if ext is not None and "." + ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"--ext {args.ext!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
    upscaler = Upscaler(args.weights, device=args.device, precision=args.precision,
                        compile=args.compile)
    if args.scale is not None and args.scale != upscaler.scale:
        raise ValueError(f"--scale {args.scale} is not supported by {args.weights}, which is a "
                         f"x{upscaler.scale} model")
    scale = upscaler.scale
    inputs = {f.resolve() for f in files}
    targets = {}
    for f in files:
        target = out / f"{f.stem}_x{scale}.{ext or f.suffix.lower().lstrip('.')}"
        if target.resolve() in inputs:
            raise ValueError(f"{target}: output would overwrite an input file; choose another "
                             "output folder")
        if target.resolve() in {t.resolve() for t in targets.values()}:
            raise ValueError(f"{target}: two inputs would write the same output file")
        targets[f] = target
    plans = {}
    for f in files:  # every file and its memory plan first: nothing is written on a refusal
        array = read_array(f, args.max_pixels)
        if targets[f].suffix.lower() in (".jpg", ".jpeg") and array.ndim == 3 \
                and array.shape[2] == 4:
            raise ValueError(f"{f}: has an alpha channel, which JPEG cannot store; use --ext png")
        size = array.shape[:2]
        if size not in plans:
            try:
                plans[size] = upscaler.plan(*size, args.tile, args.tile_overlap,
                                            args.max_memory, args.self_ensemble)
            except MemoryBudgetError as e:
                raise ValueError(f"{f}: {e}") from None
    for size, plan in plans.items():
        print(f"{size[1]}x{size[0]} inputs: {plan.describe()}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for f in tqdm(files, desc="images", unit="image", disable=len(files) == 1):
        array = read_array(f, args.max_pixels)
        start = time.perf_counter()
        if upscaler.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(upscaler.device)
        sr = upscaler(array, tile=plans[array.shape[:2]].tile or 0,
                      tile_overlap=args.tile_overlap, self_ensemble=args.self_ensemble,
                      progress=True, max_memory=args.max_memory)
        seconds = time.perf_counter() - start
        write_array(sr, targets[f])
        plan = upscaler.last_plan
        tqdm.write(f"{f}: {array.shape[1]}x{array.shape[0]} -> {sr.shape[1]}x{sr.shape[0]} in "
                   f"{seconds:.1f} s on {upscaler.device.type} ({upscaler.precision}), "
                   f"{'untiled' if plan.tile is None else f'tile {plan.tile}'}, peak "
                   f"{'RSS' if upscaler.device.type == 'cpu' else 'allocated'} "
                   f"{peak_memory(upscaler.device) / 2 ** 30:.2f} GiB -> {targets[f]}")
    return 0


def parse_tile(text: str):
    """--tile: 'auto', 0 (never tile) or a positive size."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 or a size; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 or a size; got {text!r}")
    return value


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_memory(text: str) -> int:
    """--max-memory: bytes, or a number with K, M, G or T (binary units): 6G, 512M, 1.5G."""
    number, unit = text.strip().upper().rstrip("IB"), ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 6G or 512M; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive size; got {text!r}")
    return int(value)


def _write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)
    atomic_write(path, write)


def eval_cmd(args: argparse.Namespace) -> int:
    """PSNR/SSIM (Y, border S) of bicubic and of the model on every HR image of a folder."""
    from .upscale import Upscaler

    S = args.scale
    hr_files = _collect_inputs([args.hr])
    check_tile(args.tile, args.tile_overlap)
    upscaler = Upscaler(args.weights, device=args.device, precision=args.precision)
    if upscaler.scale != S:
        raise ValueError(f"--scale {S} is not supported by {args.weights}, which is a "
                         f"x{upscaler.scale} model")
    lr_files = {}
    if args.lr is not None:
        lr_files = {p.stem: p for p in _collect_inputs([args.lr])}
        missing = [f.name for f in hr_files if f.stem not in lr_files]
        if missing:
            raise ValueError(f"{args.lr}: no LR image for {', '.join(missing)}")
    rows = []
    for f in hr_files:
        hr = read_image(f)
        hr = hr[..., : hr.shape[2] // S * S, : hr.shape[3] // S * S]
        if hr.numel() == 0:
            raise ValueError(f"{f}: smaller than {S}x{S}")
        if args.lr is not None:
            lr = read_image(lr_files[f.stem])
            if tuple(lr.shape[-2:]) != (hr.shape[2] // S, hr.shape[3] // S):
                raise ValueError(f"{lr_files[f.stem]}: LR is {lr.shape[3]}x{lr.shape[2]}, "
                                 f"expected {hr.shape[3] // S}x{hr.shape[2] // S}")
        else:
            lr = quantise(imresize(hr, 1 / S))  # 8-bit LR, as MATLAB's benchmarks store it
        bicubic = imresize(lr, S).clamp(0, 1)
        sr = upscaler(lr, tile=args.tile, tile_overlap=args.tile_overlap,
                      self_ensemble=args.self_ensemble, max_memory=args.max_memory)
        rows.append(dict(image=f.name, width=hr.shape[3], height=hr.shape[2],
                         bicubic_psnr=psnr_y(bicubic, hr, S), bicubic_ssim=ssim_y(bicubic, hr, S),
                         model_psnr=psnr_y(sr, hr, S), model_ssim=ssim_y(sr, hr, S)))
    keys = ("bicubic_psnr", "bicubic_ssim", "model_psnr", "model_ssim")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    name_w = max(5, *(len(r["image"]) for r in rows))
    print(f"{'image':<{name_w}}  {'bicubic PSNR':>12}  {'SSIM':>6}  {'model PSNR':>10}  {'SSIM':>6}")
    for r in rows + [dict(image="mean", **mean)]:
        print(f"{r['image']:<{name_w}}  {r['bicubic_psnr']:12.4f}  {r['bicubic_ssim']:6.4f}  "
              f"{r['model_psnr']:10.4f}  {r['model_ssim']:6.4f}")
    out = Path(args.out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "width", "height", *keys])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    writer.writerow({"image": "mean", "width": "", "height": "",
                     **{k: repr(v) for k, v in mean.items()}})
    _write_text(out, buf.getvalue())
    summary = dict(scale=S, weights=str(args.weights), images=rows, mean=mean)
    _write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


WEIGHTS_HELP = ("'builtin' (default: the x4 weights shipped in the package) or an IGNN/EDSR "
                "checkpoint (.pth or .safetensors)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="builtin", help=WEIGHTS_HELP)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (default: auto, CUDA when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="default: auto, bf16 on CUDA and fp32 on the CPU")
    p.add_argument("--tile", type=parse_tile, default="auto",
                   help="LR tile size: 'auto' (default: the whole image when its predicted "
                   "peak memory fits --max-memory, else the largest tile that fits), 0 "
                   "(never tile) or a size")
    p.add_argument("--tile-overlap", type=int, default=32,
                   help="tile overlap in LR pixels (default: 32)")
    p.add_argument("--max-memory", type=parse_memory, metavar="SIZE",
                   help="memory budget for --tile auto, e.g. 6G (default: 70%% of the "
                   "available RAM, 85%% of the free GPU memory on CUDA)")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the 8 flip/transpose variants (8x slower)")


def one_line_warnings(prog: str = "ignn-triton") -> None:
    """Print warnings as `prog: warning: message`, not Python's file:line and source."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    one_line_warnings()
    if argv[:1] == ["train"]:  # the trainer owns its (long) argument list
        from .train import main as train_main
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ignn-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="super-resolve the bundled image, compare with bicubic")
    p.add_argument("--weights", default="builtin", help=WEIGHTS_HELP)
    p.add_argument("--out", default="ignn_demo", help="output folder (default: ignn_demo)")
    p.set_defaults(run=demo)
    p = commands.add_parser("upscale", help="super-resolve image files or folders")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--scale", type=int, help="check that the checkpoint has this scale")
    _add_run_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ext", help="output format (png, jpg, ...); default: the input's")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images that declare more pixels, before decoding "
                   f"(default: {MAX_PIXELS}, which admits 12000x12000)")
    p.set_defaults(run=upscale_cmd)
    p = commands.add_parser("eval", help="PSNR/SSIM (Y) of bicubic and the model on HR images")
    p.add_argument("--hr", required=True, type=Path, help="folder of HR images")
    p.add_argument("--lr", type=Path, help="folder of paired LR images (same stems)")
    p.add_argument("--scale", required=True, type=int)
    p.add_argument("--out", type=Path, default=Path("results.csv"),
                   help="CSV file (a .json beside it); default results.csv")
    _add_run_options(p)
    p.set_defaults(run=eval_cmd)
    commands.add_parser("train", help="train IGNN (see `ignn-triton train --help`)")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"ignn-triton: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
