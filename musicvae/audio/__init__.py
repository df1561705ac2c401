"""Sound in and out: mel settings, decoding, the log-mel front end, the vocoders, synthetic music."""

from musicvae._lazy import lazy_exports

_EXPORTS = {
    "AUDIO_SUFFIXES": "decode",
    "AudioError": "decode",
    "decode_audio": "decode",
    "MelSettings": "mel_settings",
    "read_mel_sidecar": "mel_settings",
    "write_mel_sidecar": "mel_settings",
    "LogMel": "mel",
    "audio_to_log_mel": "mel",
    "load_audio": "mel",
    "log_mel": "mel",
    "mono_to_log_mel": "mel",
    "resample": "mel",
    "GriffinLimVocoder": "vocoder",
    "VOCOS_MEL_24KHZ": "neural_vocoder",
    "VocosVocoder": "neural_vocoder",
    "load_vocos": "neural_vocoder",
    "make_vocoder": "neural_vocoder",
    "render_piece": "synth",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ['decode', 'mel', 'mel_settings', 'neural_vocoder', 'synth', 'vocoder'])
