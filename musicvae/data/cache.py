"""A folder of audio files -> cached log-mel arrays, computed once and reused while fresh.

One cache folder per (data folder, mel settings), see `cache_folder`:

    manifest.json     entries (usable recordings), failures and retries, keyed by path relative to data_dir
    mel.json          the mel settings, as in any folder of precomputed arrays
    arrays/<rel>.npy  one (n_mels, frames) float32 log-mel array per usable recording

An entry is fresh while its source has the size and modification time recorded with it, so a
warm check is a stat() and a dictionary lookup per file, never a decode. Failures are recorded
the same way, so a warm run reports a broken file again without decoding it again. A failure
that is not the file's fault (memory ran out, its process was killed from outside, the build was
interrupted, the disk filled) is not a failure: the next build tries the file again. Those of the
first two kinds are counted under "retries", and the MAX_RETRIES-th is recorded as a failure.

Arrays, the manifest and mel.json are written to a temporary file in their own folder and then
`os.replace`d: a kill leaves each of them either whole or absent, never half-written. The
manifest is saved every few seconds during a build, so a killed build keeps most of its work;
an array written after the last save is simply recomputed next time.

Each file to compute is one job (musicvae/data/cache_job.py), run in worker processes
(musicvae/data/cache_workers.py); this module decides which files need one and keeps the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from musicvae.audio.decode import AUDIO_SUFFIXES
from musicvae.audio.mel_settings import MelSettings
from musicvae.data.cache_job import VANISHED
from musicvae.data.cache_workers import init_worker_process, run_jobs, run_jobs_in_processes
from musicvae.io.atomic import remove_abandoned, write_atomic
from musicvae.io.storage import StorageError
from musicvae.data.listing import link_problem, list_folder
from musicvae.errors import DataError, printable

# init_worker_process is not used here: it was defined here before the jobs became modules of
# their own (musicvae/data/cache_job.py, cache_workers.py), and still imports from here.

#: Bump when the arrays or the manifest change meaning, so older caches are not reused.
CACHE_VERSION = 1
MANIFEST = "manifest.json"
_SAVE_EVERY_S = 5.0  # manifest saves during a build: at most this much work is lost to a kill
#: Builds that may fail on a file for reasons not its own (memory ran out, its process was
#: killed) before the file is recorded as unusable: a file that exhausts memory by itself each
#: time must not be retried forever.
MAX_RETRIES = 3
# Files that vanished between listing and reading in the last build of each cache folder in this
# process: {folder: {rel: reason}}. A training run builds twice (prepare_data, then setup, whose
# build the run reports), and the second listing no longer sees such a file; it is named from here.
_vanished_last_build: dict[str, dict[str, str]] = {}


@dataclass
class CacheEntry:
    """One usable recording and its cached log-mel array.

    Attributes:
        rel: POSIX path of the source relative to the data folder (the key of the split).
        source: absolute path of the audio file.
        array: absolute path of its (n_mels, n_frames) float32 `.npy` array.
        n_frames: time frames in the array.
        duration: seconds of audio in the source.
        sample_rate: the source's native sample rate.
    """

    rel: str
    source: str
    array: str
    n_frames: int
    duration: float
    sample_rate: int


@dataclass
class CacheReport:
    """What a build found: usable entries (sorted by rel), unusable files, and the work done.

    Attributes:
        entries: one per usable recording.
        problems: (path, reason) for each file that cannot be used, each reported once.
        computed: entries (and failures) decoded by this build.
        reused: entries (and failures) taken from the manifest without decoding.
        seconds_of_audio: total duration of the entries.
    """

    entries: list[CacheEntry] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    seconds_of_audio: float = 0.0


def cache_folder(cache_dir: str | os.PathLike, data_dir: str | os.PathLike, mel: MelSettings) -> Path:
    """The cache folder of one data folder (by absolute path) under one set of mel settings."""
    data_dir = Path(data_dir).expanduser().resolve()
    key = json.dumps({"v": CACHE_VERSION, "data_dir": str(data_dir), "mel": mel.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", data_dir.name) or "root"
    return Path(cache_dir).expanduser().resolve() / "audio" / f"{name}-{digest}"


def find_audio_files(data_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of the audio files under `data_dir`, sorted, and problems: directories
    that carry an audio suffix, and symbolic links that loop (musicvae.data.listing: links to
    folders are followed, each folder once)."""
    listing = list_folder(data_dir)
    problems = [(str(Path(data_dir) / rel), "is a directory, not an audio file") for rel in listing.dirs
                if os.path.splitext(rel)[1].lower() in AUDIO_SUFFIXES]
    found = [rel for rel in listing.files if os.path.splitext(rel)[1].lower() in AUDIO_SUFFIXES]
    return found, problems + listing.loops


def _load_manifest(folder: Path, data_dir: Path, mel: MelSettings) -> dict[str, Any]:
    empty = {"version": CACHE_VERSION, "data_dir": str(data_dir), "mel": mel.to_dict(), "entries": {}, "failures": {},
             "retries": {}}
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return empty  # no manifest yet; a corrupt one is rebuilt rather than trusted
    if not isinstance(manifest, dict) or any(manifest.get(k) != empty[k] for k in ("version", "data_dir", "mel")):
        return empty
    if not isinstance(manifest.get("entries"), dict) or not isinstance(manifest.get("failures"), dict):
        return empty
    if not isinstance(manifest.setdefault("retries", {}), dict):  # absent from caches of earlier versions
        return empty
    return manifest


def _save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_atomic(folder / MANIFEST, lambda h: json.dump(manifest, h, separators=(",", ":")), mode="w")



def build_audio_cache(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    mel: MelSettings,
    workers: int = 0,
    progress: bool = False,
    decode_timeout: Optional[float] = None,
) -> CacheReport:
    """Bring the log-mel cache of every audio file under `data_dir` up to date.

    Args:
        data_dir: folder searched recursively for AUDIO_SUFFIXES files; only read.
        cache_dir: root of the caches; this folder's cache is `cache_folder(cache_dir, data_dir, mel)`.
        mel: the mel settings of the arrays.
        workers: processes that decode in parallel; 0 decodes in this process.
        progress: show a progress bar (tqdm, on stderr) over the files to compute.
        decode_timeout: seconds one file may take to decode and store, each in a process of its
            own that is killed when it runs over (the file is then reported like any bad file);
            None: no limit, in `workers` pooled processes (or this one).

    Returns:
        The usable entries sorted by path, the unusable files with reasons, and the counts.

    Raises:
        DataError: `data_dir` is not a folder.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: the audio folder does not exist or is not a folder")
    folder = cache_folder(cache_dir, data_dir, mel)
    arrays = folder / "arrays"
    arrays.mkdir(parents=True, exist_ok=True)
    remove_abandoned(folder)
    old = _load_manifest(folder, data_dir, mel)
    manifest = {**old, "entries": {}, "failures": {}, "retries": {}}
    rels, problems = find_audio_files(data_dir)
    report = CacheReport()
    jobs = []
    listed = set(rels)
    vanished: dict[str, str] = {}  # rel -> reason, for files gone between listing and reading
    interrupted: set[str] = set()
    earlier = _vanished_last_build.pop(str(folder), {})
    problems += [(str(data_dir / rel), reason) for rel, reason in earlier.items() if rel not in listed]
    for rel in rels:
        source = data_dir / rel
        try:
            st = os.stat(source)
        except OSError as err:
            if link_problem(source, err):
                problems.append((str(source), link_problem(source, err)))
            elif isinstance(err, FileNotFoundError):
                vanished[rel] = VANISHED
            else:
                problems.append((str(source), f"cannot stat ({err.strerror})"))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append((str(source), "not a regular file"))
            continue
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entry, failure = old["entries"].get(rel), old["failures"].get(rel)
        if entry and _matches(entry, key) and os.path.exists(folder / entry["array"]):
            manifest["entries"][rel] = entry
            report.reused += 1
        elif failure and _matches(failure, key):
            manifest["failures"][rel] = failure
            report.reused += 1
        else:
            retry = old["retries"].get(rel)
            if retry and _matches(retry, key):
                manifest["retries"][rel] = retry  # kept until this build settles the file
            jobs.append((str(source), rel, str(arrays / f"{rel}.npy"), mel, st.st_size, st.st_mtime_ns))
    bar = _progress_bar(len(jobs), report.reused, progress)
    last_save = time.monotonic()

    def on_result(record: dict[str, Any]) -> None:
        nonlocal last_save
        rel = record.pop("rel")
        if "fault" in record:
            done = len(manifest["entries"])
            raise StorageError(
                f"log-mel cache not written: {record['fault']}. Preparation stopped at {rel}; the {done} arrays "
                f"already in {folder} are kept, and the next run continues from there once there is room "
                "(or choose another --data.cache_dir)")
        if record.get("interrupted"):
            interrupted.add(rel)  # Ctrl-C in its decoding process: nothing is recorded
            return
        retry = manifest["retries"].pop(rel, None)
        if "transient" in record:
            count = (retry or {}).get("count", 0) + 1
            if count < MAX_RETRIES:
                manifest["retries"][rel] = {**record, "count": count}
            else:
                reason = record.pop("transient")
                manifest["failures"][rel] = {**record, "error": f"{reason}, in {count} builds in a row; "
                                                                 "not tried again until the file changes"}
        elif record.pop("vanished", False):
            vanished[rel] = record["error"]  # not recorded: there is no file left to key it by
        elif "error" in record:
            manifest["failures"][rel] = record
        else:
            manifest["entries"][rel] = {**record, "array": f"arrays/{rel}.npy"}
        report.computed += 1
        if bar is not None:
            bar.update(1)
        if time.monotonic() - last_save > _SAVE_EVERY_S:
            _save_manifest(folder, manifest)
            last_save = time.monotonic()

    try:
        if decode_timeout is None:
            run_jobs(jobs, workers, on_result)
        else:
            run_jobs_in_processes(jobs, workers, on_result, decode_timeout)
    finally:
        if bar is not None:
            bar.close()
        if jobs or manifest["entries"].keys() != old["entries"].keys() or manifest["retries"] != old["retries"]:
            _save_manifest(folder, manifest)
    # Arrays of recordings that are gone, or no longer decode, go with their entries.
    for rel, entry in old["entries"].items():
        if rel not in manifest["entries"]:
            (folder / entry["array"]).unlink(missing_ok=True)
    if not (folder / "mel.json").exists():
        write_atomic(folder / "mel.json", lambda h: h.write(json.dumps(mel.to_dict(), indent=2) + "\n"), "w")

    for rel in rels:
        if rel in manifest["entries"]:
            e = manifest["entries"][rel]
            report.entries.append(CacheEntry(rel, str(data_dir / rel), str(folder / e["array"]),
                                             e["n_frames"], e["duration"], e["sample_rate"]))
        elif rel in manifest["failures"]:
            problems.append((str(data_dir / rel), manifest["failures"][rel]["error"]))
        elif rel in interrupted:
            problems.append((str(data_dir / rel), "its decoding was interrupted (Ctrl-C); the next run tries it again"))
        elif rel in manifest["retries"]:
            retry = manifest["retries"][rel]
            problems.append((str(data_dir / rel), f"{retry['transient']}; not the file's fault, so the next run "
                                                  f"tries it again ({retry['count']} of {MAX_RETRIES} tries)"))
    problems += [(str(data_dir / rel), reason) for rel, reason in vanished.items()]
    if vanished:
        _vanished_last_build[str(folder)] = vanished
    report.problems = sorted((printable(path), printable(reason)) for path, reason in problems)  # one line each
    report.seconds_of_audio = float(sum(e.duration for e in report.entries))
    return report


def _matches(record: dict[str, Any], key: dict[str, int]) -> bool:
    return record.get("size") == key["size"] and record.get("mtime_ns") == key["mtime_ns"]


def _progress_bar(total: int, reused: int, enabled: bool) -> Optional[Any]:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc=f"log-mel ({reused} cached)", dynamic_ncols=True)
