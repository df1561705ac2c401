"""Loading a checkpoint never runs code, end to end, through every script that loads one.

Crafted checkpoints (a real one plus an object whose unpickling writes a marker file, saved in
torch's format, torch's legacy format and as a bare pickle), a truncated copy, an empty file, a
text file and a torch file of another kind are given to each loader as a user would:
`python scripts/X.py ...`. Each must exit 2 with one clear line naming the file, no traceback,
no marker and nothing written. `scripts/checkpoints.py` lists the same files beside a good one.
The same commands with the unmodified checkpoint succeed (the refusal is about the file), and
loading the crafted files with `weights_only=False` does write the markers (the payloads are live).

Every command runs in the test's process (tests/helpers.py, run_command: its main with its argv,
its exit status, stdout and stderr as a console shows them, Lightning's log lines included): a payload
that ran would write its marker from there as from a process of its own, and nothing else a process
would add is under test. All of it runs once, in a module fixture; the tests read the results.
"""

from __future__ import annotations

import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_fit_args
from helpers import run_command

#: Kinds with a payload; each file writes its own marker if its unpickling runs.
PAYLOADS = ("payload", "payload_legacy", "payload_pickle")
#: Scripts that take one checkpoint: with --ckpt_path, or (init_from) train.py with --model.init_from.
LOADERS = ("train", "evaluate", "generate", "export", "init_from")
#: Bad files, and what the message must say about each.
REFUSED = r"refused: the file contains Python objects that would run code"
BAD = {
    "payload": REFUSED,  # a real checkpoint plus the payload, in torch's zip format
    "payload_legacy": REFUSED,  # the same in torch's pre-1.6 format (another code path in torch.load)
    "payload_pickle": REFUSED,  # a bare pickle (protocol 2, torch's), not torch's format at all
    "truncated": r"truncated or not a checkpoint",
    "empty": r"truncated or not a checkpoint|empty",
    "text": r"truncated or not a checkpoint",
    "foreign": r"not a (Lightning|musicvae) checkpoint",
}


class Payload:
    """Unpickling this runs `code`: what a crafted checkpoint does to `torch.load(weights_only=False)`."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def write_payload(kind: str, real: dict, marker: Path, target: Path) -> None:
    """A real checkpoint with one more key whose unpickling creates `marker`, saved as `kind` says."""
    payload = Payload(f"open({str(marker)!r}, 'w').write('pwned')")
    if kind == "payload_pickle":  # the payload first, so it is the first thing an unpickler meets
        target.write_bytes(pickle.dumps({"musicvae_note": payload, **real}, protocol=2))
    else:
        torch.save({**real, "musicvae_note": payload}, target, _use_new_zipfile_serialization=kind == "payload")


def loader_command(loader: str, ckpt: Path, out: Path) -> tuple[str, list[str]]:
    """The user's command for `loader` on `ckpt` (scripts/SCRIPT.py ARGS); whatever it would write goes under `out`."""
    if loader == "init_from":  # a new run from the file's weights (the adversarial stage starts this way)
        return "train", tiny_fit_args(out, "--trainer.max_epochs", "1", "--model.init_from", str(ckpt))
    if loader == "train":  # resume; a started run would write its cache, checkpoints and logs under out
        return "train", tiny_fit_args(out, "--trainer.max_epochs", "3", "--ckpt_path", str(ckpt))
    if loader == "evaluate":
        return "evaluate", ["--ckpt_path", str(ckpt), "--out", str(out / "report")]
    if loader == "generate":
        return "generate", ["sample", "--ckpt_path", str(ckpt), "-n", "1", "--griffin_lim_iters", "1", "--seed", "0",
                            "--out", str(out / "samples")]
    return "export", ["--ckpt_path", str(ckpt), "--out", str(out / "model.pt")]


def load_unsafely(paths: list[Path]) -> subprocess.CompletedProcess:
    """The unsafe way to load, for the control: a bare pickle runs its payload, then fails torch's checks."""
    failures = []
    for path in paths:
        try:
            torch.load(path, weights_only=False)
        except Exception as err:  # noqa: BLE001 - the payload has run by then; the control only needs that
            failures.append(f"{path} {err}")
    return subprocess.CompletedProcess(["torch.load"], 0, "\n".join(failures), "")


@pytest.fixture(scope="module")
def hostile(tiny_run, tmp_path_factory) -> dict:
    """The crafted files, and every loader's run on each of them and on the real checkpoint."""
    root = tmp_path_factory.mktemp("hostile")
    real_path = tiny_run["ckpt_dir"] / "last.ckpt"
    real = torch.load(real_path, map_location="cpu", weights_only=True)
    data = real_path.read_bytes()
    good = root / "good.ckpt"
    shutil.copyfile(real_path, good)

    def bad_files(name: str) -> dict[str, Path]:
        folder = root / name
        folder.mkdir()
        files = {kind: folder / f"{kind}.ckpt" for kind in BAD}
        for kind in PAYLOADS:
            write_payload(kind, real, markers[name, kind], files[kind])
        files["truncated"].write_bytes(data[: len(data) // 2])
        files["empty"].write_bytes(b"")
        files["text"].write_text("epoch: 3\nstate_dict: weights.bin\n")
        torch.save({"a": torch.ones(2)}, files["foreign"])
        return files

    # One marker per crafted file, so a payload that runs is traced to the loader that ran it.
    markers = {(name, kind): root / "markers" / f"PWNED-{name}-{kind}"
               for name in (*LOADERS, "listing", "control") for kind in PAYLOADS}
    (root / "markers").mkdir()
    files = {name: bad_files(name) for name in (*LOADERS, "listing", "control")}
    shutil.copyfile(real_path, root / "listing" / "good.ckpt")

    jobs = {(loader, kind): loader_command(loader, path, root / f"out-{loader}-{kind}")
            for loader in LOADERS for kind, path in files[loader].items()}
    jobs.update({(loader, "good"): loader_command(loader, good, root / f"out-{loader}-good") for loader in LOADERS})
    jobs[("listing", "all")] = ("checkpoints", [str(root / "listing")])
    results = {key: run_command(script, args, cwd=REPO) for key, (script, args) in jobs.items()}
    # Only now, after every loader has run: each payload, loaded the unsafe way, does run.
    results[("control", "unsafe")] = load_unsafely([files["control"][k] for k in PAYLOADS])
    return {"root": root, "files": files, "markers": markers, "results": results, "good": good}


def output_root(hostile: dict, loader: str, kind: str) -> Path:
    return hostile["root"] / f"out-{loader}-{kind}"


@pytest.mark.slow
def test_the_payload_runs_when_loaded_without_weights_only(hostile):
    result = hostile["results"][("control", "unsafe")]
    assert result.returncode == 0, result.stderr[-2000:]
    for kind in PAYLOADS:
        assert hostile["markers"]["control", kind].read_text() == "pwned", (kind, result.stdout)
    # ... and nothing else ran one: the only markers are the control's.
    ran = sorted(path.name for path in (hostile["root"] / "markers").iterdir())
    assert ran == sorted(f"PWNED-control-{kind}" for kind in PAYLOADS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("loader", LOADERS)
def test_bad_checkpoint_is_refused_with_one_clear_line(hostile, loader, kind):
    result = hostile["results"][(loader, kind)]
    path = hostile["files"][loader][kind]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.match(rf"(musicvae )?\w+: error: {re.escape(str(path))}: ", lines[0]), lines[0]
    assert re.search(BAD[kind], lines[0]), lines[0]
    if kind in PAYLOADS:
        assert not hostile["markers"][loader, kind].exists(), f"{loader} ran the payload"
    # Nothing written: no report, samples, export, cache, checkpoint or log folder.
    assert not output_root(hostile, loader, kind).exists()


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_the_unmodified_checkpoint_is_accepted(hostile, loader):
    result = hostile["results"][(loader, "good")]
    assert result.returncode == 0, result.stderr[-3000:]
    out = output_root(hostile, loader, "good")
    written = {
        "train": out / "ckpt" / "last.ckpt",
        "evaluate": out / "report" / "report.md",
        "generate": out / "samples" / "sample_00.wav",
        "export": out / "model.pt",
        "init_from": out / "ckpt" / "last.ckpt",
    }[loader]
    assert written.is_file(), result.stdout[-2000:]
    if loader == "train":  # the resume continued the run: epochs 0-1 stored, epoch 2 trained now
        assert torch.load(written, map_location="cpu", weights_only=True)["epoch"] == 2
    if loader == "init_from":  # a new run: one epoch counted from step 0
        assert torch.load(written, map_location="cpu", weights_only=True)["global_step"] == 8


@pytest.mark.slow
def test_listing_marks_bad_files_and_still_lists_the_good_one(hostile):
    """A listing is a report: it exits 0, lists the good checkpoint and marks each bad file with why."""
    result = hostile["results"][("listing", "all")]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert sorted(rows) == sorted([f"{kind}.ckpt" for kind in BAD] + ["good.ckpt"]), result.stdout
    good = rows["good.ckpt"].split()
    assert good[1:3] == ["1", str(torch.load(hostile["good"], weights_only=True)["global_step"])], rows["good.ckpt"]
    for kind, expected in BAD.items():
        row = rows[f"{kind}.ckpt"]
        assert "unreadable:" in row and re.search(expected, row), row
    assert not [k for k in PAYLOADS if hostile["markers"]["listing", k].exists()], "the listing ran a payload"


@pytest.mark.slow
def test_every_checkpoint_the_project_writes_loads_weights_only(tiny_run, hostile):
    written = [tiny_run["ckpt_dir"] / "best.ckpt", tiny_run["ckpt_dir"] / "last.ckpt"]
    resumed = output_root(hostile, "train", "good") / "ckpt"  # written by a resume (best.ckpt if it improved)
    assert (resumed / "last.ckpt").is_file()
    written += sorted(resumed.glob("*.ckpt"))
    for path in written:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["state_dict"] and "MelDataModule" in ckpt, path
