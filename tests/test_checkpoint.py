"""load_model / save_model: the released layout (spec section 8), our safetensors, bad and
hostile files."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ignn_triton import EDSR, IGNN, CheckpointError, load_model, save_model

DATA = Path(__file__).parent / "data"


def _spec_released_state(scale: int, C: int, n_resblocks: int) -> dict:
    """A released IGNN checkpoint's net_state_dict, key by key and shape by shape from spec
    sections 5, 7 and 8 (DataParallel `module.` keys, the VGG alias), random values."""
    s = 2 if scale == 4 else scale
    half = n_resblocks // 2
    convs = {"sub_mean": (3, 3, 1), "add_mean": (3, 3, 1), "vggnet.sub_mean": (3, 3, 1),
             "vggnet.model.0": (64, 3, 3), "vggnet.model.2": (64, 64, 3), "head.0": (C, 3, 3),
             "gcn.knn_downsample.0.0": (C, C, 5), "gcn.knn_downsample.1.0": (C, C, 3),
             "gcn.knn_downsample.2.0": (C, C, 3), "fuse_b.0.0": (C, 2 * C, 3),
             "fuse_b.1.0": (C, C, 3), f"body2.{half}.0": (C, C, 3),
             "upsample.0": (s * s * C, C, 3), "fuse_up.0.0": (C, 2 * C, 3),
             "fuse_up.1.0": (C, C, 3)}
    for net in ("lr", "hr"):
        convs.update({f"gcn.weightnet_{net}.0.0": (64, 64, 1),
                      f"gcn.weightnet_{net}.1.body.0": (64, 64, 1),
                      f"gcn.weightnet_{net}.1.body.2": (64, 64, 1),
                      f"gcn.weightnet_{net}.2.0": (1, 64, 1)})
    for body in ("body1", "body2"):
        convs.update({f"{body}.{i}.body.{j}": (C, C, 3) for i in range(half) for j in (0, 2)})
    if scale == 4:
        convs.update({"tail.0.0": (4 * C, C, 3), "tail.1.0": (3, C, 3)})
    else:
        convs["tail.0.0"] = (3, C, 3)
    state = {}
    for name, (out, inp, size) in convs.items():
        state[f"module.{name}.weight"] = torch.randn(out, inp, size, size) / (inp * size * size)
        state[f"module.{name}.bias"] = torch.randn(out) * 0.01
    mean = torch.tensor([0.4488, 0.4371, 0.4040])  # EDSR's MeanShift: eye weight, -+255 mean
    for name, sign in (("sub_mean", -1), ("add_mean", 1)):
        state[f"module.{name}.weight"] = torch.eye(3).view(3, 3, 1, 1)
        state[f"module.{name}.bias"] = sign * 255 * mean
    for name in ("model.0", "model.2"):  # the released VGG alias
        for p in ("weight", "bias"):
            state[f"module.graph.embedcnn.{name}.{p}"] = state[f"module.vggnet.{name}.{p}"]
    return state


def _spec_ignn_keys(scale: int, n_resblocks: int) -> set[str]:
    """The parameter keys of a released IGNN checkpoint, written out from spec section 8."""
    return {key[len("module."):] for key in _spec_released_state(scale, 1, n_resblocks)
            if not key.startswith("module.graph.")}


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
    with pytest.raises(CheckpointError, match="truncated or corrupt torch file"):
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
    state["module.tail.0.0.bias"] = torch.zeros(4)
    state["module.head.0.bias"] = torch.full((8,), float("nan"))
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    message = str(err.value)
    assert "missing keys (1): fuse_b.0.0.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "tail.0.0.bias: shape (4,), expected (3,)" in message
    assert "head.0.bias: holds NaN or inf" in message


def test_other_architectures_and_objects_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an IGNN or EDSR state_dict"):
        load_model(tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        load_model(tmp_path / "list.pth")
    torch.save({"net_state_dict": {"x": torch.nn.ReLU()}}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        load_model(tmp_path / "code.pth")  # weights_only refuses pickled objects
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pth")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_released_layout_from_the_spec_loads_and_runs(tmp_path, scale):
    """A checkpoint built key by key from the spec (not from our module) loads strictly,
    and the output is the spec's tail applied to the fuse_up output."""
    torch.manual_seed(scale)
    state = _spec_released_state(scale, C=8, n_resblocks=4)
    # the released files were written by torch 1.1: the legacy (non-zip) format
    torch.save({"net_state_dict": state, "solver_state_dict": {}, "epoch_idx": 3,
                "best_PSNR": 30.0, "best_epoch": 2}, tmp_path / f"IGNN_x{scale}.pth",
               _use_new_zipfile_serialization=scale == 4)
    model = load_model(tmp_path / f"IGNN_x{scale}.pth", window=4)
    assert model.config["scale"] == scale and model.config["n_feats"] == 8
    assert model.config["n_resblocks"] == 4
    fused = []
    model.fuse_up.register_forward_hook(lambda module, args, out: fused.append(out))
    x = torch.rand(1, 3, 12, 18)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 12 * scale, 18 * scale)
    u, w = fused[0], {k[len("module."):]: v for k, v in state.items()}
    if scale == 4:  # conv3x3 C->4C, PixelShuffle(2), conv3x3 C->3
        u = F.pixel_shuffle(F.conv2d(u, w["tail.0.0.weight"], w["tail.0.0.bias"], padding=1), 2)
        u = F.conv2d(u, w["tail.1.0.weight"], w["tail.1.0.bias"], padding=1)
    else:  # conv3x3 C->3
        u = F.conv2d(u, w["tail.0.0.weight"], w["tail.0.0.bias"], padding=1)
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, ((u + 255 * mean) / 255)[..., : 12 * scale, : 18 * scale])


@pytest.mark.parametrize("scale, tail, needle", [
    (2, {"tail.0.0.weight": torch.zeros(5, 8, 3, 3)}, "tail.0.0.weight' (5, 8, 3, 3)"),
    (3, {"tail.1.0.weight": torch.zeros(3, 8, 3, 3)}, "'tail.1.0.weight' (3, 8, 3, 3)"),
    (4, {"tail.1.0.weight": None}, "'tail.1.0.weight' missing"),
    (4, {"tail.0.0.weight": torch.zeros(3, 8, 3, 3)}, "tail.0.0.weight' (3, 8, 3, 3)"),
])
def test_misshaped_released_tail_is_refused(tmp_path, scale, tail, needle):
    state = _spec_released_state(scale, C=8, n_resblocks=2)
    for key, value in tail.items():
        if value is None:
            del state[f"module.{key}"]
        else:
            state[f"module.{key}"] = value
    torch.save({"net_state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'bad.pth'}: IGNN tail does not fit any scale")
    assert needle in message and "expected tail.0.0 (3, 8, 3, 3) alone (x2, x3" in message


def test_safetensors_written_before_the_x2_x3_layout_change_still_load():
    """tests/data holds an x4 file written by ignn_triton 0.1.0 as of dba98ad."""
    model = load_model(DATA / "ignn_x4_c4b2_v0.1.0.safetensors")
    assert model.config == dict(scale=4, n_feats=4, n_resblocks=2, res_scale=1.0, k=4,
                                patch_size=3, stride=2, window=5)
    with torch.no_grad():
        y = model(torch.rand(1, 3, 10, 10))
    assert y.shape == (1, 3, 40, 40) and torch.isfinite(y).all()


def _with_metadata(tmp_path, config, arch="IGNN") -> Path:
    """A safetensors file of a valid tiny x2 model whose metadata claims `config`."""
    model = IGNN(scale=2, n_feats=4, n_resblocks=2, window=4)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    text = config if isinstance(config, str) else json.dumps(config)
    path = tmp_path / "hostile.safetensors"
    save_file(tensors, path, metadata={"format": "ignn_triton", "arch": arch, "config": text})
    return path


GOOD = dict(scale=2, n_feats=4, n_resblocks=2, res_scale=0.1, k=5, patch_size=3, stride=2,
            window=4)


@pytest.mark.parametrize("change, needle", [
    ({"colour": 1}, "unknown config key 'colour'"),
    ({"n_feats": "4"}, "n_feats must be an integer in [1, 1024]; got '4'"),
    ({"n_feats": -4}, "n_feats must be an integer in [1, 1024]; got -4"),
    ({"n_feats": 0}, "n_feats must be an integer in [1, 1024]; got 0"),
    ({"n_feats": 4.0}, "n_feats must be an integer"),
    ({"n_resblocks": 10 ** 9}, "n_resblocks must be an integer in [1, 256]"),
    ({"n_resblocks": 3}, "n_resblocks must be even"),
    ({"res_scale": float("nan")}, "res_scale must be a number in (0, 10]; got nan"),
    ({"res_scale": float("inf")}, "res_scale must be a number in (0, 10]; got inf"),
    ({"res_scale": True}, "res_scale must be a number"),
    ({"k": 0}, "k must be an integer in [1, 64]; got 0"),
    ({"patch_size": 0}, "patch_size must be an integer in [1, 15]; got 0"),
    ({"stride": 0}, "stride must be an integer in [1, 15]; got 0"),
    ({"stride": 5}, "stride must be <= patch_size"),
    ({"window": 1, "k": 2}, "a 1x1 window holds fewer than k = 2 candidates"),
    ({"scale": 8}, "scale must be one of (2, 3, 4); got 8"),
    ({"scale": None}, "scale must be one of (2, 3, 4); got None"),
    ({"n_feats": 8}, "does not match IGNN (scale 2, n_feats 8"),
])
def test_hostile_metadata_configs_are_refused(tmp_path, change, needle):
    config = {**GOOD, **change}
    path = _with_metadata(tmp_path, config)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path}: ") and needle in str(err.value)


def test_malformed_metadata_is_refused(tmp_path):
    missing = {k: v for k, v in GOOD.items() if k != "res_scale"}
    for config, needle in ((missing, "config lacks 'res_scale'"),
                           ("{not json", "the metadata's config is not JSON"),
                           ("[1, 2]", "config must be a JSON object; got list")):
        with pytest.raises(CheckpointError, match=".*" + needle.replace("[", r"\[")):
            load_model(_with_metadata(tmp_path, config))
    with pytest.raises(CheckpointError, match="unknown architecture 'SRGAN'"):
        load_model(_with_metadata(tmp_path, GOOD, arch="SRGAN"))


def test_every_problem_is_listed_at_once(tmp_path):
    path = _with_metadata(tmp_path, {**GOOD, "k": 0, "stride": "2", "extra": 1})
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert all(needle in message for needle in ("unknown config key 'extra'", "k must be",
                                                "stride must be"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_integer_and_bool_tensors_are_refused(tmp_path, dtype):
    state = _released(IGNN(scale=2, n_feats=8, n_resblocks=2))
    weight = state["net_state_dict"]["module.body1.0.body.0.weight"]
    state["net_state_dict"]["module.body1.0.body.0.weight"] = weight.to(dtype)
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=f"body1.0.body.0.weight: dtype {dtype}, expected "
                       "a floating-point tensor"):
        load_model(tmp_path / "int.pth")


def test_half_precision_tensors_load(tmp_path):
    source = IGNN(scale=2, n_feats=8, n_resblocks=2)
    state = {k: v.half() for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "half.pth")
    model = load_model(tmp_path / "half.pth")
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value.float()), key


def test_an_oversized_width_is_refused_without_allocating_it(tmp_path):
    """Small files that claim a huge model: a .pth whose head has 2048 or 1000 channels, and
    a safetensors file whose metadata asks for 1000 channels and 256 blocks (within the
    bounds: a real model of that size takes 18 GB). Each is refused from the shapes alone,
    in a fresh process whose peak memory stays under 1 GB, torch's import included."""
    for channels in (1000, 2048):
        state = _released(IGNN(scale=4, n_feats=8, n_resblocks=32))["net_state_dict"]
        state["module.head.0.weight"] = torch.zeros(channels, 3, 3, 3)
        torch.save(state, tmp_path / f"wide{channels}.pth")
    meta = _with_metadata(tmp_path, {**GOOD, "n_feats": 1000, "n_resblocks": 256})
    code = (
        "import resource, sys\n"
        "from ignn_triton import load_model, CheckpointError\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_model(path)\n"
        "    except CheckpointError as e:\n"
        "        print(str(e).splitlines()[0])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
    paths = [str(tmp_path / "wide1000.pth"), str(tmp_path / "wide2048.pth"), str(meta)]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split("\n")
    assert "wide1000.pth: IGNN 'upsample.0.weight' is (32, 8, 3, 3)" in out[0]
    assert "wide2048.pth: IGNN 'upsample.0.weight' is (32, 8, 3, 3)" in out[1]
    assert "hostile.safetensors: does not match IGNN (scale 2, n_feats 1000, n_resblocks 256)" in out[2]
    assert int(out[3]) < 1024, out  # MiB of peak RSS


def test_a_training_checkpoint_as_weights_loads_its_ema_or_model(tmp_path):
    torch.manual_seed(0)
    model, ema = IGNN(scale=2, n_feats=8, n_resblocks=2), IGNN(scale=2, n_feats=8, n_resblocks=2)
    args = dict(scale=2, n_feats=8, n_resblocks=2, res_scale=0.1, k=5, window=30, lr=1e-4)
    ckpt = dict(model=model.state_dict(), ema=ema.state_dict(), optimiser={}, step=7, args=args)
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.warns(UserWarning, match=r"training checkpoint .*\(step 7\); loading its EMA weights"):
        loaded = load_model(tmp_path / "last.pt")
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({**ckpt, "ema": None}, tmp_path / "last.pt")
    with pytest.warns(UserWarning, match="loading its model weights .it kept no EMA"):
        loaded = load_model(tmp_path / "last.pt")
    assert torch.equal(loaded.head[0].weight, model.head[0].weight)
    torch.save({**ckpt, "args": {**args, "n_feats": "8"}}, tmp_path / "last.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="n_feats must be"):
        load_model(tmp_path / "last.pt")


def test_random_bytes_and_pickled_code_get_no_weights_only_advice(tmp_path):
    noise = random.Random(0).randbytes(4096)
    assert noise[8:9] != b"{"  # not the start of a safetensors header
    (tmp_path / "noise.pth").write_bytes(noise)
    (tmp_path / "zipnoise.pth").write_bytes(b"PK\x03\x04" + noise)
    torch.save({"net_state_dict": {"x": torch.nn.ReLU()}}, tmp_path / "code.pth")
    for name, needle in (("noise.pth", "not a checkpoint (neither safetensors nor a torch file)"),
                         ("zipnoise.pth", "truncated or corrupt torch file"),
                         ("code.pth", "holds Python objects other than tensors")):
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / name)
        assert needle in str(err.value) and "weights_only" not in str(err.value), str(err.value)
        assert err.value.__cause__ is None  # one error, not a chain of torch's
