"""The model's settings: their checks, and the one table that reads every earlier layout of them.

A checkpoint stores the module's hyper-parameters (`hyper_parameters`) and the run's config
(`musicvae_run_config`). Their layout has changed twice; every command that reads a checkpoint
passes both through `model_spec` / `current_layout` below, so a checkpoint of any version resumes,
evaluates, generates and exports (tests/training/test_old_checkpoints.py trains one with each
earlier layout's own code).

| earlier model setting                | today                                                   |
|--------------------------------------|---------------------------------------------------------|
| `adversarial: true`                  | `model.class_path: musicvae.training.sharpen.SharpenModule` |
| `adversarial: false` (or absent)     | `model.class_path: musicvae.training.module.MusicVAEModule` |
| `adv_weight`, `adv_start_step`, `disc_lr`, `disc_channels`, `disc_augment`, `adv_grad_clip` | SharpenModule's own arguments (dropped with `adversarial: false`) |
| `kl_warmup_steps`, `free_bits`       | `model.kl: {warmup_steps, free_bits}`                    |
| `n_figure_examples`, `audio_every_n_epochs`, `n_audio_clips`, `griffin_lim_iters` | `media.<same name>` (the media callback's own options) |
| `media_alpha`, `media_vocoder`       | `media.alpha`, `media.vocoder`                           |

The class a checkpoint names is data too: only the two classes above are built, whatever a file says
(`MODEL_CLASSES`, built by musicvae/training/model_classes.py), and LightningCLI's `_instantiator`
entry is never called.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, TypedDict

from musicvae.errors import CheckpointError, ConfigError
from musicvae.training.schedules import SCHEDULES

VAE_CLASS = "musicvae.training.module.MusicVAEModule"
SHARPEN_CLASS = "musicvae.training.sharpen.SharpenModule"
#: The model classes a checkpoint or a stored config may name.
MODEL_CLASSES = (VAE_CLASS, SHARPEN_CLASS)
#: Other spellings of them: jsonargparse stores a class under the shortest package that exports it.
_ALIASES = {f"{package}.{path.rsplit('.', 1)[1]}": path for path in MODEL_CLASSES
            for package in ("musicvae", "musicvae.training")}
#: SharpenModule's arguments beyond MusicVAEModule's.
SHARPEN_ARGS = ("adv_weight", "adv_start_step", "disc_lr", "disc_channels", "disc_augment", "adv_grad_clip")
#: Earlier flat model settings and where they live now: (group, key); group "kl" is `model.kl`.
MOVED = {
    "kl_warmup_steps": ("kl", "warmup_steps"),
    "free_bits": ("kl", "free_bits"),
    "n_figure_examples": ("media", "n_figure_examples"),
    "audio_every_n_epochs": ("media", "audio_every_n_epochs"),
    "n_audio_clips": ("media", "n_audio_clips"),
    "griffin_lim_iters": ("media", "griffin_lim_iters"),
    "media_alpha": ("media", "alpha"),
    "media_vocoder": ("media", "vocoder"),
}

LOSSES = ("standard", "spectral")
LINEAR_BASES = ("pca", "separable", "dct")
ARCHITECTURES = ("conv2d", "conv1d")


class KLSchedule(TypedDict, total=False):
    """The KL term's schedule (`--model.kl.warmup_steps 1000 --model.kl.free_bits 0.1`).

    Attributes:
        warmup_steps: beta rises linearly from 0 to `beta` over this many steps (0: no warm-up;
            Bowman et al. 2016, arXiv:1511.06349).
        free_bits: nats per latent dimension whose KL is not penalised (0: plain KL; Kingma et al. 2016).
    """

    warmup_steps: int
    free_bits: float


KL_DEFAULTS: KLSchedule = {"warmup_steps": 0, "free_bits": 0.0}


def kl_schedule(kl: Optional[Mapping[str, Any]]) -> KLSchedule:
    """`kl` with the defaults filled in (a YAML/JSON value may give one of the two)."""
    merged = {**KL_DEFAULTS, **(kl or {})}
    unknown = set(merged) - set(KL_DEFAULTS)
    if unknown:
        raise ConfigError(f"model.kl: unknown setting(s) {sorted(unknown)}; it takes warmup_steps and free_bits")
    return {"warmup_steps": int(merged["warmup_steps"]), "free_bits": float(merged["free_bits"])}


def check_model_settings(hp: Mapping[str, Any]) -> None:
    """Refuse settings no model can train with, naming each and its bounds.

    Raises:
        ConfigError: the first group of settings out of bounds.
    """
    def refuse_unless(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    refuse_unless(hp["loss"] in LOSSES, f"model.loss={hp['loss']!r} is not one of {LOSSES}")
    refuse_unless(hp["architecture"] in ARCHITECTURES,
                  f"model.architecture={hp['architecture']!r} is not one of {ARCHITECTURES}")
    refuse_unless(hp["linear_path_basis"] in LINEAR_BASES,
                  f"model.linear_path_basis={hp['linear_path_basis']!r} is not one of {LINEAR_BASES}")
    refuse_unless(hp["lr"] > 0 and hp["beta"] >= 0 and hp["spectral_weight"] >= 0 and hp["output_reg_weight"] >= 0,
                  "model.lr must be positive and model.beta, model.spectral_weight, model.output_reg_weight "
                  f"non-negative; got lr={hp['lr']}, beta={hp['beta']}, spectral_weight={hp['spectral_weight']}, "
                  f"output_reg_weight={hp['output_reg_weight']}")
    refuse_unless(hp["lr_schedule"] in SCHEDULES and hp["warmup_steps"] >= 0 and 0.0 <= hp["lr_min_ratio"] <= 1.0
                  and 0.0 < hp["plateau_factor"] < 1.0 and hp["plateau_patience"] >= 0,
                  f"model.lr_schedule={hp['lr_schedule']!r} must be one of {SCHEDULES}, model.warmup_steps="
                  f"{hp['warmup_steps']} and model.plateau_patience={hp['plateau_patience']} non-negative, "
                  f"model.lr_min_ratio={hp['lr_min_ratio']} in [0, 1] and model.plateau_factor={hp['plateau_factor']} "
                  "in (0, 1)")
    kl = hp["kl"]
    refuse_unless(kl["warmup_steps"] >= 0 and kl["free_bits"] >= 0 and hp["linear_path_lr_scale"] >= 0
                  and hp["linear_path_examples"] >= hp["latent_dim"],
                  f"model.kl.warmup_steps={kl['warmup_steps']}, model.kl.free_bits={kl['free_bits']} and "
                  f"model.linear_path_lr_scale={hp['linear_path_lr_scale']} must be non-negative and "
                  f"model.linear_path_examples={hp['linear_path_examples']} at least model.latent_dim={hp['latent_dim']}")
    if hp.get("ema_decay") is not None:
        check_decay(hp["ema_decay"])


def check_decay(decay: float) -> None:
    """Raises ConfigError unless `decay` is an EMA decay in (0, 1)."""
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"model.ema_decay={decay} must lie in (0, 1) (e.g. 0.999: an average over ~1000 steps), "
                          "or be null for no averaging")


def canonical(class_path: Any) -> Any:
    """The class path of `MODEL_CLASSES` that `class_path` spells (another value unchanged)."""
    return _ALIASES.get(class_path, class_path) if isinstance(class_path, str) else class_path


def _flat_model(settings: Mapping[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """(class path or None, init args) of a model group in either layout (settings beside `class_path`
    count as init args, as jsonargparse reads them)."""
    if "class_path" in settings:
        beside = {k: v for k, v in settings.items() if k not in ("class_path", "init_args")}
        init_args = settings.get("init_args") or {}
        return settings.get("class_path"), {**beside, **(init_args if isinstance(init_args, Mapping) else {})}
    return None, dict(settings)


def current_layout(model: Mapping[str, Any], source: str = "the checkpoint") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Model settings of any version in today's layout: (class path, init args, media settings).

    Args:
        model: stored hyper-parameters, or a stored config's `model` group (flat, or class_path/init_args).
        source: named in the refusal.

    Raises:
        CheckpointError: a class other than `MODEL_CLASSES` is named.
    """
    class_path, args = _flat_model(model)
    class_path = args.pop("_class_path", class_path)
    class_path = canonical(class_path)
    args.pop("_instantiator", None)  # LightningCLI's loader name: never called
    adversarial = bool(args.pop("adversarial", False))
    if class_path is None:
        class_path = SHARPEN_CLASS if adversarial else VAE_CLASS
    if class_path not in MODEL_CLASSES:
        raise CheckpointError(f"{source} names the model class {str(class_path)[:200]!r}, which musicvae does not "
                              f"take from a checkpoint (it builds only {' or '.join(MODEL_CLASSES)} from a file). "
                              "If you trust it, give it yourself: --model CLASS_PATH")
    if class_path != SHARPEN_CLASS:
        for key in SHARPEN_ARGS:
            args.pop(key, None)
    media: dict[str, Any] = {}
    kl = dict(args.get("kl") or {})
    for old, (group, key) in MOVED.items():
        if old in args:
            value = args.pop(old)
            (kl if group == "kl" else media)[key] = value
    if kl:
        args["kl"] = kl
    return class_path, args, media


def current_config(config: Mapping[str, Any], source: str = "the checkpoint") -> dict[str, Any]:
    """A stored run config of any version in today's layout: `model` as class_path/init_args, `media` apart."""
    out = dict(config)
    model = config.get("model")
    if isinstance(model, Mapping):
        class_path, args, media = current_layout(model, source)
        out["model"] = {"class_path": class_path, "init_args": args}
        if media:
            out["media"] = {**media, **(config.get("media") or {})}
    return out
