"""How far from the hardware is ignn_triton? One command, GPU or CPU.

    python profiling/bench.py              # CUDA: the issue's shapes; CPU: smaller ones
    python profiling/bench.py --smoke      # tiny shapes, a few seconds (CI runs this)
    python profiling/bench.py --only model --model-shape 64 16 128 256   # IGNN vs EDSR

For each workload it measures, side by side in one run, ours (ignn_triton.ops / modules),
reference/ and torch.compile(reference): median time (triton.testing.do_bench on CUDA,
perf_counter medians on CPU), peak extra memory (torch.cuda.max_memory_allocated), and
achieved FLOP/s or bytes/s against ceilings measured in the same run (a device-to-device
copy, bf16 and fp32 matmuls). Writes profiling/results/<date>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ignn_triton
import ignn_triton.reference as R
from ignn_triton import kernels, ops
from ignn_triton.geometry import graph_geometry

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    workload: str
    shape: str
    dtype: str
    flops: float = 0.0  # useful FLOPs of the operation
    bytes: float = 0.0  # minimal bytes: inputs read once, outputs written once
    ms: dict = field(default_factory=dict)  # variant -> median milliseconds (or error text)
    peak_mb: dict = field(default_factory=dict)  # variant -> peak extra MiB


class Bench:
    def __init__(self, device: str, quick: bool):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.quick = quick
        self.rows: list[Row] = []
        self.subset: list[str] = []  # the --only workloads, named in the results file
        self.out_dir: Path | None = None
        self.ceilings: dict = {}

    def time_ms(self, fn) -> float:
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10 if self.quick else 25,
                                           rep=20 if self.quick else 100, return_mode="median")
        fn()
        times = []
        for _ in range(3 if self.quick else 7):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_mb(self, fn) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

    def measure(self, row: Row, variants: dict) -> None:
        for name, fn in variants.items():
            if fn is None:  # torch.compile switched off (--smoke), or a CUDA-only variant
                continue
            try:
                fn()  # first call: compile / autotune outside the timing
                row.ms[name] = self.time_ms(fn)
                row.peak_mb[name] = self.peak_mb(fn)
            except Exception as e:  # a variant that cannot run is reported, not fatal
                row.ms[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if self.cuda:
                torch.cuda.empty_cache()
        self.rows.append(row)
        print(format_row(row, self.ceilings), flush=True)
        if self.out_dir is not None:  # rewrite after every row: a cut-off run keeps its rows
            write_results(self, self.out_dir)

    def measure_ceilings(self) -> None:
        """Copy bandwidth (bytes read + written) and matmul rates, in this run."""
        n = (1 << 28) if self.cuda and not self.quick else (1 << 22)
        src = torch.empty(n, dtype=torch.float32, device=self.device)
        dst = torch.empty_like(src)
        self.ceilings["copy_GBps"] = 2 * src.numel() * 4 / self.time_ms(lambda: dst.copy_(src)) / 1e6
        size = 8192 if self.cuda and not self.quick else 512
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a = torch.randn(size, size, device=self.device, dtype=dtype)
            b = torch.randn(size, size, device=self.device, dtype=dtype)
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 = the FMA rate
            self.ceilings[f"{name}_TFLOPs"] = 2 * size ** 3 / self.time_ms(lambda: a @ b) / 1e9
        self.ceilings["fp16_TFLOPs"] = self.ceilings["bf16_TFLOPs"]
        print("ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in self.ceilings.items()))


COMPILE = True  # torch.compile(reference) columns; off for --smoke and --no-compile


def compiled(fn):
    return torch.compile(fn, dynamic=False) if COMPILE else None


def bench_matching(b: Bench, E: int, H: int, W: int, s: int, k: int, window: int) -> None:
    geo = graph_geometry(H, W, s, window=window)
    for dname, dtype in DTYPES.items():
        if not b.cuda and dtype != torch.float32:
            continue
        g = torch.Generator(device=b.device).manual_seed(0)
        ye = torch.randn(1, E, H, W, device=b.device, dtype=dtype, generator=g)
        xe = torch.randn(1, E, H // s, W // s, device=b.device, dtype=dtype, generator=g)
        elt = ye.element_size()
        shape = f"E={E} LR {H}x{W} s={s} k={k} w={window}"
        flops = 2 * geo.num_queries * geo.num_candidates * geo.patch ** 2 * E
        out_bytes = geo.num_queries * k * (4 + 8)
        whole = None  # on CUDA: the kernel with one program per query block, no split scan
        if b.cuda:
            pk = importlib.import_module("ignn_triton.kernels.patch_knn")
            cfg = pk.default_knn_config(E, k, dtype)
            shape += f" splits={pk.launch_splits(geo, cfg, 1, b.device, dtype)}"
            cfg = dataclasses.replace(cfg, splits=1)
            whole = lambda: kernels.patch_knn(ye, xe, k, s, window, config=cfg)  # noqa: E731
        row = Row("patch_knn", shape, dname, flops=flops,
                  bytes=(ye.numel() + xe.numel()) * elt + out_bytes)
        ref_compiled = compiled(R.patch_knn)
        b.measure(row, {
            "ours": lambda: ops.patch_knn(ye, xe, k, s, window),
            "ours_splits1": whole,
            "reference": lambda: R.patch_knn(ye, xe, k, s, window),
            "compiled_ref": ref_compiled and (lambda: ref_compiled(ye, xe, k, s, window)),
        })
        _, idx = ops.patch_knn(ye, xe, k, s, window)
        row = Row("edge_features", shape, dname,
                  bytes=(ye.numel() + xe.numel()) * elt + idx.numel() * 8 + idx.numel() * E * elt)
        ref_compiled = compiled(R.edge_features)
        b.measure(row, {
            "ours": lambda: ops.edge_features(ye, xe, idx, s),
            "reference": lambda: R.edge_features(ye, xe, idx),
            "compiled_ref": ref_compiled and (lambda: ref_compiled(ye, xe, idx)),
        })


def _ga_case(b: Bench, C: int, H: int, W: int, scale: int, dtype, batch: int = 1):
    torch.manual_seed(0)
    model = ignn_triton.IGNN(scale=scale, n_feats=C, n_resblocks=2).to(b.device)
    gcn = model.gcn.to(dtype)
    s = model.graph_scale
    x = torch.rand(batch, 3, H, W, device=b.device)
    with torch.no_grad():
        ye = model.vggnet(x).to(dtype)
        xe = model.vggnet(ignn_triton.imresize(x, 1 / s).clamp(0, 1)).to(dtype)
    feat = torch.randn(batch, C, H, W, device=b.device, dtype=dtype)
    return gcn, s, ye, xe, feat


def bench_graph_aggregation(b: Bench, C: int, H: int, W: int, scale: int, batch: int = 1,
                            dtypes=("fp32", "bf16")) -> None:
    for dname in dtypes:
        dtype = DTYPES[dname]
        if not b.cuda and dtype != torch.float32:
            continue
        gcn, s, ye, xe, feat = _ga_case(b, C, H, W, scale, dtype, batch)

        def reference(f):
            return R.graph_aggregation(f, ye, xe, s, gcn.k, gcn.window, gcn.weightnet_lr,
                                       gcn.weightnet_hr, gcn.knn_downsample)

        ref_compiled = compiled(reference)
        shape = f"B={batch} C={C} LR {H}x{W} s={s}"
        with torch.no_grad():
            b.measure(Row("GA forward", shape, dname), {
                "ours": lambda: gcn(feat, ye, xe),
                "reference": lambda: reference(feat),
                "compiled_ref": ref_compiled and (lambda: ref_compiled(feat)),
            })
        leaf = feat.detach().requires_grad_()

        def train(fn):
            def step():
                lr, hr = fn(leaf)
                (lr.float().sum() + hr.float().sum()).backward()
            return step

        b.measure(Row("GA forward+backward", shape, dname), {
            "ours": train(lambda f: gcn(f, ye, xe)),
            "reference": train(reference),
            "compiled_ref": ref_compiled and train(ref_compiled),
        })


def bench_model(b: Bench, C: int, blocks: int, sizes, scale: int = 4,
                dtypes=("bf16", "fp32")) -> None:
    for dname in dtypes:
        dtype = DTYPES[dname]
        if not b.cuda and dtype != torch.float32:
            continue
        ignn = ignn_triton.IGNN(scale=scale, n_feats=C, n_resblocks=blocks).to(b.device).eval()
        edsr = ignn_triton.EDSR(scale, n_feats=C, n_resblocks=blocks).to(b.device).eval()
        for H, W in sizes:
            x = torch.rand(1, 3, H, W, device=b.device)

            def run(model):
                def forward():
                    with torch.inference_mode(), torch.autocast(b.device.type, dtype,
                                                                enabled=dtype != torch.float32):
                        return model(x)
                return forward

            b.measure(Row(f"model x{scale} forward", f"C={C} {blocks} blocks LR {H}x{W}", dname),
                      {"IGNN (ours)": run(ignn), "EDSR": run(edsr)})


def bench_training(b: Bench, C: int, blocks: int, batch: int, size: int, scale: int = 4) -> None:
    model = ignn_triton.IGNN(scale=scale, n_feats=C, n_resblocks=blocks).to(b.device)
    edsr = ignn_triton.EDSR(scale, n_feats=C, n_resblocks=blocks).to(b.device)
    x = torch.rand(batch, 3, size, size, device=b.device)
    target = torch.rand(batch, 3, scale * size, scale * size, device=b.device)
    amp = torch.bfloat16 if b.cuda else torch.float32

    def step(m):
        def run():
            with torch.autocast(b.device.type, amp, enabled=b.cuda):
                loss = (m(x).float() - target).abs().mean()
            loss.backward()
        return run

    b.measure(Row(f"train step x{scale}", f"B={batch} C={C} {blocks} blocks LR {size}^2",
                  "bf16 amp" if b.cuda else "fp32"),
              {"IGNN (ours)": step(model), "EDSR": step(edsr)})


def format_row(row: Row, ceilings: dict, sep: str = " | ") -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    parts = [f"{row.workload:22s} {row.shape:34s} {row.dtype:8s}"]
    parts += [f"{name} {fmt(ms)} ms" for name, ms in row.ms.items()]
    ours = next(iter(row.ms.values()))
    if isinstance(ours, float):
        for name, ms in list(row.ms.items())[1:]:
            if isinstance(ms, float):
                parts.append(f"x{ms / ours:.1f} vs {name}")
        rate = ceilings.get(f"{row.dtype}_TFLOPs")
        if row.flops and rate:
            floor = row.flops / rate / 1e9
            parts.append(f"{row.flops / ours / 1e9:.3g} TFLOP/s, {ours / floor:.1f}x the "
                         f"compute floor")
        if row.bytes and ceilings.get("copy_GBps"):
            floor = row.bytes / ceilings["copy_GBps"] / 1e6
            parts.append(f"{row.bytes / ours / 1e6:.0f} GB/s, {ours / floor:.1f}x the "
                         f"memory floor")
    peaks = {k: v for k, v in row.peak_mb.items() if v is not None}
    if peaks:
        parts.append("peak MiB " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    return sep.join(parts)


def render_markdown(data: dict) -> str:
    """The results table of a bench JSON file."""
    meta, ceilings = data["meta"], data["ceilings"]
    lines = [f"# bench {meta['date']} on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
             f"driver {meta['driver']}", "",
             "ceilings measured in the same run: "
             + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()), "",
             "| workload | shape | dtype | result (medians; ratios are the other variant's "
             "time over ours) |", "|---|---|---|---|"]
    for fields in data["rows"]:
        row = Row(**fields)
        result = format_row(row, ceilings, sep="; ").split("; ", 1)[1]
        lines.append(f"| {row.workload} | {row.shape} | {row.dtype} | {result} |")
    return "\n".join(lines) + "\n"


def write_results(b: Bench, out_dir: Path) -> Path:
    device_name = torch.cuda.get_device_name(b.device) if b.cuda else platform.processor() or "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "date": datetime.date.today().isoformat(), "device": device_name,
        "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": sys.version.split()[0], "quick": b.quick,
        "driver": _driver() if b.cuda else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"{meta['date']}-{device_name.replace(' ', '_')}" + ("-smoke" if b.quick else "")
            + "".join(f"-{name}" for name in b.subset))
    data = {"meta": meta, "ceilings": b.ceilings, "rows": [r.__dict__ for r in b.rows]}
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"{stem}.md").write_text(render_markdown(data))
    return out_dir / f"{stem}.md"


def _driver() -> str | None:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: matching ga model train")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile(reference) columns")
    parser.add_argument("--render", type=Path, help="only rewrite the .md of a results .json")
    parser.add_argument("--model-shape", type=int, nargs="+", metavar="N",
                        help="the model workload's width, blocks and LR sizes: C BLOCKS SIZE "
                             "[SIZE ...] (square inputs)")
    args = parser.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(render_markdown(json.loads(args.render.read_text())))
        return 0
    global COMPILE
    COMPILE = not (args.smoke or args.no_compile)
    b = Bench(args.device, quick=args.smoke)
    if b.cuda:  # fixed shapes: let cuDNN time its algorithms, as a deployment would
        torch.backends.cudnn.benchmark = True
    wanted = set(args.only or ["matching", "ga", "model", "train"])
    b.subset = sorted(args.only or [])
    b.out_dir = args.out
    b.measure_ceilings()
    if args.smoke:
        shapes = dict(matching=[(8, 16, 16, 2, 3, 4)], ga=[(8, 16, 16, 4)],
                      model=(8, 2, [(12, 12)]), train=(8, 2, 2, 12))
    elif b.cuda:
        shapes = dict(matching=[(64, 256, 256, 2, 5, 30), (64, 128, 128, 2, 5, 30)],
                      ga=[(256, 128, 128, 4), (256, 256, 256, 4), (256, 40, 40, 4, 16)],
                      model=(256, 32, [(128, 128), (256, 256), (270, 480)]),
                      train=(256, 32, 16, 40))
    else:
        shapes = dict(matching=[(16, 48, 48, 2, 5, 10)], ga=[(16, 32, 32, 4)],
                      model=(32, 4, [(32, 32)]), train=(16, 2, 2, 24))
    if "matching" in wanted:
        for case in shapes["matching"]:
            bench_matching(b, *case)
    if "ga" in wanted:
        for case in shapes["ga"]:
            bench_graph_aggregation(b, *case)
    if args.model_shape:
        if len(args.model_shape) < 3:
            parser.error("--model-shape needs C BLOCKS SIZE [SIZE ...]")
        C, blocks, *sides = args.model_shape
        shapes["model"] = (C, blocks, [(n, n) for n in sides])
    if "model" in wanted:
        C, blocks, sizes = shapes["model"]
        bench_model(b, C, blocks, sizes)
    if "train" in wanted:
        bench_training(b, *shapes["train"])
    print(f"wrote {write_results(b, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
