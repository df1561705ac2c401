"""Every command of the README before the `musicvae` command existed still parses, through the
same entry points the scripts/ shims call, with the same meaning (renamed flags included).

The commands are parsed, not run: running them is what the end-to-end tests of each command
do. The resume commands (`--ckpt_path .../last.ckpt`, with a new lr, beta or recipe) are run
for real by tests/training/test_cli.py and test_checkpoints.py on a tiny run.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conftest import REPO

#: The README's commands as they were (the `python scripts/X.py` part dropped), with its
#: placeholder folders. Training: LightningCLI; the rest: `musicvae X`.
OLD_TRAINING = [
    "--config configs/recommended.yaml --trainer.max_epochs 40",
    "",
    "--config configs/improved.yaml",
    "--config configs/standard.yaml",
    "--config configs/improved.yaml --data.data_dir MELS",
    "--config configs/improved.yaml --data.data_dir MUSIC",
    "--config configs/improved.yaml --data.augment.gain_db 6 --data.augment.freq_shift 2 "
    "--data.augment.mix_prob 0.5 --data.augment.mix_gain_db 6",
]
OLD_COMMANDS = [
    ("checkpoints", "CKPT_DIR"),
    ("reliability", "--kills 20"),
    ("bench-prepare", ""),
    ("prepare", "MUSIC --cache_dir CACHE"),
    ("evaluate", "--ckpt_path CKPT --out REPORTS"),
    ("evaluate", "--ckpt_path CKPT --data_dir MUSIC --out REPORTS"),
    ("benchmark-quality", "--train_dir MUSIC --test_dir MELS --config configs/improved.yaml --minutes 10 "
                          "--out REPORTS -- --model.latent_dim 128"),
    ("benchmark-quality", "--train_dir MUSIC --test_dir MELS --config configs/recommended.yaml --minutes 10 "
                          "--out REPORTS --references"),
    ("linear-codes", "--train_dir MUSIC --test_dir MELS --seed 123"),
    ("compare", "--out REPORTS"),
    ("compare", "--out REPORTS --data_dir MUSIC --test_dir MELS"),
    ("generate", "reconstruct --ckpt_path CKPT song.ogg --out song_vae.wav"),
    ("generate", "sample --ckpt_path CKPT -n 8 --out samples/ --temperature 1.0 --seed 0"),
    ("generate", "interpolate --ckpt_path CKPT a.ogg b.flac --steps 8 --out morph/ --offset_a 30 --offset_b 10"),
    ("generate", "ceiling song.ogg"),
    ("export", "--ckpt_path CKPT --out model.pt"),
    ("bench", "--data_dir MUSIC --cache_dir CACHE --out bench.json"),
    ("bench", "--quick"),
    ("bench", "--device cuda"),
]


class Parsed(Exception):
    """Raised in place of running a command, carrying what it parsed."""


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    for name in ("mels", "music", "cache", "reports", "ckpt"):
        (tmp_path / name).mkdir()
    return {"MELS": str(tmp_path / "mels"), "MUSIC": str(tmp_path / "music"), "CACHE": str(tmp_path / "cache"),
            "REPORTS": str(tmp_path / "reports"), "CKPT_DIR": str(tmp_path / "ckpt"),
            "CKPT": str(tmp_path / "ckpt" / "best.ckpt")}


def argv_of(line: str, places: dict[str, str]) -> list[str]:
    return [places.get(word, word) for word in shlex.split(line)]


@pytest.mark.parametrize("line", OLD_TRAINING)
def test_old_training_commands_parse(line, places, monkeypatch):
    from musicvae.training.cli import cli_main, with_default_subcommand

    monkeypatch.chdir(REPO)  # the README's configs/ paths are relative to the checkout
    args = with_default_subcommand(argv_of(line, places))
    assert args[0] == "fit"
    cli = cli_main(args[1:] + ["--data.cache_dir", places["CACHE"], "--trainer.logger", "false"], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("name, line", OLD_COMMANDS, ids=[f"{n}:{line[:40]}" for n, line in OLD_COMMANDS])
def test_old_commands_parse(name, line, places, monkeypatch, capsys):
    import importlib

    from musicvae.commands import COMMANDS
    from musicvae.commands import parsing

    module = importlib.import_module(COMMANDS[name].target.split(":")[0])
    real = parsing.parse_command

    def parse_only(parser, argv=None, renames=None):
        raise Parsed(real(parser, argv, renames))

    monkeypatch.setattr(module, "parse_command", parse_only)
    monkeypatch.chdir(REPO)
    with pytest.raises(Parsed) as parsed:
        module.main(argv_of(line, places))
    args = parsed.value.args[0]
    assert args is not None
    err = capsys.readouterr().err
    if name == "prepare":
        assert args.data.cache_dir == places["CACHE"] and "--cache_dir is now --data.cache_dir" in err
    if "--data_dir" in line and name == "evaluate":
        assert args.data.data_dir == places["MUSIC"] and "--data_dir is now --data.data_dir" in err
    expected = {  # one value per command, as the old script read it
        "checkpoints": ("checkpoint_dir", places["CKPT_DIR"]), "reliability": ("kills", 20),
        "export": ("ckpt_path", places["CKPT"]), "linear-codes": ("seed", 123),
        "compare": ("out", places["REPORTS"]),
    }
    if name in expected:
        key, value = expected[name]
        assert args[key] == value, (key, args[key])
    if name == "bench":
        assert args.device == ("cuda" if "cuda" in line else "cpu") and args.quick == ("--quick" in line)
    if name == "generate":
        chosen = args[args.command]
        if args.command == "interpolate":
            assert (chosen.offset_a, chosen.offset_b, chosen.steps, chosen.method) == (30.0, 10.0, 8, "slerp")
        if args.command == "sample":
            assert (chosen.n, chosen.temperature, chosen.seed) == (8, 1.0, 0)
    if name == "benchmark-quality":
        assert args.minutes == 10 and args.test_dir == places["MELS"]
