"""Check that the installed environment is the one uv.lock describes, and that it loads.

Run by `make check-env` (and so by CI) before the tests, so that an install that a user
would see fail (a torch/torchaudio pair that cannot load, a lock that drifted from what is
installed) fails here with one clear message instead of inside the first test.

Usage:
    uv export --frozen --no-hashes --extra dev --extra vocoder --no-emit-project | python tools/check_env.py
    ... | python tools/check_env.py --newer-than-lock   # list what differs, fail only if it won't load

Exit status: 0 when everything matches and loads, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys

from packaging.markers import Marker
from packaging.utils import canonicalize_name

# What the package loads at run time; each import must succeed.
IMPORTS = (
    "torch", "torchaudio", "torchdata.stateful_dataloader", "lightning", "torchmetrics",
    "tensorboard", "jsonargparse", "matplotlib", "soundfile", "numpy", "tqdm", "yaml",
    # The optional extra `vocoder` (the tests need it, so `make check-env` installs it): vocos
    # imports encodec and huggingface_hub at import time, and either can break with a new torch.
    "vocos",
)
# Printed first: the pins that broke installs before.
HEADLINE = ("torch", "torchaudio", "torchdata", "lightning", "torchmetrics", "jsonargparse", "numpy")

_REQ = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)\s*(?:;\s*(.+))?$")


def locked_versions(export_text: str) -> dict[str, str]:
    """The exact versions a `uv export` (requirements format) pins for this interpreter.

    Args:
        export_text: output of `uv export --no-hashes`; lines whose marker is false here
            (another platform or Python version) are skipped.

    Returns:
        Canonical distribution name -> version.
    """
    pins: dict[str, str] = {}
    for raw in export_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = _REQ.match(line)
        if m is None:
            raise ValueError(f"cannot read this line of the lock export: {line!r}")
        name, version, marker = m.groups()
        if marker and not Marker(marker).evaluate():
            continue
        pins[canonicalize_name(name)] = version
    return pins


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of every distribution in this interpreter's environment."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}


def compare(locked: dict[str, str], installed: dict[str, str], ignore=("musicvae",)) -> list[str]:
    """Lines describing each disagreement between the lock and the environment (empty if none)."""
    problems = []
    for name in sorted(locked):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: locked {locked[name]}, not installed")
        elif have != locked[name]:
            problems.append(f"{name}: locked {locked[name]}, installed {have}")
    for name in sorted(set(installed) - set(locked) - set(ignore)):
        problems.append(f"{name}: installed {installed[name]}, not in the lock")
    return problems


def load_stack() -> list[str]:
    """Import every dependency and run torchaudio's compiled code; returns failures."""
    import importlib

    failures = []
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import error is what a user would hit
            failures.append(f"import {module}: {type(exc).__name__}: {exc}")
    if failures:
        return failures
    import torch
    import torchaudio
    from torchaudio import _extension

    # `import torchaudio` can succeed with its C++ library missing; these need it or its math.
    if not _extension._IS_TORCHAUDIO_EXT_AVAILABLE:
        failures.append("torchaudio's C++ extension did not load (a torch/torchaudio ABI mismatch)")
    wave = torch.sin(torch.linspace(0, 2000, 22050)).unsqueeze(0)
    mel = torchaudio.transforms.MelSpectrogram(22050, n_fft=1024, hop_length=256, n_mels=128)(wave)
    if mel.shape != (1, 128, 87) or not torch.isfinite(mel).all():
        failures.append(f"mel spectrogram came out wrong: shape {tuple(mel.shape)}")
    torchaudio.functional.lfilter(wave, torch.tensor([1.0, -0.5]), torch.tensor([1.0, 0.0]))
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--newer-than-lock", action="store_true",
                        help="the environment was resolved without the lock (make test-latest): list "
                             "what differs from the lock, and fail only if the stack does not load")
    args = parser.parse_args(argv)

    installed = installed_versions()
    print("python " + sys.version.split()[0] + ": "
          + ", ".join(f"{n} {installed.get(n, '-')}" for n in HEADLINE))
    differences = compare(locked_versions(sys.stdin.read()), installed)
    problems = []
    if args.newer_than_lock:
        for line in differences:
            print("differs from uv.lock: " + line)
        if not differences:
            print("check-env: the newest versions the ranges allow are the locked ones")
    elif differences:
        problems = differences + [
            "the environment does not match uv.lock: run `make clean-venv` and then `make test` "
            "(or `uv sync --locked --extra dev --extra vocoder`) to install the lock"]
    problems += load_stack()
    for line in problems:
        print("check-env: " + line, file=sys.stderr)
    if not problems:
        matched = "" if args.newer_than_lock else " match uv.lock and"
        print(f"check-env: {len(installed)} distributions{matched} load (torchaudio's C++ extension too)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
