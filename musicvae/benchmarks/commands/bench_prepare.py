"""Benchmark audio preparation: real-time factor cold and warm, per stage, beside librosa.

`python scripts/bench_prepare.py [--files 20] [--seconds 30] [--workers N] [--out bench.json]`

Generates a collection of stereo OGG/Vorbis files of synthetic music (musicvae.audio.synth), then
measures, in one run on one machine:
  * cold preparation (empty cache) with a process pool and in one process, as seconds of audio
    per second of wall time (the real-time factor);
  * librosa's `load(sr=22050)` + `feature.melspectrogram` over the same files in one process,
    when librosa is installed (`pip install -e ".[bench]"`);
  * where the time goes, stage by stage, in one process with one thread;
  * warm checks (cache present), scaled to seconds per thousand files on a collection of
    `--warm_files` short files.
A benchmark, not a test: timings depend on the machine and on what else runs on it (the load
average is printed beside them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional


import numpy as np
import soundfile as sf
import torch

from musicvae.audio.decode import decode_audio
from musicvae.audio.mel import LogMel, resample
from musicvae.audio.mel_settings import MelSettings
from musicvae.data.cache import build_audio_cache
from musicvae.data.cache_workers import init_worker_process
from musicvae.audio.synth import render_piece
from musicvae.commands.parsing import RawDescription, command_parser, parse_command

MEL = MelSettings()  # the settings librosa is asked to match: 22050 Hz, 1024/256, 128 htk bands


def generate_collection(folder: Path, files: int, seconds: float, rate: int) -> float:
    """Stereo OGG/Vorbis pieces; returns the seconds it took (0 when already there)."""
    marker = folder / f".complete-{files}x{seconds:g}s-{rate}"
    if marker.exists():
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    for index in range(files):
        left = render_piece(index, seconds=seconds, sample_rate=rate)
        right = 0.7 * left + 0.3 * np.roll(left, rate // 100)  # a 10 ms echo: the channels differ
        sf.write(folder / f"piece_{index:03d}.ogg", np.stack([left, right], axis=1), rate,
                 format="OGG", subtype="VORBIS")
    marker.touch()
    return time.perf_counter() - start


def generate_small_files(folder: Path, files: int) -> None:
    """`files` quarter-second WAVs: a collection whose warm check is all per-file overhead."""
    marker = folder / f".complete-{files}"
    if marker.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    wave = 0.1 * np.sin(2 * np.pi * 440.0 * np.arange(5512) / 22050)
    for index in range(files):
        sub = folder / f"album_{index // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        sf.write(sub / f"track_{index:04d}.wav", wave * (1 + index % 7) / 7, 22050, subtype="PCM_16")
    marker.touch()


def _spin(_: int = 0) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    return time.perf_counter() - start


def free_cores(workers: int) -> float:
    """How many cores `workers` busy processes really get now: another tenant shows up here."""
    import multiprocessing

    alone = min(_spin() for _ in range(2))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_spin, range(workers), chunksize=1)
        together = time.perf_counter() - start
    return min(workers, workers * alone / together)  # noise can make `together` look faster


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn(); CPU time is what a busy machine does not inflate."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def librosa_pipeline(paths: list[Path]) -> Optional[Callable[[], None]]:
    try:
        import librosa
    except ImportError:
        return None

    def run() -> None:
        for path in paths:
            y, sr = librosa.load(path, sr=MEL.sample_rate)
            spec = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=MEL.n_fft, hop_length=MEL.hop_length,
                                                  n_mels=MEL.n_mels, htk=True, norm=None)
            np.log(np.maximum(spec, MEL.log_floor))

    return run


STAGES = ("decode + mix to mono", "resample", "STFT + mel + log", "write .npy")


def stages_musicvae(path: Path, scratch: Path, totals: dict[str, float]) -> None:
    """Adds the seconds of each stage of our pipeline on one file to `totals`."""
    to_mel = _log_mel()
    with torch.inference_mode():
        t0 = time.perf_counter()
        wave, rate = decode_audio(path)
        t1 = time.perf_counter()
        wave_t = resample(torch.from_numpy(wave), rate, MEL.sample_rate)
        t2 = time.perf_counter()
        spec = to_mel(wave_t).numpy()
        t3 = time.perf_counter()
        np.save(scratch / "stage.npy", spec)
        t4 = time.perf_counter()
    for key, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        totals[key] += seconds


@functools.lru_cache(maxsize=1)
def _log_mel() -> LogMel:
    return LogMel(MEL)


def stages_librosa(path: Path, totals: dict[str, float]) -> None:
    """The same stages inside librosa.load (soundfile + soxr_hq) and melspectrogram."""
    import librosa

    t0 = time.perf_counter()
    y, rate = librosa.load(path, sr=None)
    t1 = time.perf_counter()
    y = librosa.resample(y, orig_sr=rate, target_sr=MEL.sample_rate, res_type="soxr_hq")
    t2 = time.perf_counter()
    spec = librosa.feature.melspectrogram(y=y, sr=MEL.sample_rate, n_fft=MEL.n_fft, hop_length=MEL.hop_length,
                                          n_mels=MEL.n_mels, htk=True, norm=None)
    np.log(np.maximum(spec, MEL.log_floor))
    t3 = time.perf_counter()
    for key, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2)):
        totals[key] += seconds


def measure_stages(stage_paths: list[Path], work: Path, with_librosa: bool, repeats: int, results: dict) -> None:
    ours, theirs = dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)
    for path in stage_paths:  # file by file, alternating, median of `repeats` per stage and file
        runs_ours, runs_theirs = [dict.fromkeys(STAGES, 0.0) for _ in range(repeats)], []
        for run in runs_ours:
            stages_musicvae(path, work, run)
            if with_librosa:
                runs_theirs.append(dict.fromkeys(STAGES, 0.0))
                stages_librosa(path, runs_theirs[-1])
        for totals, runs_ in ((ours, runs_ours), (theirs, runs_theirs)):
            for stage in STAGES:
                totals[stage] += statistics.median(run[stage] for run in runs_) if runs_ else 0.0
    results["stages_musicvae_s"] = ours
    if with_librosa:
        results["stages_librosa_s"] = theirs
    results["stage_audio_s"] = sum(sf.info(p).duration for p in stage_paths)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = command_parser("bench-prepare", __doc__, formatter_class=RawDescription)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each generated piece")
    parser.add_argument("--rate", type=int, default=48000, help="sample rate of the generated files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the pool run")
    parser.add_argument("--repeats", type=int, default=3, help="cold runs of each pipeline; the median counts")
    parser.add_argument("--stage_files", type=int, default=10, help="files timed stage by stage")
    parser.add_argument("--warm_files", type=int, default=1000, help="short files for the warm-check timing")
    parser.add_argument("--work_dir", default=None, help="keeps the generated audio between runs (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parse_command(parser, argv)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    collection, small = work / "collection", work / "small"
    load_before, cores_before = os.getloadavg(), free_cores(args.workers)
    generated_s = generate_collection(collection, args.files, args.seconds, args.rate)
    paths = sorted(collection.glob("*.ogg"))
    audio_s = sum(sf.info(p).duration for p in paths)
    results: dict = {"files": len(paths), "seconds_of_audio": audio_s, "source": f"stereo {args.rate} Hz OGG/Vorbis",
                     "workers": args.workers, "cpu_count": os.cpu_count(), "generate_s": generated_s}

    def cold(workers: int) -> tuple[float, float]:
        cache = work / f"cache-{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        return timed(lambda: build_audio_cache(collection, cache, MEL, workers=workers))

    # One-time costs (filterbank, resampling kernel, librosa's imports) stay outside the timings.
    stages_musicvae(paths[0], work, dict.fromkeys(STAGES, 0.0))
    librosa_run = librosa_pipeline(paths)
    if librosa_run is not None:
        librosa_pipeline(paths[:1])()
    # Interleaved repeats, median of each: another process on the machine slows all three alike.
    runs: dict[str, list[tuple[float, float]]] = {"musicvae_pool": [], "musicvae_one_process": [], "librosa": []}
    for _ in range(args.repeats):
        runs["musicvae_pool"].append(cold(args.workers))
        runs["musicvae_one_process"].append(cold(0))
        if librosa_run is not None:
            runs["librosa"].append(timed(librosa_run))
    for name, timings in runs.items():
        if timings:
            walls, cpus = zip(*timings)
            results[f"{name}_s"], results[f"{name}_cpu_s"] = statistics.median(walls), statistics.median(cpus)
    results["warm_s"] = statistics.median(
        timed(lambda: build_audio_cache(collection, work / "cache-0", MEL))[0] for _ in range(3)
    )

    # Stages run as in a pool worker (one torch thread, its allocator settings), and librosa's
    # BLAS is held to one thread too where threadpoolctl is there to do it.
    torch_threads = torch.get_num_threads()
    init_worker_process()
    limits: contextlib.AbstractContextManager = contextlib.nullcontext()
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
    with limits:
        measure_stages(paths[: args.stage_files], work, librosa_run is not None, args.repeats, results)
    torch.set_num_threads(torch_threads)

    generate_small_files(small, args.warm_files)
    small_cache = work / "cache-small"
    shutil.rmtree(small_cache, ignore_errors=True)
    results["small_cold_s"] = timed(lambda: build_audio_cache(small, small_cache, MEL, workers=args.workers))[0]
    results["small_warm_s"] = statistics.median(
        timed(lambda: build_audio_cache(small, small_cache, MEL))[0] for _ in range(3)
    )
    results["warm_files"], results["repeats"] = args.warm_files, args.repeats
    results["load_average"] = [load_before, os.getloadavg()]
    results["free_cores"] = [cores_before, free_cores(args.workers)]
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return results


def print_table(r: dict) -> None:
    audio = r["seconds_of_audio"]
    print(f"collection: {r['files']} files, {audio:.0f} s of {r['source']} audio "
          f"(generated in {r['generate_s']:.1f} s); {r['cpu_count']} cores; "
          f"load average {r['load_average'][0][0]:.2f} before, {r['load_average'][1][0]:.2f} after")
    free = r["free_cores"]
    print(f"cores free for {r['workers']} busy processes: {free[0]:.1f} before, {free[1]:.1f} after "
          f"(below {r['workers']}: another process shares the machine)")
    print(f"\n{'cold preparation (median of ' + str(r['repeats']) + ')':44s} {'wall s':>8s} {'x real time':>12s} "
          f"{'CPU s':>7s} {'x real time per CPU s':>22s}")
    rows = [(f"musicvae, {r['workers']} worker processes", "musicvae_pool"),
            ("musicvae, in one process", "musicvae_one_process")]
    if "librosa_s" in r:
        rows.append(("librosa load + melspectrogram, one process", "librosa"))
    for name, key in rows:
        wall, cpu = r[f"{key}_s"], r[f"{key}_cpu_s"]
        print(f"{name:44s} {wall:8.2f} {audio / wall:12.1f} {cpu:7.2f} {audio / cpu:22.1f}")
    if "librosa_s" in r:
        ratio = r["librosa_s"] / r["musicvae_pool_s"]
        print(f"real-time factor, musicvae ({r['workers']} workers) / librosa: {ratio:.2f}x")
    per_thousand = r["small_warm_s"] / r["warm_files"] * 1000
    print(f"\nwarm cache check: {r['files']} files in {r['warm_s'] * 1000:.1f} ms; {r['warm_files']} files in "
          f"{r['small_warm_s'] * 1000:.1f} ms = {per_thousand:.3f} s per 1000 files "
          f"(their cold preparation: {r['small_cold_s']:.1f} s)")
    stage_audio = r["stage_audio_s"]
    print(f"\nstages over {stage_audio:.0f} s of audio, as in a pool worker (one thread), median of {r['repeats']}: "
          f"ms per minute of audio")
    print(f"{'stage':24s} {'musicvae':>10s} {'librosa':>10s}")
    lib = r.get("stages_librosa_s", {})
    for stage, seconds in r["stages_musicvae_s"].items():
        other = f"{lib[stage] / stage_audio * 60000:10.0f}" if stage in lib else f"{'-':>10s}"
        print(f"{stage:24s} {seconds / stage_audio * 60000:10.0f} {other}")
    total = sum(r["stages_musicvae_s"].values())
    other = f"{sum(lib.values()) / stage_audio * 60000:10.0f}" if lib else f"{'-':>10s}"
    print(f"{'total':24s} {total / stage_audio * 60000:10.0f} {other}")


if __name__ == "__main__":
    main()
