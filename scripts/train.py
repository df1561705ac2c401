"""Train a MusicVAE: `python scripts/train.py [fit|validate|test] --config configs/improved.yaml ...`.

With no arguments this is `fit --config configs/quickstart.yaml`. Every LightningCLI and Trainer
flag works; see `python scripts/train.py --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from musicvae.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
