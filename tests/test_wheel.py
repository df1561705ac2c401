"""The package runs without the repository around it: a wheel built from the tree, unpacked into
a folder of its own (a non-editable install), finds its recipes and runs from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in ("musicvae", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # setuptools' PEP 517 backend directly: no pip, no network, no build isolation.
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                            f"print(b.build_wheel({str(tmp / 'dist')!r}))"],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = tmp / "dist" / build.stdout.strip().splitlines()[-1]
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "musicvae = musicvae.commands:main" in archive.read(entry_points).decode()
    assert any(n == "musicvae/configs/quickstart.yaml" for n in names), names
    return site


def test_installed_package_prints_the_quickstart_config_from_anywhere(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    probe = subprocess.run([sys.executable, "-c", "import musicvae; print(musicvae.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.stdout.startswith(str(installed)), probe.stdout + probe.stderr
    # The default recipe of a bare `musicvae fit` is the wheel's copy of configs/quickstart.yaml.
    found = subprocess.run([sys.executable, "-c", "from musicvae.training.cli import DEFAULT_CONFIG; print(DEFAULT_CONFIG)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    default = Path(found.stdout.strip())
    assert default.is_relative_to(installed) and default.read_text() == (REPO / "configs" / "quickstart.yaml").read_text()
    for args in (["--print_config"], ["--config", str(default), "--print_config"]):
        run = subprocess.run([sys.executable, "-m", "musicvae", "fit", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        printed = yaml.safe_load(run.stdout)
        assert {"model", "data", "trainer", "checkpoint_dir"} <= set(printed)
    quickstart = yaml.safe_load(default.read_text())
    assert printed["model"]["latent_dim"] == quickstart["model"]["latent_dim"]
    assert printed["checkpoint_dir"] == quickstart["checkpoint_dir"]
