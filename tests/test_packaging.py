"""How the package installs and imports: the repo root shadows no installed distribution, `lit_mamba2.kernels` and
`lit_mamba2.evals` (the root folders kernels/ and evals/) import from an editable install and from a built wheel, and
the public API imports light."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd, env=None) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_repo_root_does_not_shadow_the_installed_kernels_package():
    # `python -c` and `python -m pytest` put the working directory first on sys.path, as a user in the checkout has it
    # the test extra installs `kernels` (transformers needs it too)
    installed = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    found = run_python("import kernels; print(kernels.__file__)", cwd=ROOT)
    assert Path(found).resolve() == installed, f"`import kernels` from the repo root found {found}"
    run_python("from transformers import Mamba2ForCausalLM, Mamba2Config; "
               "Mamba2ForCausalLM(Mamba2Config(num_heads=2, head_dim=8, hidden_size=16, num_hidden_layers=1, "
               "vocab_size=32, n_groups=1, state_size=4, expand=1))", cwd=ROOT)


def test_no_root_folder_is_a_regular_package():
    regular = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()
               and not p.is_symlink() and p.name not in ("lit_mamba2", "tests")]
    assert regular == [], f"root folders importable as top-level packages: {regular}"


def test_public_api_imports_without_triton_or_lightning(tmp_path):
    loaded = run_python(
        "import sys\n"
        "from lit_mamba2 import Mamba2Config, Mamba2LMHeadModel, ssd, generate\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'triton', 'lightning', 'pytorch_lightning', "
        "'lightning_fabric', 'transformers', 'jsonargparse'}))", cwd=tmp_path)
    assert loaded == "[]"


def _editable_install() -> bool:
    # asked from outside the checkout: there, an egg-info folder left by a build would answer for the installed one
    direct_url = run_python("from importlib import metadata\n"
                            "try: print(metadata.distribution('lit-mamba2').read_text('direct_url.json') or '{}')\n"
                            "except metadata.PackageNotFoundError: print('{}')", cwd=ROOT.parent)
    return json.loads(direct_url).get("dir_info", {}).get("editable", False)


@pytest.mark.skipif(not _editable_install(), reason="lit-mamba2 is not installed editable here")
def test_editable_install_imports_kernels_and_evals_from_the_root_folders(tmp_path):
    found = run_python("import lit_mamba2.kernels.ssd as k, lit_mamba2.evals.paper as e; "
                       "print(k.__file__); print(e.__file__)", cwd=tmp_path).splitlines()
    assert Path(found[0]).resolve() == ROOT / "kernels" / "ssd.py"
    assert Path(found[1]).resolve() == ROOT / "evals" / "paper.py"


def test_built_wheel_holds_and_imports_kernels_and_evals(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "lit_mamba2", "kernels", "evals"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("lit_mamba2-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in sorted(p.name for p in (ROOT / "kernels").glob("*.py")):
        assert f"lit_mamba2/kernels/{module}" in names
    assert "lit_mamba2/evals/paper.py" in names
    for package in sorted(p.parent.name for p in (ROOT / "lit_mamba2").glob("*/__init__.py")):
        assert f"lit_mamba2/{package}/__init__.py" in names, f"subpackage lit_mamba2.{package} is not in the wheel"
    assert not any(n.startswith(("kernels/", "evals/", "tests/")) for n in names), "a root folder is top-level"

    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)  # what `pip install` puts in site-packages, without touching this environment
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = run_python("import lit_mamba2, lit_mamba2.kernels.ssd as k, lit_mamba2.evals.paper as e; "
                       "print(lit_mamba2.__file__); print(k.__file__); print(e.__file__)", cwd=tmp_path, env=env)
    for line in found.splitlines():
        assert Path(line).resolve().is_relative_to(target), line
