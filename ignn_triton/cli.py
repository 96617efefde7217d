"""Command line: `ignn-triton demo` (the README's first command), `ignn-triton upscale`
(super-resolve files and folders), `ignn-triton eval` (PSNR/SSIM against HR images) and
`ignn-triton train` (the trainer, `ignn_triton.train`)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from . import __version__
from .atomic import atomic_write
from .checkpoint import CheckpointError, load_model
from .images import (IMAGE_EXTENSIONS, MAX_PIXELS, image_size, quantise, read_array,
                     read_image, write_array, write_image)
from .imresize import imresize
from .metrics import psnr_y, ssim_y
from .upscale import MemoryBudgetError, check_tile, peak_memory

BUNDLED_IMAGE = "astronaut.png"  # 256x256 crop of NASA's public-domain portrait (skimage)


def demo(args: argparse.Namespace) -> int:
    """Downscale the bundled photograph by the model's scale, super-resolve it, write the
    result beside a bicubic upscale and report PSNR (Y) of both against the original."""
    builtin = args.weights == "builtin"
    model = load_model(args.weights, **({"scale": args.scale} if builtin and args.scale else {}))
    scale = model.scale
    if args.scale is not None and args.scale != scale:
        raise ValueError(f"--scale {args.scale}: {args.weights} is a x{scale} model")
    origin = (f"built-in weights (IGNN x{scale}, C=64, 16 blocks, trained on CPU; see "
              "ignn_triton/data/MODEL_CARD.md)" if builtin else args.weights)
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



_OUTPUT_NAME = re.compile(r"(.+)_x[234]$")  # <stem>_x<S>: how upscale names its outputs


def _collect_inputs(inputs: list[Path], recursive: bool = False,
                    notes: list[str] | None = None) -> list[tuple[Path, Path]]:
    """(image file, its folder relative to the named folder) for every file named and every
    image found in the named folders (their sub-folders too with recursive). Skipped, and
    said in `notes`: hidden files (a killed run's temporaries), files of other types, and
    our own outputs (`_is_our_output`). ValueError for a missing path, an unsupported file
    or a folder with no images."""
    files = []
    for path in inputs:
        if path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{path}: unsupported format {path.suffix or '(no suffix)'!r}; "
                                 f"expected one of {', '.join(IMAGE_EXTENSIONS)}")
            files.append((path, Path()))
            continue
        if not path.is_dir():
            raise ValueError(f"{path}: no such file or folder")
        found, others, ours = [], [], []
        candidates = sorted(path.rglob("*") if recursive else path.iterdir())
        for p in candidates:
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                others.append(p)
            else:
                found.append(p)
        stems = {(p.parent, p.stem): p for p in found}
        for p in found:
            if _is_our_output(p, stems):
                ours.append(p)
            else:
                files.append((p, p.parent.relative_to(path)))
        if notes is not None and others:
            notes.append(f"{path}: skipped {len(others)} file(s) that are not images "
                         f"({_names(others)})")
        if notes is not None and ours:
            notes.append(f"{path}: skipped {len(ours)} earlier output(s) of upscale "
                         f"({_names(ours)})")
        if not found:
            raise ValueError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _is_our_output(path: Path, stems: dict) -> bool:
    """Whether path is `<stem>_x<S>.*` beside a `<stem>.*` that it is S times larger than:
    what an earlier run of upscale into this folder wrote."""
    match = _OUTPUT_NAME.fullmatch(path.stem)
    source = stems.get((path.parent, match.group(1))) if match else None
    if source is None:
        return False
    S = int(path.stem[-1])
    try:
        (h, w), (sh, sw) = image_size(source), image_size(path)
    except ValueError:
        return False
    return (sh, sw) == (S * h, S * w)


def _names(paths: list[Path], most: int = 3) -> str:
    return ", ".join(p.name for p in paths[:most]) + (", ..." if len(paths) > most else "")


def _targets(files: list[tuple[Path, Path]], out: Path, scale: int, ext: str | None,
             single_file: bool) -> dict[Path, Path]:
    """Output path of every input: OUT itself for one input file and an OUT with an image
    suffix, else OUT/<relative folder>/<stem>_x<S>.<ext>; ValueError if an output would
    overwrite an input or two inputs would write the same file (one pass, hashed)."""
    inputs = {f.resolve() for f, _ in files}
    targets, seen = {}, {}
    for f, folder in files:
        if single_file:
            target = out
        else:
            target = out / folder / f"{f.stem}_x{scale}.{ext or f.suffix.lower().lstrip('.')}"
        key = target.resolve()
        if key in inputs:
            raise ValueError(f"{target}: output would overwrite an input file; choose another "
                             "output folder")
        if key in seen:
            raise ValueError(f"{target}: two inputs ({seen[key]}, {f}) would write the same "
                             "output file")
        seen[key] = f
        targets[f] = target
    return targets


def _save_options(source: Path, target: Path, quality: int | None) -> dict:
    """Pillow save options for a JPEG or WebP output: --quality, else for a JPEG input its
    own quantisation tables (the input's quality, exactly), else quality 95."""
    if target.suffix.lower() not in (".jpg", ".jpeg", ".webp"):
        return {}
    if quality is not None:
        return {"quality": quality}
    if target.suffix.lower() != ".webp":
        try:
            with Image.open(source) as img:
                if img.format == "JPEG" and getattr(img, "quantization", None):
                    return {"qtables": img.quantization}
        except OSError:
            pass
    return {"quality": 95}


def upscale_cmd(args: argparse.Namespace) -> int:
    """Super-resolve every input image into the output folder (or file); everything is
    checked (inputs readable, outputs distinct and not inputs, checkpoint and scale, the
    memory plan) before the first file is written."""
    from tqdm import tqdm

    from .upscale import Upscaler

    out = Path(args.out)
    notes = []
    files = _collect_inputs(args.inputs, args.recursive, notes)
    single_file = (len(args.inputs) == 1 and args.inputs[0].is_file()
                   and out.suffix.lower() in IMAGE_EXTENSIONS and not out.is_dir())
    if single_file and args.ext and "." + args.ext.lower().lstrip(".") != out.suffix.lower():
        raise ValueError(f"--ext {args.ext} disagrees with the output file's suffix {out.suffix}")
    if not single_file and out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a folder")
    check_tile(args.tile, args.tile_overlap)
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be in [1, 100]; got {args.quality}")
    ext = args.ext.lower().lstrip(".") if args.ext else None
    if ext is not None and "." + ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"--ext {args.ext!r} is not one of {', '.join(IMAGE_EXTENSIONS)}")
    upscaler = Upscaler(args.weights, device=args.device, precision=args.precision,
                        compile=args.compile, scale=args.scale)
    targets = _targets(files, out, upscaler.scale, ext, single_file)
    if args.skip_existing:
        done = [f for f, _ in files if targets[f].exists()]
        if done:
            notes.append(f"skipped {len(done)} input(s) whose output exists (--skip-existing)")
        files = [(f, folder) for f, folder in files if not targets[f].exists()]
    for note in notes:
        print(f"ignn-triton: {note}", file=sys.stderr)
    plans = {}
    for f, _ in files:  # every file and its memory plan first: nothing is written on a refusal
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
    for f, folder in tqdm(files, desc="images", unit="image", disable=len(files) < 2):
        array = read_array(f, args.max_pixels)
        start = time.perf_counter()
        if upscaler.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(upscaler.device)
        sr = upscaler(array, tile=plans[array.shape[:2]].tile or 0,
                      tile_overlap=args.tile_overlap, self_ensemble=args.self_ensemble,
                      progress=True, max_memory=args.max_memory)
        seconds = time.perf_counter() - start
        targets[f].parent.mkdir(parents=True, exist_ok=True)
        write_array(sr, targets[f], **_save_options(f, targets[f], args.quality))
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
        raise argparse.ArgumentTypeError(
            f"expected a size such as 6G or 512M; got {text!r}") from None
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
    hr_files = [f for f, _ in _collect_inputs([args.hr])]
    check_tile(args.tile, args.tile_overlap)
    out = Path(args.out)
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out}: exists and is not a file")
    upscaler = Upscaler(args.weights, device=args.device, precision=args.precision, scale=S)
    lr_files = {}
    if args.lr_data is not None:
        lr_files = {p.stem: p for p, _ in _collect_inputs([args.lr_data])}
        missing = [f.name for f in hr_files if f.stem not in lr_files]
        if missing:
            raise ValueError(f"{args.lr_data}: no LR image for {', '.join(missing)}")
    for f in hr_files:  # every size first: nothing is computed for a run that cannot finish
        h, w = image_size(f)
        if h < S or w < S:
            raise ValueError(f"{f}: {w}x{h} is smaller than {S}x{S}")
        if h % S or w % S:
            print(f"ignn-triton: {f}: {w}x{h} is cropped to {w // S * S}x{h // S * S} (a "
                  f"multiple of the scale {S})", file=sys.stderr)
        if args.lr_data is not None:
            lh, lw = image_size(lr_files[f.stem])
            if (lh, lw) != (h // S, w // S):
                raise ValueError(f"{lr_files[f.stem]}: LR is {lw}x{lh}, expected "
                                 f"{w // S}x{h // S}")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in hr_files:
        hr = read_image(f)
        hr = hr[..., : hr.shape[2] // S * S, : hr.shape[3] // S * S]
        if args.lr_data is not None:
            lr = read_image(lr_files[f.stem])
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


WEIGHTS_HELP = ("'builtin' (default: the weights shipped in the package for --scale, x2, x3 "
                "or x4) or an IGNN/EDSR checkpoint (.pth, .safetensors, a trainer's last.pt)")
SCALE_HELP = ("the built-in model's scale (default: 4); with --weights PATH, checked against "
              "the checkpoint's")


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
    parser = argparse.ArgumentParser(prog="ignn-triton", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"ignn-triton {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", allow_abbrev=False,
                            help="super-resolve the bundled image, compare with bicubic")
    p.add_argument("--weights", default="builtin", help=WEIGHTS_HELP)
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help=SCALE_HELP)
    p.add_argument("--out", default="ignn_demo", help="output folder (default: ignn_demo)")
    p.set_defaults(run=demo)
    p = commands.add_parser("upscale", allow_abbrev=False,
                            help="super-resolve image files or folders")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--out", required=True, type=Path,
                   help="output folder (created), or, for one input file, an image file name")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="also take the images in the sub-folders of input folders (the output "
                   "keeps their layout)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output file already exists")
    p.add_argument("--quality", type=int, metavar="Q",
                   help="JPEG/WebP output quality 1-100 (default: a JPEG input's own "
                   "quantisation tables, else 95)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help=SCALE_HELP)
    _add_run_options(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--ext", help="output format (png, jpg, ...); default: the input's")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images that declare more pixels, before decoding "
                   f"(default: {MAX_PIXELS}, which admits 12000x12000)")
    p.set_defaults(run=upscale_cmd)
    p = commands.add_parser("eval", allow_abbrev=False,
                            help="PSNR/SSIM (Y) of bicubic and the model on HR images")
    p.add_argument("--hr", required=True, type=Path, help="folder of HR images")
    p.add_argument("--lr-data", type=Path,
                   help="folder of paired LR images, same stems (default: MATLAB bicubic of "
                   "the HR images, rounded to 8 bits)")
    p.add_argument("--scale", required=True, type=int, choices=(2, 3, 4),
                   help="the scale to evaluate (picks the built-in model; checked against "
                   "--weights)")
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
    except KeyboardInterrupt:  # writes are atomic: nothing partial is left behind
        print("ignn-triton: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
