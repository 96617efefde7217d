"""The whole model on a real GPU (compiled Triton kernels) against its CPU torch path.

These need CUDA: the interpreter runs the kernels in the other test files, but only a GPU
runs the compiled kernels behind the model, torch.compile on CUDA and autocast there."""
import pytest
import torch

from ignn_triton import IGNN, ops

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
