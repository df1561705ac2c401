"""Where the recipes (`configs/*.yaml`) are: one folder, found from a checkout and from a wheel.

The repository's top-level `configs/` is the folder users read and copy. The wheel carries that
same folder as the resource package `musicvae.configs` (a setuptools package-dir mapping in
pyproject.toml), so a non-editable install finds the recipes without the repository around it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2] / "configs"


def recipe_path(name: str) -> Path:
    """The path of recipe `name` (e.g. "quickstart.yaml"): the checkout's, else the installed copy."""
    checkout = _CHECKOUT / name
    if checkout.is_file():
        return checkout
    installed = Path(str(resources.files("musicvae.configs").joinpath(name)))
    if not installed.is_file():
        raise FileNotFoundError(f"recipe {name!r} is neither in {_CHECKOUT} nor installed with musicvae")
    return installed
