"""IGNN against its EDSR backbone on the CPU: how much of the forward-time ratio is
convolution work that IGNN has and EDSR has not.

    python profiling/conv_share.py 128 256            # LR sizes; x4, C = 64, 16 blocks
    python profiling/conv_share.py 128 --threads 1

For each LR size, side by side in one process: the median forward time of IGNN and EDSR
(same C and blocks, random weights, fp32, inference; timed in turn, and the range of the
per-round ratio printed after the table), then one profiled forward of each,
its self CPU time split into convolutions (oneDNN), pixel shuffles and everything else,
and its FLOPs (torch.utils.flop_counter). "Bound" is the ratio IGNN would reach if all of
its non-convolution work cost nothing: its convolutions and pixel shuffles over EDSR's
whole forward. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import ignn_triton

CONV_OPS = {"aten::mkldnn_convolution", "aten::_convolution", "aten::convolution",
            "aten::conv2d", "aten::_slow_conv2d_forward", "aten::thnn_conv2d"}


def paired_ms(models: dict, x, reps: int) -> tuple[dict[str, float], list[float]]:
    """Median forward milliseconds of each model, timed in turn (IGNN, EDSR, IGNN, ...)
    after a warm-up of each, so that drifts of a shared machine hit both alike; and the
    ratio of the first model's time to the second's within each round."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    first, second = times.values()
    return ({name: 1e3 * statistics.median(t) for name, t in times.items()},
            [a / b for a, b in zip(first, second)])


def split_ms(model, x) -> dict[str, float]:
    """Self CPU milliseconds of one forward: {"conv", "shuffle", "other"}."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    out = {"conv": 0.0, "shuffle": 0.0, "other": 0.0}
    for event in prof.key_averages():
        part = ("conv" if event.key in CONV_OPS else
                "shuffle" if event.key == "aten::pixel_shuffle" else "other")
        out[part] += event.self_cpu_time_total / 1e3
    return out


def gflops(model, x) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", type=int, nargs="+", help="LR sizes (square)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-feats", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"IGNN": ignn_triton.IGNN(4, args.n_feats, args.blocks).eval(),
              "EDSR": ignn_triton.EDSR(4, args.n_feats, args.blocks).eval()}
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, x4, C = {args.n_feats}, "
          f"{args.blocks} blocks, fp32\n")
    print("| LR | model | forward ms | conv ms | shuffle ms | other ms | GFLOP |")
    print("|---|---|---|---|---|---|---|")
    spreads = []
    for n in args.sizes:
        x = torch.rand(1, 3, n, n)
        ms, ratios = paired_ms(models, x, args.reps)
        rows = {}
        for name, model in models.items():
            rows[name] = (ms[name], split_ms(model, x), gflops(model, x))
            _, parts, flops = rows[name]
            print(f"| {n}x{n} | {name} | {ms[name]:.0f} | {parts['conv']:.0f} | "
                  f"{parts['shuffle']:.0f} | {parts['other']:.0f} | {flops:.4g} |")
        (a, pa, fa), (b, pb, fb) = rows["IGNN"], rows["EDSR"]
        bound = (pa["conv"] + pa["shuffle"]) / sum(pb.values())
        print(f"| {n}x{n} | IGNN/EDSR | {a / b:.2f} | {pa['conv'] / pb['conv']:.2f} | | "
              f"bound {bound:.2f} | {fa / fb:.2f} |")
        spreads.append(f"{n}x{n}: {min(ratios):.2f} .. {max(ratios):.2f}")
    print(f"\nIGNN/EDSR within each of the {args.reps} rounds: " + "; ".join(spreads))


if __name__ == "__main__":
    main()
