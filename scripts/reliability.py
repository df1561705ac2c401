"""`python scripts/reliability.py ...` is `musicvae reliability ...` (see `musicvae reliability --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.commands import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("reliability", sys.argv[1:]))
