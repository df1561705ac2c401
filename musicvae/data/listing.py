"""Listing a data folder: which files it holds, through symbolic links to folders, and why a listed
file cannot be opened.

A symbolic link to a folder is followed, as a user who links an album into the data folder
expects (torchvision's ImageFolder walks with `followlinks=True` too), with two exceptions, so that
every recording is listed once and the walk ends: a link to a folder inside the data folder is not
followed (the folder is listed where it is), nor a link to a folder already listed. A link back to
a folder above it (a loop) is reported, not followed. os.walk follows links without either check.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from musicvae.errors import DataError


@dataclass
class FolderListing:
    """What `list_folder` found.

    Attributes:
        files: POSIX paths relative to the folder of everything that is not a folder (dangling
            and looping links included, for the readers to report), sorted.
        dirs: relative POSIX paths of the folders listed, sorted.
        loops: (path, reason) of each link to a folder above it, not followed.
    """

    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    loops: list[tuple[str, str]] = field(default_factory=list)


def list_folder(folder: str | os.PathLike) -> FolderListing:
    """Every file under `folder`, following symbolic links to folders outside it once (see the module)."""
    root = Path(folder)
    inside = os.path.realpath(root)
    listing = FolderListing()
    try:
        st = os.stat(root)
    except OSError:
        return listing
    seen = {(st.st_dev, st.st_ino)}  # folders listed or about to be: each once
    stack: list[tuple[Path, str, frozenset]] = [(root, "", frozenset(seen))]
    while stack:
        path, rel, above = stack.pop()
        try:
            with os.scandir(path) as found:
                entries = sorted(found, key=lambda entry: entry.name)
        except OSError:
            continue  # an unreadable folder lists nothing, as os.walk's default
        folders = []
        for entry in entries:
            name = f"{rel}{entry.name}"
            try:
                st = entry.stat()  # follows links
            except OSError:
                st = None  # dangling or looping: a file for the readers to report
            if st is None or not stat.S_ISDIR(st.st_mode):
                listing.files.append(name)
                continue
            ident = (st.st_dev, st.st_ino)
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if ident in above or inside == target or inside.startswith(target + os.sep):
                    listing.loops.append((entry.path, f"symbolic link loop: it points to {target}, a folder "
                                                      "above it, and is not followed"))
                    continue
                if target.startswith(inside + os.sep):
                    continue  # the folder is listed where it is, inside the data folder
            if ident in seen:
                continue  # listed already, through another link (or a bind mount): each recording once
            seen.add(ident)
            folders.append((Path(entry.path), f"{name}/", above | {ident}))
            listing.dirs.append(name)
        stack.extend(reversed(folders))  # depth first, in name order
    listing.files.sort()
    listing.dirs.sort()
    return listing


def link_problem(path: str | os.PathLike, err: BaseException) -> Optional[str]:
    """Why `path` could not be opened when a symbolic link is the cause: a loop or a dangling link."""
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "symbolic link loop (following it never reaches a file)"
    if isinstance(err, FileNotFoundError) and os.path.islink(path):
        return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
    return None


def no_recordings(folder: Path, suffixes: tuple[str, ...]) -> DataError:
    """The error for a data folder without a single candidate recording."""
    return DataError(f"{folder}: no mel arrays or audio files found (looked recursively for {', '.join(suffixes)})")
