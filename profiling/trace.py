"""torch.profiler view of IGNN: where the time goes, stage by stage.

    python profiling/trace.py [--size 128] [--precision bf16] [--out profiling/results]
    python profiling/trace.py --nsys --workload train     (under nsys: see nsys.sh)

Runs two workloads with the stage ranges on (ignn_triton.profiling): (a) inference of
IGNN x4 on a (1, 3, size, size) input, (b) one mixed-precision training step (B = 16,
LR 40x40 on CUDA; smaller on CPU). For each it writes a Chrome trace
(<out>/trace-<workload>.json, open in chrome://tracing or Perfetto) and prints a table of
time per stage, forward and backward (the ignn/<stage>/backward ranges), plus the top
kernels.

With --nsys it runs one workload for `nsys profile --capture-range=cudaProfilerApi`: the
timed steps sit between cudaProfilerStart/Stop, stages (forward and backward) in NVTX
ranges, and the training step under torch.autograd.profiler.emit_nvtx, whose per-op
ranges carry sequence numbers that tie each backward kernel to the forward op it came from.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import ignn_triton
from ignn_triton import profiling

RESULTS = Path(__file__).resolve().parent / "results"


def stage_table(prof, device: str) -> str:
    """Total time per stage, forward (the ignn/<stage> range) and backward (the
    ignn/<stage>/backward range): device time on CUDA, CPU time otherwise."""
    stages = {}  # name -> [forward calls, forward ms, backward ms]
    for event in prof.key_averages():
        if event.key.startswith("ignn/"):
            cuda_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            ms = (cuda_us if device == "cuda" else event.cpu_time_total) / 1e3
            row = stages.setdefault(event.key.removesuffix("/backward"), [0, 0.0, None])
            if event.key.endswith("/backward"):
                row[2] = ms
            else:
                row[:2] = event.count, ms
    rows = sorted(stages.items(), key=lambda item: -(item[1][1] + (item[1][2] or 0.0)))
    unit = "device" if device == "cuda" else "CPU"
    lines = [f"| stage | calls | forward {unit} ms | backward {unit} ms |", "|---|---|---|---|"]
    lines += [f"| {name} | {count} | {fwd:.3f} | " + ("-" if bwd is None else f"{bwd:.3f}") + " |"
              for name, (count, fwd, bwd) in rows]
    return "\n".join(lines)


def run(name: str, fn, device: str, out: Path, steps: int) -> str:
    fn()  # warm-up: compilation, autotuning, cuDNN plans
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"trace-{name}.json"))
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    kernels = prof.key_averages().table(sort_by=sort, row_limit=15)
    return f"## {name} ({steps} steps)\n\n{stage_table(prof, device)}\n\n```\n{kernels}\n```\n"


def run_nsys(name: str, fn, steps: int) -> str:
    """The timed steps inside a cudaProfilerStart/Stop capture range."""
    fn()
    torch.cuda.synchronize()
    with torch.cuda.profiler.profile():
        with torch.autograd.profiler.emit_nvtx(enabled=name.startswith("train")):
            for _ in range(steps):
                fn()
        torch.cuda.synchronize()
    return f"captured {steps} steps of {name}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None, help="LR side for inference")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None)
    parser.add_argument("--n-feats", type=int, default=None)
    parser.add_argument("--n-resblocks", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--nsys", action="store_true",
                        help="capture-range mode for nsys (CUDA only), no torch.profiler")
    parser.add_argument("--workload", choices=("inference", "train", "both"), default="both")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.nsys and not cuda:
        parser.error("--nsys needs a CUDA device")
    size = args.size or (128 if cuda else 32)
    C = args.n_feats or (256 if cuda else 16)
    blocks = args.n_resblocks or (32 if cuda else 2)
    precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    amp = dict(device_type=args.device, dtype=dtype, enabled=dtype != torch.float32)
    torch.manual_seed(0)
    model = ignn_triton.IGNN(scale=4, n_feats=C, n_resblocks=blocks).to(args.device)
    profiling.enable_nvtx()
    x = torch.rand(1, 3, size, size, device=args.device)

    def infer():
        with torch.inference_mode(), torch.autocast(**amp):
            model.eval()(x)

    batch, lr = (16, 40) if cuda else (2, 24)
    xb = torch.rand(batch, 3, lr, lr, device=args.device)
    target = torch.rand(batch, 3, 4 * lr, 4 * lr, device=args.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(args.device, enabled=dtype == torch.float16)

    def train():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            loss = (model(xb).float() - target).abs().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    workloads = {f"inference-{size}": infer, f"train-B{batch}-{lr}": train}
    if args.workload != "both":
        workloads = {k: v for k, v in workloads.items() if k.startswith(args.workload)}
    if args.nsys:
        for name, fn in workloads.items():
            print(run_nsys(name, fn, args.steps))
        return 0
    header = (f"# torch.profiler trace: IGNN x4, C={C}, {blocks} blocks, {precision}, "
              f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if cuda else "") + "\n\n"
              f"torch {torch.__version__}\n\n")
    report = header + "\n".join(run(name, fn, args.device, args.out, args.steps)
                                for name, fn in workloads.items())
    (args.out / "trace.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
