"""Where commands write (musicvae/io/outputs.py), through `generate`, `export`, `evaluate` and `predict`
called in-process: an output that is an input is refused even with --force; an existing file is
replaced only with --force; an output that cannot be written is refused before the checkpoint is
read (the refusals below hold with a checkpoint that is not one); a write the machine refuses
midway stops with one line and exit status 4. Every refusal is one line, without a traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import load_script, write_mel_folder
from musicvae.errors import ConfigError
from musicvae.io.outputs import check_output_file, check_output_folder

generate, export, evaluate = (load_script(name) for name in ("generate", "export", "evaluate"))


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> str:
    return str(tiny_run["ckpt_dir"] / "best.ckpt")


@pytest.fixture
def place(tmp_path) -> dict[str, Path]:
    """A recording, a regular file, and a "checkpoint" that is not one (a refusal must come first)."""
    song = tmp_path / "song.wav"
    sf.write(song, 0.3 * np.sin(np.arange(11025) * 2 * np.pi * 440 / 22050).astype(np.float32), 22050)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "bogus.ckpt").write_text("not a checkpoint")
    return {"root": tmp_path, "song": song, "file": tmp_path / "a_file", "bogus": tmp_path / "bogus.ckpt"}


def unwritable_folder() -> Path:
    """A folder even root may not write into (procfs refuses everyone); skipped where there is none."""
    folder = Path("/proc/self")
    if not folder.is_dir() or os.access(folder, os.W_OK):
        pytest.skip("no folder here that refuses root's writes")
    return folder


def one_line(capsys, status: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    assert status == expected, err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("musicvae")
    return line


def test_the_checks_refuse_inputs_existing_files_folders_and_unwritable_places(tmp_path):
    existing = tmp_path / "old.wav"
    existing.write_bytes(b"old")
    with pytest.raises(ConfigError, match="old.wav: already exists; pass --force to replace it"):
        check_output_file(existing, "--out")
    assert check_output_file(existing, "--out", force=True) == existing
    os.link(existing, tmp_path / "same.wav")  # the input under another name
    with pytest.raises(ConfigError, match="is the input .*old.wav.*--force never replaces an input"):
        check_output_file(tmp_path / "same.wav", "--out", inputs=[existing], force=True)
    (tmp_path / "folder.wav").mkdir()
    with pytest.raises(ConfigError, match="is a folder, where this command writes a file"):
        check_output_file(tmp_path / "folder.wav", "--out", force=True)
    with pytest.raises(ConfigError, match="because .*old.wav is a regular file, not a folder"):
        check_output_folder(existing / "report", ["report.md"], "--out")
    with pytest.raises(ConfigError, match=r"already holds a.wav, b.wav, c.wav and 1 more, which this command writes"):
        for name in "abcd":
            (tmp_path / "many" / f"{name}.wav").parent.mkdir(exist_ok=True)
            (tmp_path / "many" / f"{name}.wav").write_bytes(b"")
        check_output_folder(tmp_path / "many", [f"{name}.wav" for name in "abcde"], "--out")
    with pytest.raises(ConfigError, match="is a folder this user may not write into"):
        check_output_file(unwritable_folder() / "x.wav", "--out")
    assert not (tmp_path / "report").exists()  # nothing created by a check


@pytest.mark.parametrize("case", ["input", "suffix", "under_a_file", "unwritable", "sample_file", "interpolate"])
def test_generate_refuses_before_reading_the_checkpoint(case, place, capsys):
    song, bogus = str(place["song"]), str(place["bogus"])
    argv, says = {
        "input": (["reconstruct", song, "--out", song, "--force"], "is the input"),
        "suffix": (["reconstruct", song, "--out", str(place["root"] / "x.txt")], "not the name of an audio file"),
        "under_a_file": (["reconstruct", song, "--out", str(place["file"] / "x.wav")], "is a regular file, not a folder"),
        "unwritable": (["sample", "--out", str(unwritable_folder() / "s")] if case == "unwritable" else [], "may not write"),
        "sample_file": (["sample", "--out", str(place["file"])], "is a regular file, not a folder"),
        "interpolate": (["interpolate", song, song, "--out", str(place["root"]), "--steps", "2"], None),
    }[case]
    if case == "interpolate":  # a file of an earlier morph is in the way
        (place["root"] / "morph.wav").write_bytes(b"earlier")
        says = "already holds morph.wav, which this command writes; pass --force"
    before = place["song"].read_bytes()
    assert says in one_line(capsys, generate.main([*argv, "--ckpt_path", bogus]))
    assert place["song"].read_bytes() == before


def test_generate_replaces_its_own_files_only_with_force(ckpt, place, capsys):
    out = place["root"] / "samples"
    out.mkdir()
    (out / "sample_00.wav").write_bytes(b"earlier")
    argv = ["sample", "--ckpt_path", ckpt, "-n", "1", "--griffin_lim_iters", "1", "--out", str(out)]
    assert "already holds sample_00.wav" in one_line(capsys, generate.main(argv))
    assert (out / "sample_00.wav").read_bytes() == b"earlier"
    assert generate.main([*argv, "--force"]) == 0
    assert sf.read(out / "sample_00.wav")[0].size > 0 and (out / "samples.png").is_file()


def test_export_refuses_the_checkpoint_and_an_existing_file_unless_forced(ckpt, place, capsys):
    assert "is the input" in one_line(capsys, export.main(["--ckpt_path", ckpt, "--out", ckpt, "--force"]))
    program = place["root"] / "model.pt"
    program.write_bytes(b"earlier")
    assert "model.pt: already exists" in one_line(capsys, export.main(["--ckpt_path", str(place["bogus"]),
                                                                       "--out", str(program)]))
    assert "is a regular file, not a folder" in one_line(capsys, export.main(
        ["--ckpt_path", str(place["bogus"]), "--out", str(place["file"] / "m.pt")]))
    assert export.main(["--ckpt_path", ckpt, "--out", str(program), "--force"]) == 0
    assert torch.jit.load(str(program)).latent_dim == 8


def test_evaluate_refuses_unwritable_and_used_report_folders(ckpt, place, capsys):
    bogus = ["--ckpt_path", str(place["bogus"])]
    assert "is a regular file, not a folder" in one_line(capsys, evaluate.main([*bogus, "--out", str(place["file"])]))
    assert "may not write into" in one_line(capsys, evaluate.main([*bogus, "--out", str(unwritable_folder() / "r")]))
    report = place["root"] / "report"
    report.mkdir()
    (report / "report.md").write_text("an earlier report")
    assert "already holds report.md" in one_line(capsys, evaluate.main([*bogus, "--out", str(report)]))
    assert (report / "report.md").read_text() == "an earlier report"
    assert evaluate.main(["--ckpt_path", ckpt, "--out", str(report), "--force"]) == 0
    assert (report / "metrics.json").is_file() and "Evaluation of" in (report / "report.md").read_text()


def test_a_write_refused_midway_is_one_line_and_exit_4(ckpt, place, capsys, monkeypatch):
    written = []

    def full_disk_after_one(file, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(file)
        return real_write(file, *args, **kwargs)

    real_write = sf.write
    monkeypatch.setattr(sf, "write", full_disk_after_one)
    out = place["root"] / "samples"
    line = one_line(capsys, generate.main(["sample", "--ckpt_path", ckpt, "-n", "2", "--griffin_lim_iters", "1",
                                           "--out", str(out)]), expected=4)
    assert "sample_01.wav: not written: no space left on the device" in line and "nothing is left in its place" in line
    assert sorted(p.name for p in out.iterdir()) == ["sample_00.wav"]  # no temporary file left behind


# --- predict (LightningCLI) ----------------------------------------------------------------------

@pytest.fixture
def predict(ckpt, tmp_path):
    from musicvae.training.cli import subcommand_main

    folder = tmp_path / "mels"
    write_mel_folder(folder, n_files=2, frames=40, n_mels=32)

    def run(predict_dir: Path, *extra: str) -> int:
        return subcommand_main(["predict", "--ckpt_path", ckpt, "--data.data_dir", str(folder), "--predict_dir",
                                str(predict_dir), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                                *extra], program="musicvae")

    return run


def test_predict_refuses_a_predict_dir_it_cannot_use(predict, place, capsys):
    assert "is a regular file, not a folder" in one_line(capsys, predict(place["file"]))
    assert "may not write into" in one_line(capsys, predict(unwritable_folder() / "codes"))
    codes = place["root"] / "codes"
    codes.mkdir()
    (codes / "track_01.npy.pt").write_bytes(b"earlier")
    assert "already holds track_01.npy.pt, which this command writes; pass --force" in one_line(capsys, predict(codes))
    assert (codes / "track_01.npy.pt").read_bytes() == b"earlier"
    assert predict(codes, "--force") == 0
    assert torch.load(codes / "track_01.npy.pt", weights_only=True)["source"] == "track_01.npy"


def test_predict_stops_with_exit_4_when_a_write_is_refused(predict, place, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    line = one_line(capsys, predict(place["root"] / "codes"), expected=4)
    assert "track_00.npy.pt: not written: no space left on the device" in line
