"""The Lightning layer: the module, the command line, callbacks, checkpoint IO and preflight checks."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "MusicVAEModule": "module",
    "SharpenModule": "sharpen",
    "cli_main": "cli",
    "load_checkpoint": "checkpoints",
    "list_checkpoints": "checkpoints",
    "ReconstructionScores": "scoring",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['checkpoints', 'cli', 'module', 'sharpen'])
