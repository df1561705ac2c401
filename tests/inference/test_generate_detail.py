"""Generated detail through generation (musicvae.inference.detail): strength 0 is today's output bit for
bit, a seed fixes the detail, and `generate --detail` takes a strength in [0, 1] or says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from conftest import load_script
from musicvae.data.segments import segment_starts
from musicvae.inference.generation import load_generation_model, overlap_add, reconstruct_mel, sample_files

generate = load_script("generate")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> Path:
    return tiny_run["ckpt_dir"] / "best.ckpt"


@pytest.fixture(scope="module")
def detailed(ckpt):
    return load_generation_model(ckpt, detail=0.5)


def piece() -> torch.Tensor:
    return torch.randn(32, 100, generator=torch.Generator().manual_seed(0)) - 4.0  # (n_mels, T) log-mel


def test_strength_zero_is_todays_reconstruction_bit_for_bit(ckpt):
    model = load_generation_model(ckpt, detail=0.0)
    assert model.detail is None
    log_mel = piece()
    starts = segment_starts(log_mel.shape[-1], model.frames, model.frames // 2)
    x = torch.stack([model.normalize(log_mel[:, s:s + model.frames]) for s in starts])[:, None]
    with torch.no_grad():
        today = model.denormalize(overlap_add(model.module.vae.decode(model.module.vae.encode(x)[0])[:, 0], starts,
                                              log_mel.shape[-1]))
    assert torch.equal(reconstruct_mel(model, log_mel), today)


def test_detail_is_fitted_from_the_training_windows_and_fixed_by_its_seed(ckpt, detailed):
    plain = reconstruct_mel(load_generation_model(ckpt), piece())
    a, b = (reconstruct_mel(detailed, piece(), seed=3) for _ in range(2))
    other = reconstruct_mel(detailed, piece(), seed=4)
    assert torch.equal(a, b) and not torch.equal(a, other)
    added = (a - plain) / detailed.std  # normalised units: the detail itself, at strength 0.5
    assert torch.isfinite(added).all() and float(added.abs().mean()) > 0
    # Its energy follows the detail model: 0.25 x the predicted energy of the training codes' scale, within
    # a factor of 3 (the piece is random noise, not training music; the exact law is tested in tests/models).
    codes = detailed.encode_windows(detailed.normalize(piece()[:, :32])[None, None])
    expected = 0.25 * float(detailed.detail.model.bin_scale(detailed.detail.features(codes)).pow(2).mean())
    assert expected / 3 < float(added.pow(2).mean()) < 3 * expected


def test_generate_sample_with_detail_end_to_end(ckpt, tmp_path, capsys):
    argv = ["sample", "--ckpt_path", str(ckpt), "-n", "2", "--seed", "1", "--griffin_lim_iters", "4"]
    assert generate.main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert generate.main([*argv, "--out", str(tmp_path / "detail"), "--detail", "1"]) == 0
    plain, detail = (sf.read(tmp_path / d / "sample_00.wav")[0] for d in ("plain", "detail"))
    assert plain.shape == detail.shape and not (plain == detail).all()
    assert generate.main([*argv, "--out", str(tmp_path / "bad"), "--detail", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--detail 1.5" in err and "[0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(Exception, match="detail strength"):
        sample_files(ckpt, tmp_path / "bad2", n=1, detail=-0.1)


def test_detail_without_the_training_music_is_refused_in_one_line(ckpt, tmp_path, capsys):
    import yaml

    from musicvae.training.checkpoints import RUN_CONFIG_KEY

    state = torch.load(ckpt, weights_only=True)
    config = yaml.safe_load(state[RUN_CONFIG_KEY])
    config["data"].update(data_dir=str(tmp_path / "gone"), synthetic_pieces=0)
    state[RUN_CONFIG_KEY] = yaml.safe_dump(config)
    torch.save(state, tmp_path / "moved.ckpt")
    argv = ["sample", "--ckpt_path", str(tmp_path / "moved.ckpt"), "-n", "1", "--griffin_lim_iters", "4"]
    assert generate.main([*argv, "--out", str(tmp_path / "plain")]) == 0  # no detail: the music is not needed
    assert generate.main([*argv, "--out", str(tmp_path / "detail"), "--detail", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--detail" in err and "training music" in err and str(tmp_path / "gone") in err and "Traceback" not in err


def test_detail_source_picks_the_texture_and_a_bad_one_is_refused(ckpt, tmp_path, capsys):
    gaussian = load_generation_model(ckpt, detail=0.5, detail_source="gaussian")
    assert gaussian.detail.model.source == "gaussian" and len(gaussian.detail.model.exemplars) == 0
    default = load_generation_model(ckpt, detail=0.5)
    assert default.detail.model.source == "exemplar" and len(default.detail.model.exemplars) > 0
    assert not torch.equal(reconstruct_mel(gaussian, piece(), seed=3), reconstruct_mel(default, piece(), seed=3))
    argv = ["sample", "--ckpt_path", str(ckpt), "-n", "1", "--griffin_lim_iters", "4", "--detail", "0.5"]
    with pytest.raises(SystemExit) as exit_info:  # the parser's own refusal: status 2, one message
        generate.main([*argv, "--out", str(tmp_path / "bad"), "--detail_source", "pink"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--detail_source" in err and "pink" in err and "Traceback" not in err and not (tmp_path / "bad").exists()
