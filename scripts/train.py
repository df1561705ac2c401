"""`python scripts/train.py ...` is `musicvae fit|validate|test|predict ...`; bare, it is the quickstart.

Without a subcommand the command is `fit`. Every LightningCLI and Trainer flag works; see
`python scripts/train.py --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
