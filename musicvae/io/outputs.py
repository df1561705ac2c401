"""Where a command writes: checked before any work, never over an input, never over an existing file
unless the user passes `--force`, and written whole or not at all.

Every command that writes results (`generate`, `export`, `evaluate`, `predict`) checks its outputs
with `check_output_file` or `check_output_folder` first, before a model is loaded or a recording
decoded, so a mistyped `--out` costs nothing and refuses in one line (exit status 2). Each file is
then written by `write_output`: a temporary file beside it, renamed into place (musicvae.io.atomic),
so a write the machine refuses midway (a full disk, a read-only remount) leaves the old file or
nothing, and stops with one line and exit status 4, as checkpoint writes do (musicvae.io.storage).

An output that is one of the command's inputs is refused even with `--force`, as ffmpeg refuses
to write over its input: the input would be destroyed while it is still being read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional

from musicvae.io.atomic import atomic_path, write_atomic
from musicvae.errors import ConfigError
from musicvae.io.safe_load import first_line
from musicvae.io.storage import StorageError, read_only, write_fault

#: The one flag of every command that replaces output files that already exist (`fit` has
#: `--overwrite` for its checkpoints, which starts a run afresh: another decision).
FORCE_FLAG = "--force"
#: Existing files named in a refusal before "and N more".
_SHOWN = 3


def add_force_flag(parser: Any, help: str) -> None:
    """`--force` on a jsonargparse parser: bare (`--force`) or `--force true|false`, as LightningCLI spells bools."""
    parser.add_argument(FORCE_FLAG, type=bool, nargs="?", const=True, default=False, help=help)


def check_creatable_dir(path: str | os.PathLike, setting: str) -> Path:
    """Refuse a folder that could not be created or written into, without creating anything.

    Walks up from `path` to the first part that exists. That part must be a folder this process
    may write into; a regular file (or anything else that is not a folder, a dangling symbolic
    link included) on the way makes `mkdir` fail, and so does a folder without write permission
    (`os.access`, so root passes unless the file system is read-only or, like /proc, refuses
    everyone).

    Args:
        path: the folder the command will write into; `~` is expanded, relative paths are taken
            from the working directory.
        setting: the command-line name of the setting, e.g. `--checkpoint_dir`, used in the message.

    Returns:
        The absolute path of the folder.

    Raises:
        ConfigError: naming `setting`, the offending path component and what to change.
    """
    target = Path(os.path.abspath(Path(path).expanduser()))
    part = target
    while True:
        try:
            mode = os.stat(part).st_mode  # follows symbolic links, as mkdir's parents do
        except FileNotFoundError:
            if os.path.islink(part):
                raise ConfigError(_cannot_create(setting, target, part, "is a dangling symbolic link")) from None
            if part.parent == part:  # a missing root: nothing more to walk
                return target
            part = part.parent
            continue
        except NotADirectoryError:  # a file further up; walk on to name it
            part = part.parent
            continue
        except OSError as err:
            raise ConfigError(_cannot_create(setting, target, part, f"cannot be inspected ({err.strerror})")) from None
        break
    if not stat.S_ISDIR(mode):
        kind = "a regular file" if stat.S_ISREG(mode) else "not a folder"
        raise ConfigError(_cannot_create(setting, target, part, f"is {kind}, not a folder"))
    if read_only(part):
        raise ConfigError(_cannot_create(setting, target, part, "is on a read-only filesystem"))
    if not os.access(part, os.W_OK | os.X_OK):
        raise ConfigError(_cannot_create(setting, target, part, "is a folder this user may not write into"))
    return target


def _cannot_create(setting: str, target: Path, part: Path, reason: str) -> str:
    where = "it" if part == target else str(part)
    return (
        f"{setting} {target}: cannot be created or written, because {where} {reason}; "
        f"choose another {setting} (or move {part} out of the way)"
    )


def check_output_file(path: str | os.PathLike, setting: str, inputs: Iterable[str | os.PathLike] = (),
                      force: bool = False) -> Path:
    """Refuse `path` as a file to write: its folder cannot be made or written, it is a folder, it is
    one of `inputs`, or it exists and `force` is off. Nothing is created.

    Returns:
        The absolute path.

    Raises:
        ConfigError: naming `setting` and what to change.
    """
    path = Path(os.path.abspath(Path(path).expanduser()))
    check_creatable_dir(path.parent, setting)
    _check_targets(None, [path], setting, inputs, force)
    return path


def check_output_folder(folder: str | os.PathLike, files: Iterable[str | os.PathLike], setting: str,
                        inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """Refuse `folder` as the place for `files` (paths relative to it): it cannot be made or
    written (a file stands where it should be), a file would replace one of `inputs`, a folder
    stands where a file goes, or files exist there and `force` is off. Nothing is created.

    Returns:
        The folder's absolute path.

    Raises:
        ConfigError: naming `setting` and what to change.
    """
    folder = check_creatable_dir(folder, setting)
    targets = [folder / name for name in files]
    for parent in sorted({target.parent for target in targets} - {folder}):
        check_creatable_dir(parent, setting)  # a recording in a subfolder writes into a subfolder
    _check_targets(folder, targets, setting, inputs, force)
    return folder


def _check_targets(folder: Optional[Path], targets: list[Path], setting: str, inputs: Iterable[str | os.PathLike],
                   force: bool) -> None:
    """The refusals common to a file (`folder` None: the setting names the file) and a folder's files."""
    existing = [target for target in targets if os.path.lexists(target)]
    if not existing:
        return
    read = _identities(inputs)
    for target in existing:
        named = f"{setting} {target}:" if folder is None else f"{setting} {folder}: {target}"
        source = read.get(_identity(target))
        if source is not None:
            raise ConfigError(f"{named} is the input {source}, which writing would destroy while it is read; "
                              f"choose another {setting} ({FORCE_FLAG} never replaces an input)")
        if target.is_dir():
            raise ConfigError(f"{named} is a folder, where this command writes a file; choose another {setting}")
    if force:
        return
    if folder is None:
        raise ConfigError(f"{setting} {existing[0]}: already exists; pass {FORCE_FLAG} to replace it, "
                          f"or choose another {setting}")
    names = ", ".join(str(t.relative_to(folder)) for t in existing[:_SHOWN])
    more = f" and {len(existing) - _SHOWN} more" if len(existing) > _SHOWN else ""
    raise ConfigError(f"{setting} {folder}: already holds {names}{more}, which this command writes; pass "
                      f"{FORCE_FLAG} to replace {'it' if len(existing) == 1 else 'them'}, or choose another {setting}")


def _identity(path: str | os.PathLike) -> Optional[tuple[int, int]]:
    """(device, inode) of the file `path` leads to: the same for every name of one file (links included)."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # a missing input is the loader's to report
    return st.st_dev, st.st_ino


def _identities(inputs: Iterable[str | os.PathLike]) -> dict[tuple[int, int], Path]:
    return {ident: Path(source) for source in inputs if (ident := _identity(source)) is not None}


def make_output_folder(folder: str | os.PathLike) -> Path:
    """Create `folder` (checked before by `check_output_folder`); a refusal now is the machine's.

    Raises:
        StorageError: the folder could not be made (read-only remount, full disk, ...).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = write_fault(err, folder.parent, needed=None, existed=False) or first_line(err)
        raise StorageError(f"{folder}: the folder cannot be created: {reason}") from None
    return folder


def write_output(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then rename it over `path`
    (musicvae.io.atomic; the folder is made if needed). A failure leaves `path` as it was.

    A handle for torch's writers: `torch.save` and `torch.jit.save` given a file name abort the
    process on a full disk (their zip writer throws from a destructor), given a handle they raise.

    Raises:
        StorageError: the machine refused the write, naming the file and why (exit status 4).
    """
    return _refusals_as_storage_errors(path, lambda: write_atomic(path, write, mode))


def write_output_to(path: str | os.PathLike, write_file: Callable[[Path], None]) -> Path:
    """`write_output` for writers that take a file name: `write_file(tmp)` writes the temporary file.

    A name for soundfile: libsndfile writing through a Python handle reports a failed write from
    inside its I/O callbacks, as tracebacks printed on stderr.
    """

    def write() -> None:
        with atomic_path(path) as tmp:
            write_file(tmp)

    return _refusals_as_storage_errors(path, write)


def _refusals_as_storage_errors(path: str | os.PathLike, write: Callable[[], None]) -> Path:
    path = Path(path)
    make_output_folder(path.parent)
    existed = os.path.lexists(path)
    try:
        write()
    except (OSError, RuntimeError) as err:  # soundfile's LibsndfileError and torch's writers raise RuntimeError
        reason = write_fault(err, path.parent, needed=None) or first_line(err)
        kept = "the file there is unchanged" if existed else "nothing is left in its place"
        raise StorageError(f"{path}: not written: {reason}; {kept}") from None
    return path
