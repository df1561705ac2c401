"""Export: the TorchScript program matches the checkpoint's module, carries its mel settings, and
runs in a Python that cannot import musicvae."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import load_script
from musicvae.training.checkpoints import DATA_STATE_KEY
from musicvae.inference.export import MEL_SETTINGS_FILE, METADATA_FILE
from musicvae.inference.generation import load_generation_model

REPO = Path(__file__).resolve().parents[2]
# torch warns on every torch.jit call (DeprecationWarning up to 2.14, FutureWarning in 2.15); musicvae.inference.export
# explains why TorchScript is still the default format.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")


export_script = load_script("export")

# Runs with -I -S: no user site, no PYTHONPATH, no site-packages .pth files, so the editable
# install's finder never loads. torch's folder is put back by hand; musicvae's is not.
FRESH_PROCESS = """
import sys
sys.path.append(sys.argv[1])
try:
    import musicvae
except ModuleNotFoundError:
    pass
else:
    sys.exit("musicvae was importable: " + musicvae.__file__)
import json, warnings
warnings.simplefilter("ignore", DeprecationWarning)
import torch
extra = {"mel_settings.json": ""}
program = torch.jit.load(sys.argv[2], _extra_files=extra)
inputs = torch.load(sys.argv[3])
mu = program.encode(inputs["log_mel"])
torch.save({"mu": mu, "decoded": program.decode(inputs["z"]), "round_trip": program(inputs["log_mel"]),
            "mel": json.loads(extra["mel_settings.json"])}, sys.argv[4])
"""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    ckpt = tiny_run["ckpt_dir"] / "best.ckpt"
    out = tmp_path_factory.mktemp("export") / "model.pt"
    assert export_script.main(["--ckpt_path", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


def _expected(ckpt: Path, log_mel: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    model = load_generation_model(ckpt)
    with torch.no_grad():
        mu = model.encode_windows(model.normalize(log_mel))
        return {"mu": mu, "decoded": model.denormalize(model.decode_windows(z)),
                "round_trip": model.denormalize(model.decode_windows(mu))}


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 1, 32, 32, generator=generator) * 2 - 4, torch.randn(3, 8, generator=generator)


def test_exported_program_matches_the_checkpoint(exported):
    ckpt, path = exported
    extra = {MEL_SETTINGS_FILE: "", METADATA_FILE: ""}
    program = torch.jit.load(str(path), _extra_files=extra)
    log_mel, z = _inputs()
    expected = _expected(ckpt, log_mel, z)
    assert torch.allclose(program.encode(log_mel), expected["mu"], atol=1e-5)
    assert torch.allclose(program.decode(z), expected["decoded"], atol=1e-4)
    assert torch.allclose(program(log_mel), expected["round_trip"], atol=1e-4)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)[DATA_STATE_KEY]
    assert json.loads(extra[MEL_SETTINGS_FILE]) == state["mel"] == json.loads(program.mel_settings)
    metadata = json.loads(extra[METADATA_FILE])
    assert (metadata["n_mels"], metadata["frames"], metadata["latent_dim"]) == (32, 32, 8)
    assert metadata["mean"] == pytest.approx(state["mean"]) and program.std == pytest.approx(state["std"])
    with pytest.raises(Exception, match=r"expected log-mels of shape \(B, 1, 32, 32\)"):
        program.encode(torch.zeros(3, 32, 32))


@pytest.mark.slow
def test_exported_program_runs_without_musicvae(exported, tmp_path):
    ckpt, path = exported
    log_mel, z = _inputs(seed=2)
    torch.save({"log_mel": log_mel, "z": z}, tmp_path / "inputs.pt")
    site_packages = str(Path(torch.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-S", "-c", FRESH_PROCESS, site_packages, str(path),
                          str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    outputs = torch.load(tmp_path / "outputs.pt")
    expected = _expected(ckpt, log_mel, z)
    for name in ("mu", "decoded", "round_trip"):
        assert torch.allclose(outputs[name], expected[name], atol=1e-4), name
    assert outputs["mel"]["n_mels"] == 32


def test_export_refuses_a_checkpoint_without_mel_settings(tiny_run, tmp_path, capsys):
    stripped = torch.load(tiny_run["ckpt_dir"] / "best.ckpt", map_location="cpu", weights_only=True)
    del stripped[DATA_STATE_KEY]["mel"]
    torch.save(stripped, tmp_path / "old.ckpt")
    assert export_script.main(["--ckpt_path", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("musicvae export: error: ") and "lacks ['mel']" in err
    assert not (tmp_path / "m.pt").exists()
    assert export_script.main(["--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_torchscript_export_prints_no_warnings(tiny_run, tmp_path, capsys):
    """The default format stays for one release, quietly: the command silences exactly torch's
    deprecation of torch.jit.script / torch.jit.save, and PortableVAE gives TorchScript nothing to warn about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert export_script.main(["--ckpt_path", str(tiny_run["ckpt_dir"] / "best.ckpt"),
                                   "--out", str(tmp_path / "m.pt")]) == 0
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    captured = capsys.readouterr()
    assert "Warning" not in captured.err and "--format pt2" in captured.out
