"""`python scripts/linear_codes.py ...` is `musicvae linear-codes ...` (see `musicvae linear-codes --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.commands import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("linear-codes", sys.argv[1:]))
