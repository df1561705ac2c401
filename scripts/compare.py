"""`python scripts/compare.py ...` is `musicvae compare ...` (see `musicvae compare --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.commands import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("compare", sys.argv[1:]))
