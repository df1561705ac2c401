"""Deterministic synthetic music: the project's built-in default data.

Each piece is a short 4/4 song with its own key, scale, tempo, chord progression,
arrangement and instrument timbres: a lead melody with rests and repeated phrases,
a chord part, a bass line and drums (kick = pitched-down sine sweep, snare and
hi-hat = filtered noise bursts). Everything is drawn from
``numpy.random.default_rng([seed, index])``, so piece ``i`` is the same however
many pieces are rendered, and on any machine.

Notes are read from band-limited wavetables and added into the piece one short
array at a time: a 20 s piece takes tens of milliseconds, with no per-sample loop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_TABLE = 2048  # wavetable length; with linear interpolation its error sits ~70 dB down
_SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "harmonic_minor": (0, 2, 3, 5, 7, 8, 11),
}
# Scale degrees of the chord roots, one chord per bar; the melody's phrase is as long.
_PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 0), (5, 3, 0, 4), (1, 4, 0, 0), (0, 6, 5, 4), (0, 3))
# Drum patterns as sixteenth-note steps within a bar.
_KICKS = ((0, 8), (0, 4, 8, 12), (0, 6, 8), (0, 3, 8, 11), (0, 10))
_SNARES = ((4, 12), (8,), (4, 12, 15), (4, 10, 12))
_HATS = (tuple(range(0, 16, 2)), tuple(range(16)), (2, 6, 10, 14), (0, 4, 8, 12))
# Bass figures per bar as (start, length, degree offset from the chord root) in eighths.
_BASS = {"whole": ((0, 8, 0),), "quarters": tuple((i, 2, 0) for i in (0, 2, 4, 6)),
         "octaves": tuple((i, 1, 7 * (i % 2)) for i in range(8)),
         "root_fifth": ((0, 3, 0), (3, 1, 0), (4, 2, 4), (6, 2, 0))}


@dataclass(frozen=True)
class SynthConfig:
    """How many pieces of synthetic music to render, and how.

    Attributes:
        n_pieces: Number of recordings.
        seconds: Length of each recording.
        sample_rate: Samples per second.
        seed: Collection seed; piece ``i`` draws from ``default_rng([seed, i])``.
    """

    n_pieces: int = 48
    seconds: float = 20.0
    sample_rate: int = 22050
    seed: int = 0


@dataclass(frozen=True)
class Voice:
    """Timbre and envelope of one pitched instrument."""

    rolloff: float  # partial k has amplitude k**-rolloff: ~0.7 is bright (saw-like), ~3 mellow
    odd_only: bool  # even partials missing: the hollow clarinet/square colour
    n_partials: int
    attack: float  # seconds
    decay: float  # seconds, time constant of the fall from the peak to the sustain level
    sustain: float  # level in [0, 1]; near 0 gives a plucked or struck note
    release: float  # seconds of linear fade after the note ends
    vibrato: float  # depth as a fraction of the frequency; 0 for none
    gain: float


@dataclass(frozen=True)
class PieceSpec:
    """The global choices behind one piece: the labels a latent space could be probed with."""

    bpm: float
    root: int  # MIDI note of the tonic, in octave 3
    scale: str
    progression: tuple[int, ...]
    chord_style: str  # "held", "stabs" or "arpeggio"
    bass_style: str
    lead: Voice
    chords: Voice
    bass: Voice
    drums: tuple[tuple[int, ...], ...]  # kick, snare and hi-hat patterns
    swing: float  # delay of the off-beat eighths, as a fraction of a sixteenth
    rest_prob: float  # chance that a melody slot is a rest
    intro: bool  # the lead sits out the first phrase


def _voice(rng: np.random.Generator, rolloff, partials, attack, sustain, release, gain, vibrato_p) -> Voice:
    """Draws a voice; each range argument is a (low, high) pair."""
    vibrato = rng.uniform(0.003, 0.012) if rng.random() < vibrato_p else 0.0
    return Voice(rng.uniform(*rolloff), bool(rng.random() < 0.25), int(rng.integers(*partials)),
                 rng.uniform(*attack), rng.uniform(0.08, 0.5), rng.uniform(*sustain), rng.uniform(*release),
                 vibrato, rng.uniform(*gain))


def _draw_spec(rng: np.random.Generator) -> PieceSpec:
    chord_style = ("held", "stabs", "arpeggio")[rng.integers(3)]
    return PieceSpec(
        bpm=rng.uniform(72.0, 160.0), root=int(rng.integers(48, 60)),
        scale=list(_SCALES)[rng.integers(len(_SCALES))],
        progression=_PROGRESSIONS[rng.integers(len(_PROGRESSIONS))],
        chord_style=chord_style, bass_style=list(_BASS)[rng.integers(len(_BASS))],
        lead=_voice(rng, (0.7, 2.5), (6, 30), (0.005, 0.08), (0.0, 0.9), (0.03, 0.25), (0.5, 0.8), 0.5),
        # Held chords swell slowly like a pad; stabs and arpeggios need a sharp attack.
        chords=_voice(rng, (1.2, 3.0), (4, 16), (0.05, 0.3) if chord_style == "held" else (0.005, 0.02),
                      (0.3, 0.8), (0.1, 0.4), (0.12, 0.25), 0.0),
        bass=_voice(rng, (1.0, 2.5), (4, 16), (0.005, 0.02), (0.3, 0.8), (0.04, 0.1), (0.5, 0.8), 0.0),
        drums=tuple(p[rng.integers(len(p))] for p in (_KICKS, _SNARES, _HATS)),
        swing=rng.choice([0.0, rng.uniform(0.1, 0.35)]),
        rest_prob=rng.uniform(0.05, 0.35), intro=bool(rng.random() < 0.3),
    )


def describe_piece(index: int, seed: int = 0) -> PieceSpec:
    """The tempo, key, scale, arrangement and timbres of piece ``index``.

    Args:
        index: Piece number.
        seed: Collection seed.

    Returns:
        The spec ``render_piece(index, seed=seed)`` plays.
    """
    return _draw_spec(np.random.default_rng([seed, index]))


@functools.lru_cache(maxsize=1024)
def _wavetable(rolloff: float, odd_only: bool, n_partials: int) -> np.ndarray:
    """One cycle of a harmonic tone, (_TABLE + 1,) with a guard sample for interpolation."""
    k = np.arange(1, n_partials + 1)
    amps = k ** -rolloff
    if odd_only:
        amps[1::2] = 0.0
    table = amps @ np.sin(2 * np.pi * np.outer(k, np.arange(_TABLE + 1) / _TABLE))
    table /= np.abs(table).max()
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def _tone(freq: float, seconds: float, v: Voice, sr: int) -> np.ndarray:
    """One note with its release tail, (round((seconds + release) * sr),)."""
    n_hold = round(seconds * sr)
    t = np.arange(n_hold + round(v.release * sr)) / sr
    if v.vibrato:
        # Vibrato fades in over 0.3 s as a player's does, so short notes stay on pitch.
        depth = v.vibrato * np.minimum(t / 0.3, 1.0)
        cycles = np.cumsum(freq * (1.0 + depth * np.sin(2 * np.pi * 5.5 * t))) / sr
    else:
        cycles = freq * t
    # Keep every partial below 0.45 sr: aliases would be inharmonic lines in the mel.
    n_partials = max(1, min(v.n_partials, int(0.45 * sr / (freq * (1 + v.vibrato)))))
    table = _wavetable(v.rolloff, v.odd_only, n_partials)
    pos = (cycles % 1.0) * _TABLE
    i = pos.astype(np.intp)
    wave = table[i] + (pos - i) * (table[i + 1] - table[i])
    rise = np.minimum(t / v.attack, 1.0)
    fall = v.sustain + (1.0 - v.sustain) * np.exp(-np.maximum(t - v.attack, 0.0) / v.decay)
    release = np.clip(1.0 - (t - n_hold / sr) / v.release, 0.0, 1.0)
    return wave * rise * fall * release * v.gain


def _band_noise(rng: np.random.Generator, n: int, sr: int, low: float, high: float) -> np.ndarray:
    """Unit-variance white noise shaped to ``low``..``high`` Hz by 4th-order soft edges, (n,)."""
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    gain = 1.0 / ((1.0 + (low / np.maximum(freqs, 1.0)) ** 4) * (1.0 + (freqs / high) ** 4))
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n)
    return noise / noise.std()


def _drum_kit(rng: np.random.Generator, sr: int) -> dict[str, list[np.ndarray]]:
    """A piece's kick, snare and hi-hat samples; four takes of the noisy ones so hits differ."""
    t = np.arange(round(0.5 * sr)) / sr
    f_hi, f_lo, tau = rng.uniform(110, 200), rng.uniform(40, 60), rng.uniform(0.02, 0.06)
    # Exponential pitch drop integrated in closed form: the 808-style kick.
    kick = np.sin(2 * np.pi * (f_lo * t + (f_hi - f_lo) * tau * (1 - np.exp(-t / tau))))
    kick *= np.exp(-t / rng.uniform(0.12, 0.35))
    snare_env, hat_env = np.exp(-t / rng.uniform(0.03, 0.08)), np.exp(-t / rng.uniform(0.01, 0.04))
    body = 0.4 * np.sin(2 * np.pi * rng.uniform(160, 240) * t) * np.exp(-t / 0.04)
    hat_low = rng.uniform(5000, 8000)
    return {
        "kick": [kick],
        "snare": [(0.35 * _band_noise(rng, t.size, sr, 1000, 7000) + body) * snare_env for _ in range(4)],
        "hat": [0.25 * _band_noise(rng, t.size, sr, hat_low, 14000) * hat_env for _ in range(4)],
    }


def _melody(rng: np.random.Generator, spec: PieceSpec, n_bars: int) -> list[tuple[int, int, int]]:
    """(start, length, degree) in eighths and scale degrees above the octave-4 tonic."""
    bars = len(spec.progression)
    phrases: list[list[tuple[int, int, int]]] = []
    for _ in range(math.ceil(n_bars / bars)):
        # Songs repeat their phrases; repetition is also structure a VAE can pick up.
        if phrases and rng.random() < 0.5:
            phrases.append(phrases[rng.integers(len(phrases))])
            continue
        notes, step, degree = [], 0, int(rng.integers(0, 8))
        while step < bars * 8:
            length = min(int(rng.choice([1, 2, 2, 3, 4, 6])), bars * 8 - step)
            if step % 8 == 0:  # downbeats land on a chord tone so the harmony is heard
                chord = spec.progression[step // 8]
                degree = min((chord + o + 7 * m for o in (0, 2, 4) for m in (-1, 0, 1, 2)),
                             key=lambda d: abs(d - degree))
            if rng.random() >= spec.rest_prob:
                notes.append((step, length, degree))
            degree = int(np.clip(degree + rng.choice([-3, -2, -1, -1, 0, 1, 1, 2, 3]), -2, 13))
            step += length
        phrases.append(notes)
    start = 1 if spec.intro and len(phrases) > 1 else 0
    return [(8 * bars * p + s, n, d) for p in range(start, len(phrases)) for s, n, d in phrases[p]]


def _pitched(rng: np.random.Generator, spec: PieceSpec, n_bars: int) -> list[tuple[int, int, int, Voice]]:
    """All (start, length in eighths, MIDI note, voice) events of a piece."""
    scale = _SCALES[spec.scale]

    def midi(octave_root: int, degree: int) -> int:
        return octave_root + 12 * (degree // 7) + scale[degree % 7]

    events = [(s, n, midi(spec.root + 12, d), spec.lead) for s, n, d in _melody(rng, spec, n_bars)]
    sevenths = rng.random() < 0.4
    for bar in range(n_bars):
        chord = spec.progression[bar % len(spec.progression)]
        tones = [chord + o for o in ((0, 2, 4, 6) if sevenths else (0, 2, 4))]
        hits = {"held": [(0, 8, tones)], "stabs": [(s, 1, tones) for s in (2, 6)],
                "arpeggio": [(s, 1, [tones[s % len(tones)]]) for s in range(8)]}[spec.chord_style]
        events += [(8 * bar + s, n, midi(spec.root, d), spec.chords) for s, n, ds in hits for d in ds]
        bass = _BASS[spec.bass_style]
        events += [(8 * bar + s, n, midi(spec.root - 12, chord + o), spec.bass) for s, n, o in bass]
    return events


def render_piece(index: int, seconds: float = 20.0, sample_rate: int = 22050, seed: int = 0) -> np.ndarray:
    """Renders piece ``index`` of the synthetic collection.

    Args:
        index: Piece number; its parameters come from ``default_rng([seed, index])``.
        seconds: Length of the recording.
        sample_rate: Samples per second.
        seed: Collection seed.

    Returns:
        Mono float32 waveform, (round(seconds * sample_rate),), peak-normalised to 0.9.
    """
    rng = np.random.default_rng([seed, index])
    spec = _draw_spec(rng)
    sr, n = sample_rate, round(seconds * sample_rate)
    eighth = 30.0 / spec.bpm
    n_bars = max(1, math.ceil(seconds / (8 * eighth)))
    out = np.zeros(n + 2 * sr)  # room for release tails and drum decays past the end
    for start, length, note, voice in _pitched(rng, spec, n_bars):
        at = round(start * eighth * sr)
        if at < n:
            # Velocity varies per note like a player's touch.
            tone = _tone(440.0 * 2 ** ((note - 69) / 12), length * eighth, voice, sr) * rng.uniform(0.7, 1.0)
            out[at : at + tone.size] += tone[: out.size - at]
    kit = _drum_kit(rng, sr)
    for bar in range(n_bars):
        if rng.random() < 0.08:  # an occasional break: the drums drop out for a bar
            continue
        for name, steps in zip(("kick", "snare", "hat"), spec.drums):
            for step in steps:
                swing = spec.swing if step % 4 == 2 else 0.0
                at = round((16 * bar + step + swing) * eighth / 2 * sr)
                if at < n:
                    # Accent hats on the beat, as drummers do.
                    gain = rng.uniform(0.8, 1.0) * (1.0 if name != "hat" or step % 4 == 0 else 0.6)
                    hit = kit[name][rng.integers(len(kit[name]))]
                    out[at : at + hit.size] += gain * hit[: out.size - at]
    out = out[:n]
    peak = np.abs(out).max() if n else 0.0
    return (out * (0.9 / peak if peak > 0 else 1.0)).astype(np.float32)


def render_collection(config: SynthConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Renders every piece of a synthetic collection, one at a time.

    Args:
        config: How many pieces, how long, at what rate, from which seed.

    Yields:
        ``(name, waveform)`` with names ``piece_000``, ``piece_001``, ... and waveforms
        as returned by :func:`render_piece`.
    """
    for index in range(config.n_pieces):
        yield f"piece_{index:03d}", render_piece(index, config.seconds, config.sample_rate, config.seed)
