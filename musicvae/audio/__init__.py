"""Sound in and out: mel settings, decoding, the log-mel front end, the vocoder, synthetic music."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "AUDIO_SUFFIXES": "mel",
    "AudioError": "mel",
    "LogMel": "mel",
    "MelSettings": "mel",
    "audio_to_log_mel": "mel",
    "decode_audio": "mel",
    "load_audio": "mel",
    "log_mel": "mel",
    "mono_to_log_mel": "mel",
    "read_mel_sidecar": "mel",
    "resample": "mel",
    "write_mel_sidecar": "mel",
    "GriffinLimVocoder": "vocoder",
    "render_piece": "synth",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['mel', 'synth', 'vocoder'])
