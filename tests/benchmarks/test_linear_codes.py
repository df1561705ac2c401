"""scripts/linear_codes.py: linear codes fitted on one folder, scored on another, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script, write_mel_folder


def run(tmp_path: Path, test_dir: Path, k: int, *extra: str) -> int:
    """linear_codes on 8 training arrays of 64 frames (16-frame windows) against `test_dir`."""
    write_mel_folder(tmp_path / "train", n_files=8, frames=64, seed=0)
    return load_script("linear_codes").main([
        "--train_dir", str(tmp_path / "train"), "--test_dir", str(test_dir), "--k", str(k), "--frames", "16",
        "--cache_dir", str(tmp_path / "cache"), *extra])


def test_linear_codes_score_every_code_on_the_held_out_folder(tmp_path, capsys):
    write_mel_folder(tmp_path / "test", n_files=3, frames=48, seed=1, offset=0.3)
    out = tmp_path / "codes.json"
    assert run(tmp_path, tmp_path / "test", 4, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| PCA-4, training segments | " in printed and "| dct-4 (2-D DCT), training segments |" in printed
    data = json.loads(out.read_text())
    assert data["k"] == 4 and data["n_test"] == 9  # every window of the test folder: 3 files x 48 / 16
    mse = {(r["basis"], r["fitted_on"], r["components"]): r["mse"] for r in data["rows"]}
    assert set(mse) == {("pca", "train", 4), ("pca", "train", 8), ("pca", "train", 16), ("pca", "test", 4),
                        *((b, "train", k) for b in ("separable", "dct") for k in (4, 8, 16))}
    for basis in ("pca", "separable", "dct"):  # nested codes: more components never reconstruct worse
        assert mse[(basis, "train", 16)] <= mse[(basis, "train", 8)] * (1 + 1e-6) <= mse[(basis, "train", 4)] * (1 + 1e-6)
    assert mse[("pca", "test", 4)] <= mse[("pca", "train", 4)] * (1 + 1e-6)  # the oracle


def test_a_missing_folder_is_named(tmp_path, capsys):
    assert run(tmp_path, tmp_path / "nowhere", 4) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_too_few_training_windows_for_k_are_named(tmp_path, capsys):
    write_mel_folder(tmp_path / "test", n_files=3, frames=48, seed=1)
    assert run(tmp_path, tmp_path / "test", 40) == 2
    assert "training windows of 16 frames cannot give PCA-40; lower --k or --frames" in capsys.readouterr().err


def test_knn_probe_reports_the_dct_code_with_and_without_the_predicted_residual(tmp_path, capsys):
    write_mel_folder(tmp_path / "test", n_files=3, frames=48, seed=1, offset=0.3)
    out = tmp_path / "codes.json"
    assert run(tmp_path, tmp_path / "test", 4, "--knn", "1,3", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| dct-4 alone | " in printed and "| + mean residual of 3 nearest | " in printed
    data = json.loads(out.read_text())
    dct = next(r["mse"] for r in data["rows"] if r["basis"] == "dct" and r["components"] == 4)
    assert data["knn"]["code_mse"] == pytest.approx(dct, rel=1e-5)  # the same frozen code as the table's dct-4
    assert [r["k"] for r in data["knn"]["knn"]] == [1, 3] and data["knn"]["n_test"] == data["n_test"]


def test_bad_knn_values_are_named(tmp_path, capsys):
    write_mel_folder(tmp_path / "test", n_files=3, frames=48, seed=1)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, tmp_path / "test", 4, "--knn", "0,5")
    assert exit_info.value.code == 2
    assert "--knn '0,5' is not a comma-separated list of positive neighbour counts" in capsys.readouterr().err
    assert run(tmp_path, tmp_path / "test", 4, "--knn", "99") == 2  # 8 files x 64 frames: 24 training windows at most
    assert "--knn 99: only" in capsys.readouterr().err


def test_switched_codes_are_scored_on_validation_and_test_windows_beside_dct_k(tmp_path, capsys):
    write_mel_folder(tmp_path / "test", n_files=3, frames=48, seed=1, offset=0.3)
    out = tmp_path / "codes.json"
    assert run(tmp_path, tmp_path / "test", 4, "--switched", "2", "--switched_blocks", "1", "1,2",
               "--switched_pca", "1", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "k-1 = 3 coefficients + the mode index = 4 numbers a window" in printed
    assert "| switched dct-3 + index of 2 (time blocks 1/2) | 2 | " in printed and "| clustered PCA-3 + index of 1 |" in printed
    data = json.loads(out.read_text())
    table = {(r["family"], r["modes"], tuple(r["blocks"])): r for r in data["switched"]}
    assert set(table) == {("dct", 2, (1,)), ("dct", 2, (1, 2)), ("pca", 1, ())}
    assert all(r["coefficients"] == 3 and r["train_mse"] > 0 for r in table.values())
    rows = {(r["basis"], r["fitted_on"], r["components"]): r for r in data["rows"]}
    assert all("val_mse" in r for r in rows.values())
    one, pca4 = table[("pca", 1, ())], rows[("pca", "train", 4)]  # one mode: PCA-3, inside PCA-4's span
    assert one["mse"] >= pca4["mse"] * (1 - 1e-6) and one["val_mse"] >= pca4["val_mse"] * (1 - 1e-6)
    # PCA is the best linear code of its size on the windows it was fitted on.
    assert 0 < pca4["train_mse"] <= rows[("dct", "train", 4)]["train_mse"] and pca4["train_mse"] <= one["train_mse"]


def test_bad_switched_values_are_named(tmp_path, capsys):
    write_mel_folder(tmp_path / "test", n_files=3, frames=48, seed=1)
    for flags, message in ((["--switched", "two"], "--switched 'two' is not a comma-separated list of positive mode counts"),
                           (["--switched", "3", "--switched_blocks", "1,2"], "--switched 3 modes do not split evenly"),
                           (["--switched", "2", "--switched_blocks", "3"], "--switched_blocks '3': each is a comma-separated"),
                           (["--switched_pca", "0"], "--switched_pca '0' is not a comma-separated list")):
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, tmp_path / "test", 4, *flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert run(tmp_path, tmp_path / "test", 4, "--switched_pca", "9") == 2  # 28 training windows: not 9 clusters of 4
    assert "--switched_pca 9: 28 training windows cannot give 9 clusters of at least 4 windows" in capsys.readouterr().err
