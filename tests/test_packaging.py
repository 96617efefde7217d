"""The package installs and imports as users get it: editable, from a wheel, without triton."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ("import ignn_triton, ignn_triton.kernels, ignn_triton.reference; "
           "print(ignn_triton.kernels.__file__); print(ignn_triton.reference.__file__)")


def _run(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, check=True).stdout.split()


def test_installed_package_maps_kernels_and_reference(tmp_path):
    kernels, reference = _run(IMPORTS, tmp_path)
    assert Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert Path(reference) == ROOT / "reference" / "__init__.py"


def test_built_wheel_holds_kernels_reference_and_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True)
    wheel, = (tmp_path / "dist").glob("ignn_triton-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    # -S-free isolation: put the wheel's copy first so the editable finder is not consulted
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path "
            "if 'editable' not in type(f).__module__]; " + IMPORTS +
            "; from importlib import resources; "
            "print(resources.files('ignn_triton').joinpath('data/astronaut.png').is_file()); "
            "import ignn_triton; print(ignn_triton.checkpoint.builtin_weights())")
    kernels, reference, has_image, weights = _run(code, tmp_path, env)
    assert Path(kernels).is_relative_to(target) and Path(reference).is_relative_to(target)
    assert has_image == "True" and Path(weights).is_relative_to(target)
    assert Path(weights).with_name("MODEL_CARD.md").is_file()


def test_runs_on_cpu_without_triton(tmp_path):
    code = ("import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
            "import torch, ignn_triton\n"
            "assert not ignn_triton.kernels.HAS_TRITON\n"
            "m = ignn_triton.IGNN(scale=2, n_feats=4, n_resblocks=2, window=4).eval()\n"
            "print(tuple(m(torch.rand(1, 3, 9, 7)).shape))")
    assert _run(code, tmp_path) == ["(1,", "3,", "18,", "14)"]


def test_triton_is_an_extra_not_a_dependency():
    """A CPU install stays lean (no 1 GB triton the CPU path never uses); [gpu] and [test]
    bring it (CUDA builds of torch on Linux bring their own)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.split(";")[0].strip().startswith("triton")]
    for extra in ("gpu", "test"):
        assert any(d.startswith("triton") for d in project["optional-dependencies"][extra])
