"""Sound in and out: mel settings, decoding, the log-mel front end, the vocoders, synthetic music."""

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
    "VOCOS_MEL_24KHZ": "neural_vocoder",
    "VocosVocoder": "neural_vocoder",
    "load_vocos": "neural_vocoder",
    "make_vocoder": "neural_vocoder",
    "render_piece": "synth",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['mel', 'neural_vocoder', 'synth', 'vocoder'])
