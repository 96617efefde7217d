"""NVTX / record_function stage ranges (forward and backward; modules tagged as stages by
name_stages, blocks by stage()), and the profiling scripts' CPU smoke runs."""
import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ignn_triton import IGNN, profiling

STAGES = {"ignn/embed", "ignn/head", "ignn/body1", "ignn/knn", "ignn/edges", "ignn/ecn",
          "ignn/stats", "ignn/aggregate", "ignn/den", "ignn/fuse", "ignn/body2",
          "ignn/upsample", "ignn/tail"}
# every stage but the matching (embed, knn, edges), which carries no gradient
BACKWARD = {f"{name}/backward" for name in STAGES - {"ignn/embed", "ignn/knn", "ignn/edges"}}


@pytest.fixture
def ranges_on():
    profiling.enable_nvtx()
    yield
    profiling.enable_nvtx(False)


def _tiny():
    torch.manual_seed(0)
    return IGNN(scale=2, n_feats=4, n_resblocks=2, window=4), torch.rand(1, 3, 16, 16)


def _train_step(model, x):
    model(x).square().mean().backward()


def _profiled_names(model, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            model(x)
    return {event.key for event in prof.key_averages()}


def _global_hooks() -> int:
    module = torch.nn.modules.module
    return len(module._global_forward_pre_hooks) + len(module._global_forward_hooks)


def test_stage_ranges_appear_only_when_enabled():
    model = IGNN(scale=2, n_feats=4, n_resblocks=2, window=4).eval()
    x = torch.rand(1, 3, 16, 16)
    assert not profiling.nvtx_enabled()
    hooks = _global_hooks()
    assert not STAGES & _profiled_names(model, x)
    profiling.enable_nvtx()
    profiling.enable_nvtx()  # twice: still one pair of hooks
    try:
        assert _global_hooks() == hooks + 2
        assert STAGES <= _profiled_names(model, x)
    finally:
        profiling.enable_nvtx(False)
    assert _global_hooks() == hooks  # off: not even an empty hook runs


def test_environment_variable_enables_ranges():
    code = ("import torch, ignn_triton\n"
            "model = ignn_triton.IGNN(scale=2, n_feats=4, n_resblocks=2, window=4).eval()\n"
            "with torch.profiler.profile() as prof, torch.no_grad():\n"
            "    model(torch.rand(1, 3, 16, 16))\n"
            "print(sorted({e.key for e in prof.key_averages() if e.key.startswith('ignn/')}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "IGNN_TRITON_NVTX": "1"},
                         check=True, capture_output=True, text=True).stdout
    assert out.splitlines()[-1] == str(sorted(STAGES))


# torch.compile warns that global hooks also fire for its OptimizedModule: untagged, a no-op
@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")
def test_compile_fullgraph_with_ranges_on(ranges_on):
    model, x = _tiny()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # forward and backward: the ranges are skipped while compiling; the gradients match eager's
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).square().mean(), params)
    compiled_grads = torch.autograd.grad(compiled(x).square().mean(), params)
    torch.testing.assert_close(compiled_grads, grads, rtol=1e-4, atol=1e-6)


def test_backward_ranges_hold_each_stage_backward(ranges_on):
    model, x = _tiny()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        _train_step(model, x)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    ranges = [e for e in events if e.name.startswith("ignn/") and e.name.endswith("/backward")]
    calls = {name: sum(e.name == name for e in ranges) for name in BACKWARD}
    # one range per stage call, k = 5 ranks: the ECN runs per rank, then the softmax;
    # ignn/upsample is two modules (the upsampler, fuse_up)
    assert calls == {**dict.fromkeys(BACKWARD, 1), "ignn/aggregate/backward": 6,
                     "ignn/ecn/backward": 6, "ignn/den/backward": 5,
                     "ignn/upsample/backward": 2}
    for a, b in zip(ranges, ranges[1:]):  # each closed before the next opens
        assert a.time_range.start < a.time_range.end <= b.time_range.start, (a.name, b.name)

    def stage_of(event):
        return [r.name for r in ranges if r.time_range.start <= event.time_range.start
                and event.time_range.end <= r.time_range.end]

    convs = [e for e in events if e.name == "aten::convolution_backward"]
    # every convolution is in a stage but the glue after the tail: add_mean, a 1x1 on RGB
    outside, = [e for e in convs if not stage_of(e)]
    assert outside.input_shapes[2] == [3, 3, 1, 1]  # (grad, input, weight, ...)
    assert all(len(stage_of(e)) == 1 for e in convs if e is not outside)
    assert sum(stage_of(e) == ["ignn/body2/backward"] for e in convs) == 3  # ResBlock + conv
    assert sum(stage_of(e) == ["ignn/den/backward"] for e in convs) == 5 * 3


def test_no_backward_ranges_or_markers_when_disabled():
    model, x = _tiny()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = model(x)
        y.square().mean().backward()
    assert not [e.name for e in prof.events() if e.name.endswith("/backward")
                and e.name.startswith("ignn/")]
    seen, nodes = set(), [y.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert "Marker" not in node.name(), node.name()
        nodes += [next_fn for next_fn, _ in node.next_functions]
    assert len(seen) > 50


class _FakeNvtx(types.SimpleNamespace):
    """Records the NVTX calls: push/pop (forward), start/end (backward)."""

    def __init__(self):
        super().__init__(calls=[], ids=iter(range(10**6)))

    def push_range(self, name):
        self.calls.append(("push", name))

    def pop_range(self):
        self.calls.append(("pop",))

    def start_range(self, name):
        rid = next(self.ids)
        self.calls.append(("start", name, rid))
        return rid

    def end_range(self, rid):
        self.calls.append(("end", rid))


def test_nvtx_ranges_balanced_and_named(ranges_on, monkeypatch):
    fake = _FakeNvtx()
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    model, x = _tiny()
    model(x)  # recorded by autograd, never backpropagated: no backward range opens
    assert fake.calls and not [c for c in fake.calls if c[0] == "start"]
    fake.calls.clear()
    _train_step(model, x)
    forward = [c for c in fake.calls if c[0] in ("push", "pop")]
    backward = [c for c in fake.calls if c[0] in ("start", "end")]
    assert {c[1] for c in forward if c[0] == "push"} == STAGES
    depth = 0
    for c in forward:  # push, pop, push, pop...: no stage nests in another
        depth += 1 if c[0] == "push" else -1
        assert depth in (0, 1)
    assert depth == 0
    assert {c[1] for c in backward if c[0] == "start"} == BACKWARD
    # every backward range ends once, before the next one starts
    starts, ends = backward[::2], backward[1::2]
    assert [c[0] for c in starts] == ["start"] * len(starts) and len(ends) == len(starts)
    assert [c[2] for c in starts] == [c[1] for c in ends]
    assert [c[1] for c in starts][:4] == ["ignn/tail/backward", "ignn/upsample/backward",
                                          "ignn/upsample/backward", "ignn/body2/backward"]
    assert starts[-1][1] == "ignn/head/backward"

    # a partial backward (to the tail's weight) still closes the one range it opened
    fake.calls.clear()
    loss = model(x).square().mean()
    torch.autograd.grad(loss, model.tail[0][0].weight, retain_graph=True)
    (_, name, rid), end = [c for c in fake.calls if c[0] in ("start", "end")]
    assert name == "ignn/tail/backward" and end == ("end", rid)
    # a second backward through the same graph opens and closes them all again
    fake.calls.clear()
    loss.backward()
    again = [c for c in fake.calls if c[0] in ("start", "end")]
    assert [c[1] for c in again[::2]] == [c[1] for c in starts]
    assert [c[2] for c in again[::2]] == [c[1] for c in again[1::2]]


def test_stage_module_that_raises_closes_its_range(ranges_on, monkeypatch):
    fake = _FakeNvtx()
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    model, x = _tiny()

    def fail(*args):
        raise RuntimeError("out of memory")

    model.body1.forward = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        model(x)
    assert fake.calls[-2:] == [("push", "ignn/body1"), ("pop",)]
    del model.body1.forward
    fake.calls.clear()
    model(x)  # no range was left open: the next forward's ranges are as ever
    pushes = [c[1] for c in fake.calls if c[0] == "push"]
    assert set(pushes) == STAGES and fake.calls.count(("pop",)) == len(pushes)


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
    train = report[report.index("## train"):]
    for row in train.splitlines():
        if row.startswith("| ignn/"):
            name, calls, forward_ms, backward_ms = (c.strip() for c in row.strip("|").split("|"))
            assert (backward_ms == "-") == (f"{name}/backward" not in BACKWARD), row
    traces = sorted(p.name for p in tmp_path.glob("trace-*.json"))
    assert traces == ["trace-inference-16.json", "trace-train-B2-24.json"]
    assert json.loads((tmp_path / traces[0]).read_text())["traceEvents"]


def test_tiling_script_measures_tiled_vs_untiled(tmp_path):
    from ignn_triton import save_model
    from ignn_triton.images import write_array
    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    save_model(IGNN(scale=2, n_feats=4, n_resblocks=2, window=4), tmp_path / "m.safetensors")
    rng = torch.Generator().manual_seed(1)
    image = (torch.rand(48, 40, 3, generator=rng) * 255).byte().numpy()
    write_array(image, tmp_path / "a.png")
    subprocess.run([sys.executable, str(root / "profiling" / "tiling.py"), str(tmp_path / "a.png"),
                    "--weights", str(tmp_path / "m.safetensors"), "--tiles", "12", "24",
                    "--overlap", "4", "--device", "cpu", "--out", str(tmp_path / "t")],
                   check=True, capture_output=True)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["tile"], r["lr_size"]) for r in rows] == [(12, [24, 20]), (24, [24, 20])]
    assert 20 < rows[0]["psnr_tiled_vs_untiled"] < 100  # tiles of 12 differ from the whole
    assert rows[1]["psnr_tiled_vs_untiled"] == float("inf")  # one tile covers the image
    assert "| a.png | 20x24 | 12 / 4 |" in (tmp_path / "t.md").read_text()


def _profiling_script(name: str):
    """profiling/<name>.py imported as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "profiling" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ignn_profiling_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _memory_script():
    return _profiling_script("memory")


def test_live_bytes_counts_what_is_alive_at_once():
    memory = _memory_script()
    x = torch.randn(1000)  # an input: neither it nor its views count

    def work():
        a = x * 2  # 4000 bytes -> 4096
        b = a[10:].view(-1, 2) + 1  # 3960 -> 4096; a's view costs nothing
        del a
        c = torch.empty(3000, dtype=torch.float64)  # 24000 -> 24064
        del b, c
        x.view(10, 100).t()

    assert memory.peak_bytes(work, [x]) == 4096 + 24064
    tracker = memory.LiveBytes()
    with tracker:
        kept = [torch.ones(128) for _ in range(3)]  # 512 bytes each
    assert tracker.current == tracker.peak == 3 * 512
    del kept
    assert tracker.current == 0


@pytest.mark.parametrize("shape,dtype", [((256, 128, 128, 2, 1), torch.bfloat16),
                                         ((256, 40, 40, 2, 16), torch.float32)])
def test_graph_aggregation_forward_peak_is_a_tenth_of_the_reference(shape, dtype):
    """Issue 4's memory target, predicted on fake tensors (profiling/memory.py): the GA
    forward's peak allocation at the bench's shapes, ours against reference/."""
    peaks = _memory_script().graph_aggregation_peaks(*shape, dtype=dtype)
    assert peaks["forward_ours"] <= 0.1 * peaks["forward_reference"], peaks
    assert peaks["forward_backward_ours"] < 0.3 * peaks["forward_backward_reference"], peaks
    # GraphAggregation.checkpoint: training memory no longer grows with k
    assert (peaks["forward_backward_ours_checkpoint"]
            <= 0.1 * peaks["forward_backward_reference"]), peaks
    C, H, W, s, B = shape  # the output alone, x1_hr (B, C, sH, sW), is a floor
    assert peaks["forward_ours"] > B * C * s * s * H * W * dtype.itemsize / 2 ** 20


def test_memory_script_writes_every_shape(tmp_path, capsys):
    memory = _memory_script()
    assert memory.main(["--dtype", "bf16", "--json", str(tmp_path / "m.json")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert len(rows) == len(memory.GA_SHAPES) == capsys.readouterr().out.count("| bf16 |")
    assert all(0 < r["forward_ours"] < r["forward_backward_ours"] for r in rows)


def _gpu_check_script():
    return _profiling_script("gpu_check")


def test_gpu_check_arguments(tmp_path):
    """The shell entry point: an unknown step is refused before anything runs or is written;
    --dry-run lists the commands, most important first."""
    script = str(Path(__file__).resolve().parents[1] / "profiling" / "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    bad = subprocess.run(["bash", script, "--steps", "tests", "bench-everything"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown step 'bench-everything'" in bad.stderr
    assert not (tmp_path / "out").exists()
    dry = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert [line.split(":")[0] for line in dry] == ["sanitizer", "sanitizer", "tests", "large",
                                                    "bench"]
    assert "--tool memcheck" in dry[0] and "--tool initcheck" in dry[1]
    assert all("PYTORCH_NO_CUDA_MEMORY_CACHING=1" in line and "--part calls" in line
               for line in dry[:2])
    tests = dry[2].split()
    assert tests.index("tests/test_cuda.py") < tests.index("tests/test_kernel_aggregate.py")
    assert dry[4].endswith(f"--part headline --out {tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


def test_gpu_check_output_layout(tmp_path):
    """Steps run in order under their limits and the budget; summary.md has one row per
    step, rewritten after each; a step that fails, runs past its limit or cannot start in
    the budget left is reported so, and the run exits 1. Fake steps stand in for the real
    ones (which need a GPU)."""
    gpu_check = _gpu_check_script()

    @dataclasses.dataclass(frozen=True)
    class Fake(gpu_check.Step):
        code: str = ""

        def commands(self, out):
            return [([sys.executable, "-c", self.code], {"FAKE": "1"})]

    summary = tmp_path / "summary.md"
    steps = [Fake("first", 20, 1, "first.log", "import os; print('fine', os.environ['FAKE'])"),
             Fake("second", 20, 1, "second.log",
                  f"print(open({str(summary)!r}).read()); raise SystemExit(3)"),
             Fake("third", 2, 1, "third.log", "import time; time.sleep(30)"),
             Fake("fourth", 20, 15, "fourth.log", "print('never')")]
    assert gpu_check.run(steps, tmp_path, budget=12) == 1
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in summary.read_text().splitlines()[-4:]]
    assert [r[0] for r in rows] == ["first", "second", "third", "fourth"]
    assert [r[1] for r in rows[:3]] == ["ok", "FAILED (exit 3)", "timeout (2 s)"]
    assert rows[3][1].startswith("skipped:") and rows[3][3] == ""
    assert rows[0][3:] == ["first.log", "fine 1"]  # the last line of the step's output
    # the second step saw the summary as it stood: the first done, itself running
    seen = (tmp_path / "second.log").read_text()
    assert "| first | ok |" in seen and "| second | running |" in seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.log", "second.log",
                                                          "summary.md", "third.log"]


def test_gpu_check_large_part_checks_itself(capsys):
    """The `large` part's corner checks (crop alignment, margins, index mapping) at small
    sizes on the CPU (the torch path): they must pass where the ops are right."""
    gpu_check = _gpu_check_script()
    assert gpu_check.large_calls("cpu", channels=8, agg_lr=96, knn_lr=160) == 0
    out = capsys.readouterr().out
    assert out.count("-> ok") == 4 and "1.0000 of the queries pick" in out
    assert out.endswith("large: ok\n")


def test_nvtx_ranges_with_ga_checkpointing(ranges_on, monkeypatch):
    """With GraphAggregation.checkpoint, the per-rank recomputation runs its forward ranges
    inside the backward pass: balanced, and inside the backward range that needs them."""
    fake = _FakeNvtx()
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    model, x = _tiny()
    model.gcn.checkpoint = True
    _train_step(model, x)
    backward = [c for c in fake.calls if c[0] in ("start", "end")]
    starts, ends = backward[::2], backward[1::2]
    assert {c[1] for c in starts} == BACKWARD and len(ends) == len(starts)
    assert [c[2] for c in starts] == [c[1] for c in ends]  # each ends before the next
    first = fake.calls.index(starts[0])
    recomputed = [c for c in fake.calls[first:] if c[0] == "push"]
    assert {c[1] for c in recomputed} == {"ignn/edges", "ignn/ecn", "ignn/aggregate",
                                          "ignn/den"}
    assert len(recomputed) == 4 * 5  # each of the k = 5 ranks' two stage pairs, once
    depth = 0
    for c in fake.calls:
        depth += {"push": 1, "pop": -1}.get(c[0], 0)
        assert depth in (0, 1)


def test_conv_share_script_splits_both_models(capsys):
    conv_share = _profiling_script("conv_share")
    conv_share.main(["24", "--reps", "1", "--n-feats", "8", "--blocks", "2", "--threads", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 24x24")]
    assert [r[1].strip() for r in rows] == ["IGNN", "EDSR", "IGNN/EDSR"]
    for row in rows[:2]:
        forward, conv, shuffle, other, flops = (float(v) for v in row[2:])
        assert forward > 0 and conv > 0 and shuffle >= 0 and other >= 0 and flops > 0
    assert float(rows[2][2]) > 1 and "bound" in rows[2][5]
