"""Scoring a trained checkpoint on held-out music: metrics, the three problems' verdicts, report and figures."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "evaluate": "report",
    "evaluate_checkpoint": "report",
    "two_sample_test": "two_sample",
    "two_sample_scores": "two_sample_report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ["report", "two_sample", "two_sample_report"])
