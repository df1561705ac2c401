"""A trained run back from its checkpoint: loading, the Python API on audio (`load`), saved folders,
generation (reconstruct, sample, interpolate), learned priors over the codes (fit-prior), export."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "load_module": "loading",
    "datamodule_for": "loading",
    "load_generation_model": "generation",
    "GenerationModel": "generation",
    "export_checkpoint": "export",
    "load": "api",
    "MusicVAE": "api",
    "PretrainedVAE": "pretrained",
    "export_programs": "programs",
    "fit_checkpoint_prior": "prior_fitting",
    "choose_prior": "priors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['api', 'card', 'export', 'generation', 'latent_paths',
                                                          'loading', 'pretrained', 'prior_fitting', 'priors', 'programs'])
