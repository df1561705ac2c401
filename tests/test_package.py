"""The package's face and shape: lazy imports, the `musicvae` command, the layout's one-way imports."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from helpers import run_command

PACKAGE = REPO / "musicvae"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, heavy", [
    ("musicvae.losses", ("lightning", "matplotlib", "torchaudio")),
    ("musicvae", ("lightning", "matplotlib", "torchaudio", "torch")),
    ("musicvae.models", ("lightning", "matplotlib", "torchaudio")),
    # torchmetrics itself imports matplotlib (for Metric.plot), so metrics is only Lightning-free.
    ("musicvae.metrics", ("lightning", "torchaudio")),
])
def test_light_modules_import_nothing_heavy(module, heavy):
    run = run_python(f"import sys, {module}\nprint(sorted(m for m in {heavy!r} if m in sys.modules))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_public_names_still_import_from_the_top():
    run = run_python("from musicvae import MusicVAEModule, MelDataModule, vae_loss, vae_loss_spectral, "
                     "create_frequency_weights, LinearCode, __version__\n"
                     "import musicvae\nprint(sorted(set(musicvae.__all__) - set(dir(musicvae))))\n"
                     "print(all(getattr(musicvae, name) is not None for name in musicvae.__all__))")
    assert run.returncode == 0, run.stderr
    missing, resolved = run.stdout.split("\n")[:2]
    assert missing == "[]" and resolved == "True"


def test_renamed_names_warn_and_still_work():
    import musicvae
    from musicvae.models.linear_codes import LinearCode

    with pytest.warns(DeprecationWarning, match="musicvae.LinearCode"):
        assert musicvae.PCA is LinearCode


def test_version_comes_from_the_package_metadata():
    import musicvae

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" in project and musicvae.__version__ == project["version"]


def test_help_lists_every_subcommand_and_imports_no_command():
    run = run_python("import sys\nfrom musicvae.commands import main\nmain(['--help'])\n"
                     "print('IMPORTED', sorted(m for m in sys.modules if m.startswith(('musicvae.benchmarks', "
                     "'musicvae.training', 'lightning', 'torch'))))")
    assert run.returncode == 0, run.stderr
    from musicvae.commands import COMMANDS

    for name in COMMANDS:
        assert f"  {name} " in run.stdout
    assert "IMPORTED []" in run.stdout


def test_unknown_subcommand_names_the_closest():
    run = run_command("musicvae", ["evalute"])
    assert run.returncode == 2
    assert "unknown command 'evalute'; did you mean 'evaluate'?" in run.stderr


def test_every_registered_command_resolves():
    import importlib

    from musicvae.commands import COMMANDS

    for name, command in COMMANDS.items():
        module, function = command.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_product_never_imports_benchmarks_and_networks_never_import_lightning():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        imports = _imports(path)
        if not rel.startswith("benchmarks/"):
            assert not any(m.startswith("musicvae.benchmarks") for m in imports), rel
        if rel.startswith("models/") or rel in ("losses.py", "metrics.py"):
            assert not any(m.split(".")[0] in ("lightning", "matplotlib") for m in imports), rel
            assert not any(m.startswith("musicvae.training") for m in imports), rel


def test_pyproject_lists_every_subpackage():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert listed == found | {"musicvae.configs"}


def test_the_package_top_holds_at_most_eight_modules_and_io_depends_on_errors_only():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    for path in (PACKAGE / "io").glob("*.py"):
        ours = {m for m in _imports(path) if m.startswith("musicvae") and not m.startswith("musicvae.io")}
        assert ours <= {"musicvae.errors"}, (path.name, ours)


#: The most lines a product file may hold: past ~400 a file usually holds two concepts.
MAX_LINES = 450
#: The core reads top to bottom: the training module and the command line each in one short file.
CORE_LINES = {"musicvae/training/module.py": 320, "musicvae/training/cli.py": 320}
#: The most settings the VAE module takes (plain values; groups such as `kl` count once).
MAX_MODULE_ARGUMENTS = 30


def test_no_product_file_is_over_450_lines():
    lines = {path.relative_to(REPO).as_posix(): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    over = sorted(f"{rel} ({n} lines)" for rel, n in lines.items() if n > CORE_LINES.get(rel, MAX_LINES))
    assert not over, f"split each into files of one concept: {', '.join(over)}"


def test_the_vae_module_takes_at_most_30_plain_settings():
    import inspect

    from musicvae.training.module import MusicVAEModule

    settings = [p for p in inspect.signature(MusicVAEModule.__init__).parameters if p != "self"]
    assert len(settings) <= MAX_MODULE_ARGUMENTS, settings


#: Names that moved out of modules split into files of one concept (docs/migration.md): each still
#: imports from the module that defined it before.
MOVED_OUT = {
    "musicvae.audio.mel": ("MelSettings", "MEL_SIDECAR", "read_mel_sidecar", "write_mel_sidecar", "AUDIO_SUFFIXES",
                           "AudioError", "decode_blocks", "decode_audio"),
    "musicvae.data.cache": ("VANISHED", "init_worker_process"),
    "musicvae.data.segments": ("ARRAY_SUFFIXES", "MelSource", "load_mel_array", "scan_mel_file", "summarise_mel",
                               "window_starts"),
    "musicvae.data.datamodule": ("find_array_files",),
}


@pytest.mark.parametrize("module", sorted(MOVED_OUT))
def test_names_moved_out_of_a_split_module_still_import_from_it(module):
    import importlib

    missing = [name for name in MOVED_OUT[module] if not hasattr(importlib.import_module(module), name)]
    assert not missing, f"{module} no longer provides {missing}"
