"""The package runs without the repository around it: a wheel built from the tree, unpacked into
a folder of its own (a non-editable install), finds its recipes and runs from anywhere."""

from __future__ import annotations

import json
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


#: In one process of the installed package: where musicvae and its default recipe are, and
#: `musicvae fit --print_config` with the default recipe given explicitly.
FROM_THE_WHEEL = """
import contextlib, io, json, musicvae
from musicvae.commands import main
from musicvae.training.cli import DEFAULT_CONFIG
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    try:
        status = main(["fit", "--config", str(DEFAULT_CONFIG), "--print_config"])
    except SystemExit as stop:
        status = stop.code
print(json.dumps({"file": musicvae.__file__, "default": str(DEFAULT_CONFIG), "status": status,
                  "printed": printed.getvalue()}))
"""


def test_installed_package_prints_the_quickstart_config_from_anywhere(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    probe = subprocess.run([sys.executable, "-c", FROM_THE_WHEEL], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(installed)), found
    # The default recipe of a bare `musicvae fit` is the wheel's copy of configs/quickstart.yaml.
    default = Path(found["default"])
    assert default.is_relative_to(installed) and default.read_text() == (REPO / "configs" / "quickstart.yaml").read_text()
    assert found["status"] in (0, None)
    explicit = yaml.safe_load(found["printed"])
    quickstart = yaml.safe_load(default.read_text())
    assert {"model", "data", "trainer", "checkpoint_dir"} <= set(explicit)
    assert explicit["model"]["init_args"]["latent_dim"] == quickstart["model"]["latent_dim"]
    assert explicit["checkpoint_dir"] == quickstart["checkpoint_dir"]
    # `python -m musicvae`, as the console entry point runs it from the installed package.
    run = subprocess.run([sys.executable, "-m", "musicvae", "fit", "--print_config"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {"model", "data", "trainer", "checkpoint_dir"} <= set(yaml.safe_load(run.stdout))
