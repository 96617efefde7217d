"""load_model / save_model: the released layout (spec section 8), our safetensors, bad files."""
import re

import pytest
import torch

from ignn_triton import EDSR, IGNN, CheckpointError, load_model, save_model


def _spec_ignn_keys(scale: int, n_resblocks: int) -> set[str]:
    """The parameter keys of a released IGNN checkpoint, written out from spec section 8."""
    keys = {"sub_mean", "add_mean", "vggnet.sub_mean", "vggnet.model.0", "vggnet.model.2",
            "head.0", "body2.16.0", "upsample.0", "fuse_b.0.0", "fuse_b.1.0", "fuse_up.0.0",
            "fuse_up.1.0"}
    half = n_resblocks // 2
    keys |= {f"body1.{i}.body.{j}" for i in range(half) for j in (0, 2)}
    keys |= {f"body2.{i}.body.{j}" for i in range(half) for j in (0, 2)}
    keys |= {f"gcn.knn_downsample.{i}.0" for i in range(3)}
    for net in ("lr", "hr"):
        keys |= {f"gcn.weightnet_{net}.0.0", f"gcn.weightnet_{net}.1.body.0",
                 f"gcn.weightnet_{net}.1.body.2", f"gcn.weightnet_{net}.2.0"}
    keys |= {"tail.0.0", "tail.1.0"} if scale == 4 else {"tail.0"}
    keys = {name.replace("16", str(half)) if name == "body2.16.0" else name for name in keys}
    return {f"{name}.{p}" for name in keys for p in ("weight", "bias")}


def _released(model: IGNN) -> dict:
    """A checkpoint as the released training code saves it (DataParallel, solver state)."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"module.graph.embedcnn.{k[len('module.vggnet.'):]}": v.clone()
                  for k, v in state.items() if k.startswith("module.vggnet.")})
    return {"net_state_dict": state, "solver_state_dict": {"state": {}}, "epoch_idx": 7,
            "best_PSNR": 31.5, "best_epoch": 6}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_state_dict_keys_are_the_released_ones(scale):
    model = IGNN(scale=scale, n_feats=8, n_resblocks=32)
    assert set(model.state_dict()) == _spec_ignn_keys(scale, 32)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_released_checkpoint_loads_with_inferred_config(tmp_path, scale):
    torch.manual_seed(scale)
    source = IGNN(scale=scale, n_feats=8, n_resblocks=4, window=4)
    torch.save(_released(source), tmp_path / f"IGNN_x{scale}.pth")
    model = load_model(tmp_path / f"IGNN_x{scale}.pth", window=4)
    assert isinstance(model, IGNN) and not model.training
    assert model.config["scale"] == scale and model.config["n_feats"] == 8
    assert model.config["n_resblocks"] == 4
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.rand(1, 3, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x))


def test_stripped_state_dict_loads_strictly_into_the_module():
    source = IGNN(scale=4, n_feats=8, n_resblocks=2)
    state = {k[len("module."):]: v for k, v in _released(source)["net_state_dict"].items()}
    IGNN(scale=4, n_feats=8, n_resblocks=2).load_state_dict(state, strict=True)


@pytest.mark.parametrize("scale, tail", [(2, ["tail.0.0"]), (3, ["tail.0.0"]),
                                          (4, ["tail.0.0", "tail.0.2"])])
def test_official_edsr_layout(tmp_path, scale, tail):
    source = EDSR(scale, n_feats=8, n_resblocks=3, res_scale=1.0)
    keys = {k.rsplit(".", 1)[0] for k in source.state_dict()}
    expected = ({"sub_mean", "add_mean", "head.0", "body.3", "tail.1"} | set(tail)
                | {f"body.{i}.body.{j}" for i in range(3) for j in (0, 2)})
    assert keys == expected
    torch.save(source.state_dict(), tmp_path / "edsr.pt")
    model = load_model(tmp_path / "edsr.pt")
    assert isinstance(model, EDSR) and model.config == source.config


def test_safetensors_round_trip(tmp_path):
    source = IGNN(scale=3, n_feats=8, n_resblocks=2, k=4, window=5)
    save_model(source, tmp_path / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp files left
    model = load_model(tmp_path / "model.safetensors")
    assert model.config == source.config
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_truncated_file_is_refused(tmp_path):
    torch.save(_released(IGNN(scale=2, n_feats=8, n_resblocks=2)), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(tmp_path / "cut.pth")
    save_model(IGNN(scale=2, n_feats=8, n_resblocks=2), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    ckpt = _released(IGNN(scale=2, n_feats=8, n_resblocks=2))
    state = ckpt["net_state_dict"]
    del state["module.fuse_b.0.0.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    state["module.tail.0.bias"] = torch.zeros(4)
    state["module.head.0.bias"] = torch.full((8,), float("nan"))
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing keys (1): fuse_b.0.0.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "tail.0.bias: shape (4,), expected (3,)" in message
    assert "head.0.bias: holds NaN or inf" in message


def test_other_architectures_and_objects_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an IGNN or EDSR state_dict"):
        load_model(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        load_model(tmp_path / "list.pth")
    torch.save({"net_state_dict": {"x": torch.nn.ReLU()}}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(tmp_path / "code.pth")  # weights_only refuses pickled objects
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pth")
