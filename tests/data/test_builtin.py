"""Where the built-in data's cache lives (musicvae/data/builtin.py, default_cache_dir)."""

from __future__ import annotations

from pathlib import Path

from musicvae.data.builtin import default_cache_dir


def test_default_cache_dir_is_musicvae_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICVAE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MUSICVAE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "musicvae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == Path(tmp_path / "home" / ".cache" / "musicvae")
