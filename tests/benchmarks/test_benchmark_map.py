"""`musicvae benchmark-map`: linear codes at each size and trained checkpoints, scored on one held-out folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_script, write_mel_folder
from musicvae.benchmarks.latent_map import checkpoint_decoder, map_figure
from musicvae.data.segments import Normalizer


def folders(tmp_path: Path, n_mels: int = 32) -> tuple[Path, Path]:
    """12 training arrays (4 windows of 32 frames each) and 4 held-out ones (3 windows each), as .npy."""
    write_mel_folder(tmp_path / "train", n_files=12, frames=128, n_mels=n_mels, seed=0)
    write_mel_folder(tmp_path / "test", n_files=4, frames=96, n_mels=n_mels, seed=1, offset=0.3)
    return tmp_path / "train", tmp_path / "test"


def run(tmp_path: Path, *extra: str, n_mels: int = 32) -> int:
    train, test = folders(tmp_path, n_mels)
    return load_script("benchmark_map").main([
        "--train_dir", str(train), "--test_dir", str(test), "--cache_dir", str(tmp_path / "cache"), "--frames", "32",
        "--data.mel.n_mels", str(n_mels), "--out", str(tmp_path / "map"), *extra])


def test_the_map_scores_codes_and_checkpoints_on_the_same_windows(tiny_run, tmp_path, capsys):
    from musicvae.inference.loading import datamodule_for, load_module

    ckpt = tiny_run["ckpt_dir"] / "last.ckpt"
    assert run(tmp_path, "--sizes", "4", "--reference_size", "2", "--two_sample_seeds", "1",
               "--ckpt", f"tiny={ckpt}", "--ckpt", f"again={ckpt}") == 0
    assert "| checkpoint | latent size | global step | MSE |" in capsys.readouterr().out
    data = json.loads((tmp_path / "map" / "results.json").read_text())
    assert data["command"].startswith("musicvae benchmark-map --train_dir ") and "tiny=" in data["command"]
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["dct-4", "pca-4", "tiny", "again"]
    module, stored = load_module(ckpt)
    assert rows["tiny"]["latent_size"] == int(module.hparams.latent_dim) == 8
    assert rows["tiny"]["global_step"] == stored["global_step"] > 0
    # PCA at the reference size and at the checkpoint's is fitted for the ratios, without a two-sample test.
    pca = {r["latent_size"]: r for r in data["pca_references"]}
    assert set(pca) == {2, 8} and not any("two_sample" in r for r in pca.values())
    assert rows["tiny"]["mse_over_pca_same_size"] == pytest.approx(rows["tiny"]["mse"] / pca[8]["mse"])
    assert rows["dct-4"]["mse_over_pca_reference"] == pytest.approx(rows["dct-4"]["mse"] / pca[2]["mse"])
    assert rows["pca-4"]["mse_over_pca_same_size"] == pca[2]["mse_over_pca_reference"] == 1.0
    assert pca[8]["mse"] <= rows["pca-4"]["mse"] * (1 + 1e-6) <= pca[2]["mse"] * (1 + 1e-6)  # nested codes
    # The checkpoint sees the windows in its own normalisation: its MSE is evaluate's, rescaled to these units.
    test = datamodule_for(stored, data_dir=str(tmp_path / "test"), cache_dir=str(tmp_path / "cache"))
    test.prepare_data()
    held_out = test.evaluation_set("all")
    windows = torch.stack([held_out[i] for i in range(len(held_out))])
    with torch.no_grad():
        own = float((module.reconstruct(windows) - windows).pow(2).mean())
    scale = (test.normalizer.std / data["data"]["normalization"]["std"]) ** 2
    assert test.normalizer.std != pytest.approx(data["data"]["normalization"]["std"], rel=1e-3)  # a real conversion
    assert rows["tiny"]["mse"] == pytest.approx(own * scale, rel=1e-4)
    assert rows["again"]["mse"] == rows["tiny"]["mse"] and rows["again"]["two_sample"] == rows["tiny"]["two_sample"]
    # Equal window counts on every row; floors once; every two-sample figure with its control.
    assert data["windows"]["test"] == 12 and data["windows"]["two_sample_per_side"] >= 2
    assert {tuple(r["two_sample"]["windows"]) for r in data["rows"]} == {(data["windows"]["two_sample_per_side"],) * 2}
    assert data["floors"]["realism"]["frames"] > 0 and 0 <= data["floors"]["two_sample"]["accuracy"] <= 1
    for row in data["rows"]:
        assert row["realism_over_floor"]["frames"] == pytest.approx(row["realism"]["frames"] / data["floors"]["realism"]["frames"])
        assert 0 <= row["two_sample"]["accuracy"] <= 1 and len(row["two_sample"]["control"]["accuracies"]) == 1
    text = (tmp_path / "map" / "results.md").read_text()
    assert "## frozen 2-D DCT" in text and "## PCA (training windows)" in text and "| tiny | 8 |" in text
    assert (tmp_path / "map" / "map.png").stat().st_size > 0
    # Checkpoints sharing a latent size are separate labelled points.
    labels = {t.get_text() for ax in map_figure(data).axes for t in ax.texts}
    assert {"tiny", "again"} <= labels
    # --merge: a later run on the same data without the two-sample test adds its rows to one map.
    later = {**data, "two_sample_seeds": [], "floors": {**data["floors"], "two_sample": None},
             "windows": {**data["windows"], "two_sample_per_side": None},
             "rows": [{k: v for k, v in {**rows["tiny"], "label": "later"}.items() if k != "two_sample"},
                      rows["dct-4"]]}
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "results.json").write_text(json.dumps(later))
    merge = load_script("benchmark_map").main
    assert merge(["--merge", str(tmp_path / "later"), str(tmp_path / "map"), "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert [r["label"] for r in both["rows"]] == ["later", "dct-4", "pca-4", "tiny", "again"]
    assert both["floors"]["two_sample"] == data["floors"]["two_sample"] and both["two_sample_seeds"] == [0]
    assert both["merged_from"] == [data["command"], data["command"]]
    assert "| later | 8 |" in (tmp_path / "both" / "results.md").read_text()
    other = {**later, "data": {**later["data"], "seed": 99}}
    (tmp_path / "later" / "results.json").write_text(json.dumps(other))
    assert merge(["--merge", str(tmp_path / "map"), str(tmp_path / "later"), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert f"--merge {tmp_path / 'later'}: its data differ" in err and "Traceback" not in err
    assert merge(["--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "no")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_a_checkpoint_is_scored_in_the_data_s_units():
    class Identity:
        device = torch.device("cpu")

        def reconstruct(self, x):
            return x

    x = torch.randn(3, 1, 4, 5)
    ours, theirs = Normalizer(-1.0, 4.0), Normalizer(2.0, 0.5)
    assert torch.allclose(checkpoint_decoder(Identity(), ours, theirs)(x), x, atol=1e-5)
    Identity.reconstruct = lambda self, x: torch.zeros_like(x)  # a decoder that outputs its own mean
    assert torch.allclose(checkpoint_decoder(Identity(), ours, theirs)(x), torch.full_like(x, (2.0 + 1.0) / 4.0))


def test_bad_inputs_are_named_in_one_line(tiny_run, tmp_path, capsys):
    ckpt = tiny_run["ckpt_dir"] / "last.ckpt"
    for flags, message in ((["--sizes", "0,4"], "--sizes '0,4': give comma-separated code sizes of at least 1"),
                           (["--ckpt", "x.ckpt"], "--ckpt 'x.ckpt': give LABEL=PATH"),
                           (["--ckpt", f"a={ckpt},a={ckpt}"], "--ckpt a: two checkpoints share this label"),
                           (["--ckpt", f"gone={tmp_path / 'gone.ckpt'}"], "gone.ckpt: no such checkpoint file"),
                           (["--ckpt", f"tiny={ckpt}", "--frames", "16"], "trained on windows of 32 frames; pass --frames 32"),
                           (["--test_dir", str(tmp_path / "nowhere")], "--test_dir " + str(tmp_path / "nowhere") + ": no such folder")):
        assert run(tmp_path, *flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("musicvae benchmark-map: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert run(tmp_path / "m", "--ckpt", f"tiny={ckpt}", n_mels=16) == 2
    assert "trained on other mel settings than the data's; pass --data.mel.n_mels 32" in capsys.readouterr().err
    assert run(tmp_path / "s", "--sizes", "64", "--two_sample_seeds", "0") == 2  # 12 files x 128 frames: too few windows
    assert "cannot give PCA-128" in capsys.readouterr().err
    assert not (tmp_path / "map").exists()
