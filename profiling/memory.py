"""Peak memory of the graph aggregation block, predicted without a GPU.

    python profiling/memory.py                 # the bench's GA shapes, ours vs reference/
    python profiling/memory.py --json out.json

Runs the GA block (ours and reference/) on fake tensors (FakeTensorMode: shapes, dtypes
and strides, no data, no compute) and replays the allocations: every storage an operator
creates is counted from its creation until its last reference dies, rounded up to 512
bytes like the CUDA caching allocator. The peak of that count is what
torch.cuda.max_memory_allocated() reports above the inputs, except for

* workspaces that libraries allocate inside one call (cuDNN, cuBLAS, torch.topk's sort)
  and our kernels' launcher temporaries (patch_knn's packed embeddings): not visible here;
* allocator fragmentation and caching.

Checked against the H100 measurements of 2026-11-24 (profiling/results/*ga-model-train*):
the prediction for our block's forward (before the ECN ran per rank) was 4-9% under the
measured peak at all six shapes, the reference's 11-23% under (its topk and matmul
workspaces), so the predicted ratio ours / reference errs on the high side; for forward +
backward, 1-7% under for ours and 0-5% for the reference. The same ops run here as on CUDA:
the custom ops' fake implementations give the CUDA kernels' output shapes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ignn_triton.reference as R
from ignn_triton.memory import LiveBytes, peak_bytes  # noqa: F401 (LiveBytes: re-exported)
from ignn_triton.modules import GraphAggregation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The bench's GA shapes on CUDA (x4, so graph scale s = 2): (C, H, W, s, batch)
GA_SHAPES = [(256, 128, 128, 2, 1), (256, 256, 256, 2, 1), (256, 40, 40, 2, 16)]
def graph_aggregation_peaks(C: int, H: int, W: int, scale: int = 2, batch: int = 1,
                            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Predicted peak MiB of the GA block's forward (no grad) and forward + backward, ours
    (forward + backward also with GraphAggregation.checkpoint) and reference/, at the
    bench's setting (random F, embeddings of the given size)."""
    gcn = GraphAggregation(C, scale).to(dtype)
    s = scale
    fake = FakeTensorMode()
    with fake:
        for module in gcn.modules():  # fake copies of the parameters: no data
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype), p.requires_grad))
        ye = torch.empty(batch, 64, H, W, dtype=dtype)
        xe = torch.empty(batch, 64, H // s, W // s, dtype=dtype)
        feat = torch.empty(batch, C, H, W, dtype=dtype)
        leaf = feat.clone().requires_grad_()

    def ours(f):
        return gcn(f, ye, xe)

    def reference(f):
        return R.graph_aggregation(f, ye, xe, s, gcn.k, gcn.window, gcn.weightnet_lr,
                                   gcn.weightnet_hr, gcn.knn_downsample)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(feat)
        return run

    def train(fn):
        def run():
            lr, hr = fn(leaf)
            (lr.float().sum() + hr.float().sum()).backward()
        return run

    out = {}
    with fake:
        for name, fn in (("ours", ours), ("reference", reference)):
            inputs = (gcn, ye, xe, feat, leaf)
            out[f"forward_{name}"] = peak_bytes(forward(fn), inputs) / 2 ** 20
            out[f"forward_backward_{name}"] = peak_bytes(train(fn), inputs) / 2 ** 20
            if name == "ours":
                gcn.checkpoint = True
                out["forward_backward_ours_checkpoint"] = peak_bytes(train(fn), inputs) / 2 ** 20
                gcn.checkpoint = False
            for p in gcn.parameters():
                p.grad = None
            leaf.grad = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="*", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print("| shape | dtype | forward MiB ours / ref | ratio | fwd+bwd MiB ours / ref | ratio "
          "| fwd+bwd, checkpoint | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for C, H, W, s, batch in GA_SHAPES:
        for dname in args.dtype:
            p = graph_aggregation_peaks(C, H, W, s, batch, DTYPES[dname])
            shape = f"B={batch} C={C} LR {H}x{W} s={s}"
            rows.append({"shape": shape, "dtype": dname, **p})
            fo, fr = p["forward_ours"], p["forward_reference"]
            to, tr = p["forward_backward_ours"], p["forward_backward_reference"]
            tc = p["forward_backward_ours_checkpoint"]
            print(f"| {shape} | {dname} | {fo:.0f} / {fr:.0f} | {fo / fr:.3f} "
                  f"| {to:.0f} / {tr:.0f} | {to / tr:.3f} | {tc:.0f} | {tc / tr:.3f} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
