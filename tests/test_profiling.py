"""NVTX / record_function stage ranges, and the benchmark script's CPU smoke run."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from ignn_triton import IGNN, profiling

STAGES = {"ignn/embed", "ignn/head", "ignn/body1", "ignn/knn", "ignn/edges", "ignn/ecn",
          "ignn/stats", "ignn/aggregate", "ignn/den", "ignn/fuse", "ignn/body2",
          "ignn/upsample", "ignn/tail"}


def _profiled_names(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            model(x)
    return {event.key for event in prof.key_averages()}


def test_stage_ranges_appear_only_when_enabled():
    model = IGNN(scale=2, n_feats=4, n_resblocks=2, window=4).eval()
    x = torch.rand(1, 3, 16, 16)
    assert not profiling.nvtx_enabled()
    assert not STAGES & _profiled_names(model, x)
    profiling.enable_nvtx()
    try:
        assert STAGES <= _profiled_names(model, x)
    finally:
        profiling.enable_nvtx(False)


def test_compile_fullgraph_with_ranges_on():
    torch.manual_seed(0)
    model = IGNN(scale=2, n_feats=4, n_resblocks=2, window=4).eval()
    x = torch.rand(1, 3, 16, 16)
    profiling.enable_nvtx()
    try:
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x),
                                       rtol=1e-5, atol=1e-5)
    finally:
        profiling.enable_nvtx(False)


def test_bench_smoke_run_writes_results(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "profiling" / "bench.py"), "--smoke", "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True)
    result, = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    workloads = {row["workload"] for row in data["rows"]}
    assert {"patch_knn", "edge_features", "GA forward", "GA forward+backward"} <= workloads
    for row in data["rows"]:
        assert all(isinstance(ms, float) and ms > 0 for ms in row["ms"].values()), row
    assert data["ceilings"]["copy_GBps"] > 0


def test_trace_script_reports_every_stage(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "profiling" / "trace.py"), "--steps", "1",
                    "--size", "16", "--n-feats", "4", "--n-resblocks", "2", "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True)
    report = (tmp_path / "trace.md").read_text()
    for name in STAGES:
        assert f"| {name} |" in report, name
    traces = sorted(p.name for p in tmp_path.glob("trace-*.json"))
    assert traces == ["trace-inference-16.json", "trace-train-B2-24.json"]
    assert json.loads((tmp_path / traces[0]).read_text())["traceEvents"]
