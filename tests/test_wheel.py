"""The wheel, as `pip install qwen-vl-serve` installs it: what the benchmarks need (the reference
the baseline server runs, the checkpoint writers) ships in the package, so `compare` and its
baseline import from the wheel alone, neither from this repository nor from the editable install."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each qwen_vl module the import loaded, and its file.
LOADED = """
import sys

import qwen_vl.api.app
import qwen_vl.benchmarks.baseline_server
import qwen_vl.benchmarks.compare

for name, module in sorted(sys.modules.items()):
    if name.partition(".")[0] in ("qwen_vl", "tests"):
        print(name, module.__file__)
"""


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of this tree's sources (the build writes nothing into the
    tree), unpacked as pip installs a pure-Python wheel: the folder to put on sys.path."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT / "qwen_vl", source / "qwen_vl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(root / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = (root / "dist").glob("qwen_vl_serve-*.whl")
    site = root / "site-packages"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_the_wheel_holds_every_file_of_the_package(installed_wheel):
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qwen_vl").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    in_wheel = {p.relative_to(installed_wheel).as_posix() for p in (installed_wheel / "qwen_vl").rglob("*") if p.is_file()}
    assert in_tree - in_wheel == set()


def test_the_server_compare_and_its_baseline_import_from_the_installed_wheel(installed_wheel, tmp_path):
    # Run outside the repository, the wheel first on the path (before the editable install's
    # finder, which comes after every path entry).
    done = subprocess.run([sys.executable, "-c", LOADED], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(installed_wheel)})
    assert done.returncode == 0, done.stderr[-5000:]
    loaded = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert {"qwen_vl.api.app", "qwen_vl.api.routes.chat", "qwen_vl.benchmarks.baseline_server",
            "qwen_vl.benchmarks.compare", "qwen_vl.testing.reference"} <= loaded.keys()
    assert not [name for name in loaded if name.partition(".")[0] == "tests"]
    for name, file in loaded.items():
        assert Path(file).is_relative_to(installed_wheel), (name, file)
