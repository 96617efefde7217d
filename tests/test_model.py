"""The IGNN and EDSR modules: shapes, sizes, errors, and GA wiring against reference/."""
import pytest
import torch
import torch.nn as nn

import ignn_triton.reference as R
from ignn_triton import EDSR, IGNN, imresize


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_config_has_about_49_5m_trainable_parameters():
    model = IGNN()
    assert abs(_trainable(model) - 49.5e6) < 0.1e6
    assert all(not p.requires_grad for p in model.vggnet.parameters())
    assert not model.sub_mean.weight.requires_grad and not model.add_mean.bias.requires_grad


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (13, 9), (12, 18), (31, 2)])
def test_output_shape_for_any_input_size(scale, hw):
    model = IGNN(scale=scale, n_feats=8, n_resblocks=2, window=4).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, scale * hw[0], scale * hw[1])
    assert torch.isfinite(y).all()


def test_explicit_son_image_equals_the_default():
    torch.manual_seed(0)
    model = IGNN(scale=2, n_feats=8, n_resblocks=2, window=30).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        explicit = model(x, imresize(x, 0.5).clamp(0, 1))
    torch.testing.assert_close(full, explicit)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_graph_aggregation_matches_reference(scale):
    torch.manual_seed(scale)
    model = IGNN(scale=scale, n_feats=6, n_resblocks=2, window=3).double().eval()
    s = model.graph_scale
    x = torch.rand(1, 3, 6 * s, 5 * s, dtype=torch.float64)
    ye = model.vggnet(x)
    xe = model.vggnet(imresize(x, 1 / s).clamp(0, 1))
    feat = torch.randn(1, 6, 6 * s, 5 * s, dtype=torch.float64)
    with torch.no_grad():
        ours = model.gcn(feat, ye, xe)
        gcn = model.gcn
        ref = R.graph_aggregation(feat, ye, xe, s, gcn.k, gcn.window, gcn.weightnet_lr,
                                  gcn.weightnet_hr, gcn.knn_downsample)
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])


def test_banded_ecn_equals_the_whole_map(monkeypatch):
    """On the CPU the ECN runs on bands of rows (3 rows here: both ECNs run on the 12 LR
    rows, as 4 bands); the GA block gives the whole-map result, and so do its gradients."""
    from ignn_triton import modules

    torch.manual_seed(4)
    model = IGNN(scale=2, n_feats=6, n_resblocks=2, window=3)
    x = torch.rand(1, 3, 12, 10)
    ye, xe = model.vggnet(x), model.vggnet(imresize(x, 0.5).clamp(0, 1))
    feat = torch.randn(1, 6, 12, 10)
    calls = []
    model.gcn.weightnet_hr.register_forward_hook(lambda mod, i, o: calls.append(o.shape[2]))

    def run():
        model.zero_grad()
        out = model.gcn(feat, ye, xe)
        (out[0].square().sum() + out[1].sum()).backward()
        return [t.detach() for t in out] + [p.grad.clone() for p in model.gcn.parameters()
                                            if p.grad is not None]

    whole = run()
    assert calls == [12] * 5  # k = 5 ranks, whole maps (the HR logits come from LR maps)
    calls.clear()
    monkeypatch.setattr(modules, "_CPU_BAND_ELEMENTS", 3 * 64 * 10)  # 3 rows of the LR map
    banded = run()
    assert calls == [3] * 4 * 5
    assert len(banded) == len(whole) > 2
    for i, (a, b) in enumerate(zip(banded, whole)):  # weight gradients: sums in another order
        tol = 1e-6 if i < 2 else 1e-4
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    net = modules.edge_conditioned_net(64)
    edges = torch.randn(2, 64, 7, 5)  # 6 rows per band here: 6 + 1
    torch.testing.assert_close(modules._banded(net, edges), net(edges), rtol=1e-6, atol=1e-6)


def test_training_step_gives_finite_gradients_to_every_trainable_parameter():
    torch.manual_seed(1)
    model = IGNN(scale=2, n_feats=8, n_resblocks=2, window=4)
    x, target = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 24, 24)
    (model(x) - target).abs().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("autocast", [False, True])
def test_ga_checkpoint_recomputes_the_same_gradients(autocast):
    """GraphAggregation.checkpoint trades memory for a second forward of each rank: the
    result and every gradient stay bit-identical (under bf16 autocast too: the recomputation
    runs under the autocast state of the forward), and inference is untouched by it."""
    torch.manual_seed(2)
    model = IGNN(scale=4, n_feats=8, n_resblocks=2, window=5)
    x = torch.rand(2, 3, 14, 18)
    results = []
    for checkpoint in (False, True):
        model.zero_grad()
        model.gcn.checkpoint = checkpoint
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
            with torch.no_grad():
                inference = model(x)
        y.float().square().mean().backward()
        results.append((y.detach(), inference,
                        [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (y0, inf0, g0), (y1, inf1, g1) = results
    assert torch.equal(y0, y1) and torch.equal(inf0, inf1) and torch.equal(y0, inf0)
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


@pytest.mark.parametrize("x, match", [
    (torch.rand(3, 8, 8), r"\(B, 3, H, W\).*got \(3, 8, 8\)"),
    (torch.rand(1, 1, 8, 8), r"got \(1, 1, 8, 8\)"),
    (torch.randint(0, 255, (1, 3, 8, 8)), "dtype torch.int64"),
    (torch.rand(1, 3, 8, 8) * 255, r"in \[0, 1\].*divide 8-bit images by 255"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
    (torch.rand(1, 3, 0, 8), "H, W >= 1"),
])
def test_bad_input_is_refused(x, match):
    model = IGNN(scale=2, n_feats=4, n_resblocks=2, window=4)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_x_son_is_refused():
    model = IGNN(scale=2, n_feats=4, n_resblocks=2, window=4)
    with pytest.raises(ValueError, match=r"x_son must be \(B, 3, H/s, W/s\) = \(1, 3, 8, 8\)"):
        model(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 5, 6))
    with pytest.raises(ValueError, match=r"would need padding to \(18, 16\)"):
        model(torch.rand(1, 3, 17, 16), torch.rand(1, 3, 8, 8))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="scale must be one of"):
        IGNN(scale=5)
    with pytest.raises(ValueError, match="window holds fewer than k"):
        IGNN(k=5, window=2)
    with pytest.raises(ValueError, match="n_resblocks must be even"):
        IGNN(n_resblocks=3)
    with pytest.raises(ValueError, match=r"n_resblocks must be an integer in \[1, 256\]"):
        IGNN(n_resblocks=10 ** 9)  # refused at once, nothing allocated
    with pytest.raises(ValueError, match="res_scale must be a number"):
        EDSR(res_scale=float("nan"))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_edsr_output_shape_and_bicubic_like_init(scale):
    model = EDSR(scale, n_feats=8, n_resblocks=2, res_scale=1.0).eval()
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 7 * scale, 9 * scale) and torch.isfinite(y).all()


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = IGNN(scale=2, n_feats=8, n_resblocks=2, window=4).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_banded_hr_stage_is_bit_identical(monkeypatch, scale):
    """Inference runs the HR stage (upsample, fuse_up, tail) in bands of rows with a halo;
    the output equals the whole-map stage bit for bit, bands of 16 rows and odd remainders
    included."""
    import ignn_triton.model as model_module
    torch.manual_seed(scale)
    model = IGNN(scale=scale, n_feats=8, n_resblocks=2, window=4).eval()
    x = torch.rand(2, 3, 45, 23)
    with torch.no_grad():
        whole = model(x)  # 45 rows (padded to 46 or 48) < 16 * ... : one band
        calls = []
        real = model._hr_stage
        monkeypatch.setattr(model, "_hr_stage", lambda *a: calls.append(a[0].shape[2]) or real(*a))
        monkeypatch.setattr(model_module, "_HR_BAND_BYTES", 1)  # bands of 16 LR rows
        banded = model(x)
    halo = model.hr_halo()
    assert len(calls) == 3 and calls[0] == 16 + halo and calls[1] == 16 + 2 * halo
    assert torch.equal(banded, whole)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (5, 2), (5, 3), (5, 4), (1, 1)])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_conv_chain_in_bands_equals_the_sequential(monkeypatch, kernel, stride, rows, dtype, tol):
    """In CPU inference a ConvChain runs each convolution in bands of output rows (`rows`
    here), the first on the concatenation of its inputs made a band at a time, the top
    and bottom bands with the convolution's own padding; the result is the Sequential's
    on the whole concatenated map, within rounding (oneDNN may pick another kernel for a
    band's shape than for the map's). add_weighted adds the weighted last layer
    into a sum band by band."""
    from ignn_triton import modules

    torch.manual_seed(kernel * 10 + stride + rows)
    chain = modules.ConvChain(modules.conv_block(7, 6, kernel, stride, relu=True),
                              modules.conv(6, 5, 3), nn.ReLU(inplace=True),
                              modules.conv(5, 4, 3)).to(dtype)
    a, b = torch.randn(2, 4, 23, 11, dtype=dtype), torch.randn(2, 3, 23, 11, dtype=dtype)
    whole = nn.Sequential.forward(chain, torch.cat([a, b], 1))
    bands = []
    real_conv2d = modules.F.conv2d
    monkeypatch.setattr(modules.F, "conv2d", lambda x, *args: bands.append(x.shape) or
                        real_conv2d(x, *args))
    out_width = (11 - 1) // stride + 1
    monkeypatch.setattr(modules, "_CPU_CONV_BAND_ELEMENTS", rows * 2 * 6 * out_width)
    monkeypatch.setattr(modules, "_CPU_CONV_WHOLE_ELEMENTS", 0)  # band even these small maps
    with torch.no_grad():
        banded = chain(a, b)
    out_rows = (23 - 1) // stride + 1
    first = [shape for shape in bands if shape[1] == 7]
    assert len(first) == -(-out_rows // rows) > 1 and all(shape[0] == 2 for shape in first)
    torch.testing.assert_close(banded, whole, rtol=tol, atol=tol)
    weight, total = torch.rand(2, 1, *banded.shape[2:], dtype=dtype), torch.randn_like(banded)
    with torch.no_grad():  # weighted sums of the last layer's bands: the same elementwise ops
        assert torch.equal(chain.add_weighted(None, weight, a, b), weight * banded)
        assert torch.equal(chain.add_weighted(total.clone(), weight, a, b),
                           total + weight * banded)
    bands.clear()
    with torch.enable_grad():  # training: the Sequential itself, on the concatenation
        torch.testing.assert_close(chain(a, b), whole, rtol=0, atol=0)
    assert [shape[2] for shape in bands] == [23, out_rows, out_rows]


def test_banded_hr_stage_with_banded_convolutions_is_bit_identical(monkeypatch):
    """At the model's width (C = 64) fuse_up's convolutions run in bands of their own
    (ConvChain) inside each band of the HR stage, with other band edges than in the whole
    stage's; the output is still the whole stage's bit for bit."""
    from ignn_triton import model as model_module, modules

    torch.manual_seed(0)
    model = IGNN(scale=4, n_feats=64, n_resblocks=2).eval()
    x = torch.rand(1, 3, 40, 160)
    bands = []
    real_conv2d = modules.F.conv2d
    monkeypatch.setattr(modules.F, "conv2d", lambda x, *args, **kwargs:
                        bands.append(tuple(x.shape[1:3])) or real_conv2d(x, *args, **kwargs))
    with torch.no_grad():
        whole = model(x)  # one HR band
        assert {(128, 21), (128, 22)} <= set(bands)  # fuse_up: 80 rows at 2x, 4 bands of 20
        monkeypatch.setattr(model_module, "_HR_BAND_BYTES", 1)  # bands of 16 LR rows
        banded = model(x)
    assert torch.equal(banded, whole)
