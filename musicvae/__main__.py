"""`python -m musicvae COMMAND ...`: the same as the `musicvae` console command."""

import sys

from musicvae.commands import main

sys.exit(main(program="python -m musicvae"))
