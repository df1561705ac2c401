"""The prior a generation draws codes from: N(0, I), or a learned prior a checkpoint or a saved folder carries.

A checkpoint carries a learned prior (musicvae.models.prior, fitted by `musicvae fit-prior`) under
`PRIOR_KEY`, beside what Lightning wrote, as plain values and tensors, so `torch.load(weights_only=True)`
still reads it::

    {"kind": "mixture", "components": 8, "covariance": "full", "latent_dim": 128,
     "state": {"weights": (K,), "means": (K, D), "scale_tril": (K, D, D)},
     "fitted_on": {"train_codes": N, "val_codes": M, "seed": 0, "candidates": [...]}}

A saved folder keeps the same settings in config.json's `prior` section and the buffers in
model.safetensors as `prior.*`. Either is a file a user was handed, so it is read as data
(musicvae/training/stored_config.py): a known kind and covariance, a bounded component count, and
the buffers' shapes compared with what those settings build on the meta device before anything is
allocated; then their values (finite, weights a distribution, Cholesky factors lower-triangular
with a positive diagonal). Anything else is refused in one line naming the file.

`--prior auto|standard|learned`: auto is the learned prior when there is one, else N(0, I).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from musicvae.errors import CheckpointError, ConfigError
from musicvae.models.prior import COVARIANCES, GaussianPrior, MixturePrior, StandardPrior, make_prior
from musicvae.training.stored_config import MAX_MODEL_ELEMENTS, is_plain

#: Key of the learned prior inside a checkpoint.
PRIOR_KEY = "musicvae_prior"
#: What `--prior` (and `prior=` in Python) takes.
CHOICES = ("auto", "standard", "learned")
KINDS = ("standard", "gaussian", "mixture")
#: Most components a stored prior may declare: far above what validation likelihood picks (8 of 32
#: tried, docs/quality.md), far below what would allocate much before its shapes are compared.
MAX_COMPONENTS = 1024
#: Keys a checkpoint's prior record may hold; config.json's section holds the same less `state`, plus
#: `distribution` (a description, the only key a folder saved without a learned prior has).
RECORD_KEYS = ("kind", "components", "covariance", "latent_dim", "state", "fitted_on")
SECTION_KEYS = ("distribution", "kind", "components", "covariance", "latent_dim", "fitted_on")
#: How far the stored component weights may sum from 1 (they are float32).
WEIGHT_SUM_TOL = 1e-3
#: config.json's description of N(0, I), the prior of a folder saved without a learned one.
STANDARD_NORMAL = "standard normal"


def kind_of(prior: MixturePrior) -> str:
    """"standard", "gaussian" or "mixture": the name `make_prior` builds `prior`'s class from."""
    return "standard" if isinstance(prior, StandardPrior) else "gaussian" if isinstance(prior, GaussianPrior) \
        else "mixture"


def prior_settings(prior: MixturePrior) -> dict[str, Any]:
    """The settings that rebuild `prior`'s buffers: kind, components, covariance, latent_dim."""
    return {"kind": kind_of(prior), "components": int(prior.components), "covariance": prior.covariance,
            "latent_dim": int(prior.dim)}


def describe(prior: MixturePrior) -> str:
    """A short name for titles and messages: "N(0, I)", "Gaussian, full covariance", "mixture of 8, full"."""
    kind = kind_of(prior)
    if kind == "standard":
        return "N(0, I)"
    return "Gaussian, full covariance" if kind == "gaussian" else \
        f"mixture of {prior.components}, {prior.covariance} covariance"


def prior_record(prior: MixturePrior, fitted_on: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint stores under `PRIOR_KEY`: plain settings, the buffers (CPU copies), `fitted_on`."""
    return {**prior_settings(prior), "state": {k: v.detach().cpu().clone() for k, v in prior.state_dict().items()},
            "fitted_on": dict(fitted_on)}


def checked_settings(settings: Any, latent_dim: int, source: str | os.PathLike,
                     allowed: tuple[str, ...] = RECORD_KEYS) -> tuple[str, int, str]:
    """(kind, components, covariance) of a stored prior's settings, validated as data.

    Raises:
        CheckpointError: naming `source`: not a mapping, an unknown key, kind or covariance, a component
            count that is not an integer in [1, MAX_COMPONENTS], settings a kind does not take, or a
            latent size other than the network's.
    """
    if not isinstance(settings, Mapping):
        raise CheckpointError(f"{source}: its prior is a {type(settings).__name__}, not a mapping of settings")
    unknown = sorted(str(k) for k in set(settings) - set(allowed))
    if unknown:
        raise CheckpointError(f"{source}: its prior has unknown key(s) {unknown}; known: {list(allowed)}")
    kind, components, covariance = settings.get("kind"), settings.get("components"), settings.get("covariance")
    if kind not in KINDS:
        raise CheckpointError(f"{source}: prior kind {kind!r} is not one of {list(KINDS)}")
    if covariance not in COVARIANCES:
        raise CheckpointError(f"{source}: prior covariance {covariance!r} is not one of {list(COVARIANCES)}")
    if isinstance(components, bool) or not isinstance(components, int) or not 1 <= components <= MAX_COMPONENTS:
        raise CheckpointError(f"{source}: prior components {components!r} must be an integer in [1, {MAX_COMPONENTS}]; "
                              "refused before allocating it")
    fixed = {"standard": (1, "diag"), "gaussian": (1, "full")}.get(kind)
    if fixed is not None and (components, covariance) != fixed:
        raise CheckpointError(f"{source}: a {kind} prior has {fixed[0]} component, {fixed[1]} covariance "
                              f"(found {components}, {covariance!r})")
    if settings.get("latent_dim") != latent_dim:
        raise CheckpointError(f"{source}: prior latent_dim {settings.get('latent_dim')!r} is not the network's "
                              f"{latent_dim}")
    if not is_plain(settings.get("fitted_on") or {}):
        raise CheckpointError(f"{source}: its prior's fitted_on holds a value that is not a plain number, string, "
                              "list or mapping")
    return kind, components, covariance


def check_prior_shapes(kind: str, latent_dim: int, components: int, covariance: str, state: Mapping[str, Any],
                       source: str | os.PathLike) -> None:
    """Build the prior the settings describe on the meta device and compare its buffers with `state`'s
    tensors (or meta tensors of a safetensors header), names and shapes.

    Raises:
        CheckpointError: the prior would exceed MAX_MODEL_ELEMENTS, or a buffer is missing, extra or of
            another shape.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in make_prior(kind, latent_dim, components, covariance).state_dict().items()}
    total = sum(int(torch.Size(s).numel()) for s in expected.values())
    if total > MAX_MODEL_ELEMENTS:
        raise CheckpointError(f"{source}: its prior settings describe {total:,} numbers, more than musicvae builds "
                              f"({MAX_MODEL_ELEMENTS:,}); refused before allocating them")
    if not isinstance(state, Mapping) or set(state) != set(expected) or not all(
            isinstance(state[k], Tensor) for k in expected):
        found = sorted(str(k) for k in state) if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"{source}: its prior's buffers {found} are not the tensors {sorted(expected)} "
                              f"a {kind} prior has")
    differ = [f"{k} {tuple(state[k].shape)} (the settings give {s})" for k, s in expected.items()
              if tuple(state[k].shape) != s]
    if differ:
        raise CheckpointError(f"{source}: its prior's buffers do not fit its settings: " + "; ".join(differ))


def check_prior_values(prior: MixturePrior, source: str | os.PathLike) -> MixturePrior:
    """`prior`, refused unless its values make a density: finite, weights >= 0 summing to 1, Cholesky
    factors lower-triangular (diagonal for a diagonal covariance) with a positive diagonal."""
    weights, tril = prior.weights, prior.scale_tril
    triangle = torch.diag_embed(torch.diagonal(tril, dim1=1, dim2=2)) if prior.covariance == "diag" else tril.tril()
    problems = [what for what, bad in (
        ("non-finite values", not all(torch.isfinite(t).all() for t in (weights, prior.means, tril))),
        ("negative weights", bool((weights < 0).any())),
        ("weights that do not sum to 1", abs(float(weights.double().sum()) - 1) > WEIGHT_SUM_TOL),
        ("scale factors with entries off their triangle", not torch.equal(tril, triangle)),
        ("scale factors whose diagonal is not positive", not bool((torch.diagonal(tril, dim1=1, dim2=2) > 0).all())),
    ) if bad]
    if problems:
        raise CheckpointError(f"{source}: its prior is not a density ({', '.join(problems)})")
    return prior.eval()


def prior_from_record(record: Any, latent_dim: int, source: str | os.PathLike) -> MixturePrior:
    """The prior a checkpoint's record describes, validated before anything is allocated (module docstring)."""
    kind, components, covariance = checked_settings(record, latent_dim, source)
    state = record.get("state")
    check_prior_shapes(kind, latent_dim, components, covariance, state, source)
    if not all(t.is_floating_point() for t in state.values()):
        raise CheckpointError(f"{source}: its prior's buffers must hold floating-point numbers")
    prior = make_prior(kind, latent_dim, components, covariance)
    prior.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    prior.fitted_on = dict(record.get("fitted_on") or {})  # carried into config.json by save_pretrained
    return check_prior_values(prior, source)


def read_prior(ckpt: Mapping[str, Any], latent_dim: int, source: str | os.PathLike) -> Optional[MixturePrior]:
    """The learned prior a loaded checkpoint carries under PRIOR_KEY, or None when it has none.

    Raises:
        CheckpointError: a record that is not a valid prior (see `prior_from_record`).
    """
    record = ckpt.get(PRIOR_KEY)
    return None if record is None else prior_from_record(record, latent_dim, source)


def config_section(prior: Optional[MixturePrior], latent_dim: int) -> dict[str, Any]:
    """config.json's `prior` section for a model whose learned prior is `prior` (None: N(0, I) only)."""
    if prior is None:
        return {"distribution": STANDARD_NORMAL, "latent_dim": latent_dim}
    return {"distribution": describe(prior), **prior_settings(prior), "fitted_on": dict(getattr(prior, "fitted_on", {}))}


def checked_section(section: Any, latent_dim: int, source: str | os.PathLike) -> dict[str, Any]:
    """config.json's `prior` section validated as data (a missing one is N(0, I)), in `config_section`'s form.

    Raises:
        CheckpointError: naming `source`: not a mapping, unknown keys, or settings `checked_settings` refuses.
    """
    section = {} if section is None else section
    if not isinstance(section, Mapping):
        raise CheckpointError(f"{source}: its prior is a {type(section).__name__}, not a mapping of settings")
    if "kind" not in section:
        if set(section) - {"distribution", "latent_dim"} or section.get("latent_dim", latent_dim) != latent_dim:
            raise CheckpointError(f"{source}: prior {dict(section)!r} is neither N(0, I) of the network's "
                                  f"latent_dim {latent_dim} nor a learned prior's settings")
        return config_section(None, latent_dim)
    kind, components, covariance = checked_settings(section, latent_dim, source, SECTION_KEYS)
    return {"distribution": str(section.get("distribution", kind)), "kind": kind, "components": components,
            "covariance": covariance, "latent_dim": latent_dim, "fitted_on": dict(section.get("fitted_on") or {})}


def unfitted_prior(section: Mapping[str, Any]) -> Optional[MixturePrior]:
    """The prior a checked config.json section describes, with default buffers for the weights to fill
    (None for N(0, I) alone); `fitted_on` rides along as an attribute, for the next save."""
    if "kind" not in section:
        return None
    prior = make_prior(section["kind"], section["latent_dim"], section["components"], section["covariance"])
    prior.fitted_on = dict(section.get("fitted_on") or {})
    return prior


def check_choice(choice: str, flag: str = "--prior") -> str:
    """`choice`, refused unless one of CHOICES (before any work); `flag` names the setting."""
    if choice not in CHOICES:
        raise ConfigError(f"{flag} {choice!r}: use one of {', '.join(CHOICES)}")
    return choice


def choose_prior(learned: Optional[MixturePrior], choice: str, latent_dim: int,
                 source: str | os.PathLike, flag: str = "--prior") -> MixturePrior:
    """The prior `--prior CHOICE` means: "auto" the learned one when there is one, else N(0, I);
    "standard" N(0, I); "learned" the learned one, refused when `source` carries none.

    Raises:
        ConfigError: an unknown choice, or "learned" for a model without a learned prior.
    """
    check_choice(choice, flag)
    if choice == "learned" and learned is None:
        raise ConfigError(f"{flag} learned: {source} carries no learned prior; fit one with `musicvae fit-prior "
                          f"--ckpt_path CHECKPOINT` (it writes NAME.prior.ckpt beside it), or use {flag} standard")
    return learned if learned is not None and choice != "standard" else StandardPrior(latent_dim)


def path_log_density(prior: MixturePrior, path: Tensor) -> list[float]:
    """Log-density (nats per code) of each code of a latent path ``(S, D)`` under `prior`: how far a
    morph strays from where the prior puts music (a dip between two ends that score alike)."""
    return [float(v) for v in prior.log_prob(path.detach().double().cpu())]
