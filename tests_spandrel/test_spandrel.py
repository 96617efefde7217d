"""ignn_triton.spandrel against the real spandrel: what chaiNNer and ComfyUI do with a file.

Run by .ci/spandrel in a venv of its own (spandrel needs torchvision, which needs its own
torch); the main suite only checks that install() asks for the extra when spandrel is absent.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import spandrel
import torch
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.RCAN import RCAN

import ignn_triton
import ignn_triton.spandrel as ours
from ignn_triton import EDSR, IGNN, CheckpointError, load_model, save_model
from ignn_triton.checkpoint import builtin_weights
from ignn_triton.images import read_image


@pytest.fixture(scope="module")
def loader():
    ours.install()
    return spandrel.ModelLoader()


def _released(model: IGNN) -> dict:
    """A checkpoint as the released training code saves it (spec section 8)."""
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    state.update({f"module.graph.embedcnn.{key[len('vggnet.'):]}": value
                  for key, value in model.state_dict().items() if key.startswith("vggnet.")})
    return {"net_state_dict": state, "solver_state_dict": {"state": {}, "param_groups": []},
            "epoch_idx": 7, "best_PSNR": 31.5, "best_epoch": 6}


def _same_output(descriptor, path, x):
    """The descriptor's output is load_model's, clamped to [0, 1] as spandrel does."""
    with torch.no_grad():
        expected = load_model(path)(x).clamp(0, 1)
    assert torch.equal(descriptor(x), expected)


def _fields(descriptor, arch, scale, C, blocks):
    assert descriptor.architecture.id == arch and descriptor.purpose == "SR"
    assert descriptor.scale == scale and descriptor.tags == [f"{C}nf", f"{blocks}nb"]
    assert descriptor.input_channels == descriptor.output_channels == 3
    assert descriptor.size_requirements.none  # the model pads itself to any size
    assert descriptor.supports_half and descriptor.supports_bfloat16
    assert descriptor.tiling == spandrel.ModelTiling.DISCOURAGED
    assert not descriptor.model.training


def _save(kind: str, scale: int, folder: Path) -> tuple[torch.nn.Module, Path]:
    """A small model and a file of it in one of the formats spandrel users will have."""
    if kind == "edsr":  # an EDSR-PyTorch state_dict, with the official files' suffix
        source = EDSR(scale, n_feats=8, n_resblocks=2, res_scale=1.0)
        path = folder / f"edsr_baseline_x{scale}.pt"
        torch.save(source.state_dict(), path)
        return source, path
    source = IGNN(scale=scale, n_feats=8, n_resblocks=2)
    if kind == "safetensors":
        save_model(source, folder / "ours.safetensors")
        return source, folder / "ours.safetensors"
    path = folder / f"IGNN_x{scale}.pth"  # released; torch 1.1 wrote the legacy format
    torch.save(_released(source), path, _use_new_zipfile_serialization=kind != "legacy")
    return source, path


@pytest.mark.parametrize("kind, scale", [("released", 2), ("released", 3), ("released", 4),
                                         ("legacy", 4), ("safetensors", 3), ("edsr", 2),
                                         ("edsr", 3), ("edsr", 4)])
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")  # spandrel tries it on .pt
def test_files_load_as_load_model_loads_them(loader, tmp_path, kind, scale):
    torch.manual_seed(scale)
    source, path = _save(kind, scale, tmp_path)
    descriptor = loader.load_from_file(path)
    _fields(descriptor, type(source).__name__, scale, 8, 2)
    assert type(descriptor.model) is type(source) and descriptor.model.config == source.config
    _same_output(descriptor, path, torch.rand(1, 3, 13, 10))


def test_the_builtin_weights_get_their_own_config(loader):
    # spandrel drops the metadata: the built-in weights (res_scale 1.0, not the paper's 0.1
    # that the shapes imply) are recognised by their tensors
    path = builtin_weights(4)
    descriptor = loader.load_from_file(path)
    _fields(descriptor, "IGNN", 4, 64, 16)
    assert descriptor.model.config == load_model(path).config
    photo = read_image(Path(ignn_triton.__file__).parent / "data" / "astronaut.png")
    lr = ignn_triton.imresize(photo[..., 96:160, 96:160], 1 / 4).clamp(0, 1)  # (1, 3, 16, 16)
    _same_output(descriptor, path, lr)
    # bf16 as spandrel casts it (weights and input): close to fp32 (57 dB on the whole image)
    fp32 = descriptor(lr)
    bf16 = descriptor.bfloat16()(lr.bfloat16()).float()
    assert 10 * torch.log10(1 / (bf16 - fp32).square().mean()) > 45


def test_any_size_and_half_precision(loader, tmp_path):
    torch.manual_seed(0)
    save_model(IGNN(scale=4, n_feats=8, n_resblocks=2), tmp_path / "m.safetensors")
    descriptor = loader.load_from_file(tmp_path / "m.safetensors")
    for h, w in [(1, 1), (2, 5), (15, 3)]:
        assert descriptor(torch.rand(1, 3, h, w)).shape == (1, 3, 4 * h, 4 * w)
    x = torch.rand(1, 3, 12, 12)
    fp32 = descriptor(x)
    fp16 = descriptor.half()(x.half()).float()
    assert torch.isfinite(fp16).all() and 10 * torch.log10(1 / (fp16 - fp32).square().mean()) > 45


def test_install_is_idempotent_and_keeps_an_existing_edsr():
    registry = spandrel.ArchRegistry()
    assert [a.architecture.id for a in ours.install(registry)] == ["IGNN", "EDSR"]
    assert ours.install(registry) == [] and len(registry) == 2
    theirs = spandrel.ArchRegistry()
    edsr = spandrel.ArchSupport(ours.architectures()[1].architecture, lambda state: False)
    theirs.add(edsr)
    assert [a.architecture.id for a in ours.install(theirs)] == ["IGNN"]
    assert theirs["EDSR"] is edsr


def test_importing_ignn_triton_leaves_spandrel_unimported():
    code = ("import sys, ignn_triton, ignn_triton.spandrel, ignn_triton.cli; "
            "assert 'spandrel' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_other_architectures_stay_theirs_and_ours_were_nobodys(loader):
    others = {"RCAN": RCAN(scale=2, n_resgroups=2, n_resblocks=2, n_feats=16, reduction=4),
              "ESRGAN": ESRGAN(num_filters=8, num_blocks=2, scale=4),
              "Compact": Compact(num_feat=8, num_conv=2, upscale=4)}
    for arch, model in others.items():
        state = model.state_dict()
        assert not ours.detect("IGNN", state) and not ours.detect("EDSR", state), arch
        assert loader.load_from_state_dict(state).architecture.id == arch
    spandrels_own = spandrel.ArchRegistry()
    spandrels_own.add(*[a for a in spandrel.MAIN_REGISTRY
                        if a.architecture.id not in ("IGNN", "EDSR")])
    for state in (_released(IGNN(scale=2, n_feats=8, n_resblocks=2)),
                  EDSR(4, n_feats=8, n_resblocks=2).state_dict()):
        with pytest.raises(spandrel.UnsupportedModelError):
            spandrels_own.load(state)


def test_a_damaged_ignn_file_is_refused_with_its_problems(loader, tmp_path):
    checkpoint = _released(IGNN(scale=2, n_feats=8, n_resblocks=2))
    checkpoint["net_state_dict"]["module.head.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="head.0.weight: holds NaN or inf"):
        loader.load_from_file(tmp_path / "nan.pth")
    del checkpoint["net_state_dict"]["module.fuse_b.0.0.bias"]  # not an IGNN's keys any more
    torch.save(checkpoint, tmp_path / "missing.pth")
    with pytest.raises(spandrel.UnsupportedModelError):
        loader.load_from_file(tmp_path / "missing.pth")
