"""The whole model on a real GPU (compiled Triton kernels) against its CPU torch path, and
the compiled kernels' bitwise guarantees at the default configs and real sizes.

These need CUDA: the interpreter runs the kernels in the other test files, but only a GPU
runs the compiled kernels behind the model, torch.compile on CUDA and autocast there."""
import dataclasses
import importlib

import pytest
import torch

from ignn_triton import IGNN, ops
from ignn_triton.geometry import graph_geometry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: compiled kernels inside the model")


def _models(scale=4):
    torch.manual_seed(0)
    cpu = IGNN(scale=scale, n_feats=16, n_resblocks=2, window=8).eval()
    gpu = IGNN(scale=scale, n_feats=16, n_resblocks=2, window=8).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_gpu_forward_matches_cpu(scale, monkeypatch):
    """Same weights and input on both paths. Matching is discontinuous (a near-tie may pick
    another neighbour under other rounding), so the CPU model reuses the GPU's matches;
    the k-NN itself is compared with near-tie tolerance in test_kernel_patch_knn.py."""
    cpu, gpu = _models(scale)
    x = torch.rand(2, 3, 30, 26)
    matches = []
    knn = ops.patch_knn

    def recording(*args):
        matches.append(knn(*args))
        return matches[-1]

    monkeypatch.setattr(ops, "patch_knn", recording)
    with torch.no_grad():
        got = gpu(x.cuda()).cpu()
        dist, idx = matches.pop()
        monkeypatch.setattr(ops, "patch_knn", lambda *args: (dist.cpu(), idx.cpu()))
        want = cpu(x)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_gpu_compile_fullgraph_matches_eager():
    _, gpu = _models()
    x = torch.rand(1, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gpu, fullgraph=True)(x), gpu(x),
                                   rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_mixed_precision_training_step(dtype):
    _, model = _models()
    model.train()
    x = torch.rand(2, 3, 24, 24, device="cuda")
    target = torch.rand(2, 3, 96, 96, device="cuda")
    with torch.autocast("cuda", dtype):
        out = model(x)
        loss = (out.float() - target).abs().mean()
    assert out.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name


def test_gpu_gradients_match_cpu():
    cpu, gpu = _models(2)
    cpu.train()
    gpu.train()
    x = torch.rand(1, 3, 20, 20)
    cpu(x).square().mean().backward()
    gpu(x.cuda()).square().mean().backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=2e-3, atol=2e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_scan_is_bitwise_the_whole_scan(dtype):
    """At LR 128x128 (E = 64, w = 30, k = 5) the launcher splits each query block's scan
    over several programs on an H100 / H200: dist and idx bit-identical to one program per
    block (the default config otherwise)."""
    pk = importlib.import_module("ignn_triton.kernels.patch_knn")
    g = torch.Generator(device="cuda").manual_seed(0)
    ye = torch.randn(1, 64, 128, 128, device="cuda", generator=g).to(dtype)
    xe = torch.randn(1, 64, 64, 64, device="cuda", generator=g).to(dtype)
    cfg = pk.default_knn_config(64, 5, dtype)
    assert pk.launch_splits(graph_geometry(128, 128, 2), cfg, 1, ye.device, dtype) > 1
    split = pk.patch_knn(ye, xe, 5, 2)
    whole = pk.patch_knn(ye, xe, 5, 2, config=dataclasses.replace(cfg, splits=1))
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])


@pytest.mark.parametrize("scale", [2, 3])
def test_aggregate_forward_is_bitwise_repeatable(scale):
    """The forward is a gather (no atomics): knn_hr and x1_hr bit-identical run to run, at
    C = 256, LR 96x96, bf16."""
    pa = importlib.import_module("ignn_triton.kernels.patch_aggregate")
    g = torch.Generator(device="cuda").manual_seed(1)
    feat = torch.randn(1, 256, 96, 96, device="cuda", generator=g).to(torch.bfloat16)
    geo = graph_geometry(96, 96, scale)
    idx = torch.randint(0, geo.num_keys, (1, geo.num_queries, 5), device="cuda", generator=g)
    query, key = ops.query_stats(feat), ops.key_stats(feat, scale)
    logits = torch.randn(1, 5, 96 * scale, 96 * scale, device="cuda", generator=g)
    for lg in (None, logits.to(torch.bfloat16)):
        a = pa.patch_aggregate(feat, idx, *query, *key, scale, logits=lg)
        b = pa.patch_aggregate(feat, idx, *query, *key, scale, logits=lg)
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_on_the_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every kernel launches on cuda:1 (and its
    stream): the same results as on cuda:0."""
    g = torch.Generator().manual_seed(2)
    ye, xe = torch.randn(1, 8, 32, 32, generator=g), torch.randn(1, 8, 16, 16, generator=g)
    feat = torch.randn(1, 16, 32, 32, generator=g)
    results = []
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        y, x, f = (t.to(device).requires_grad_(t is feat) for t in (ye, xe, feat))
        _, idx = ops.patch_knn(y, x, 3, 2, 8)
        out = ops.patch_aggregate(f, idx, ops.query_stats(f), ops.key_stats(f, 2), 2)
        out.square().sum().backward()
        results.append([t.cpu() for t in (idx, ops.edge_features(y, x, idx, 2), out, f.grad)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
