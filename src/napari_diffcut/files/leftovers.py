"""Leftovers of interrupted runs: staging folders and temporary label stores.

A run writes into one hidden staging folder (see
:mod:`napari_diffcut.files.outputs`) whose journal says which outputs it
holds and whether all of them were written ("ready") before the commit
began. A staging folder of a dead process is undone by the next run in that
folder: before the record JSON was in place, outputs already moved in are
removed and old outputs moved aside come back; after it, the run was
complete and only the folder goes. Temporary label stores in the system
temporary folder are named ``napari-diffcut-<pid>-*`` so those of dead
processes can be removed too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from napari_diffcut.files.owned import exists, is_real_dir

#: Hidden staging folders of runs: ``.napari-diffcut-run-<pid>-<token>.tmp``.
STAGING_PREFIX = ".napari-diffcut-run-"
STAGING_SUFFIX = ".tmp"
#: Journal inside a staging folder: which outputs, and whether all are written.
JOURNAL = ".journal.json"
#: Sub-folder of a staging folder that holds the outputs a commit replaces.
OLD = ".old"
_STAGING_RE = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-[0-9a-f]+" + re.escape(STAGING_SUFFIX))
_TEMP_STORE_RE = re.compile(r"napari-diffcut-(\d+)-")


def recover_stale(folder: Path) -> list[Path]:
    """Undo the staging folders of dead runs in ``folder``; remove their temp stores.

    A run whose record JSON was not yet in place is rolled back (outputs it
    moved in are removed, outputs it moved aside come back); one whose record
    is in place is complete and only its staging folder goes. Never raises.

    Returns
    -------
    list of Path
        The staging folders removed.
    """
    removed = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        entries = []
    for path in entries:
        match = _STAGING_RE.fullmatch(path.name)
        if match and is_real_dir(path) and not alive(int(match.group(1)), path):
            roll_back(path)
            removed.append(path)
    for store in temp_stores(None):
        match = _TEMP_STORE_RE.match(store.name)
        if match and not alive(int(match.group(1))):
            shutil.rmtree(store, ignore_errors=True)
    return removed


def temp_store_prefix() -> str:
    """Prefix of this process's temporary label stores (recognised when it dies)."""
    return f"napari-diffcut-{os.getpid()}-"


def temp_stores(pid: int | None) -> list[Path]:
    """Our temporary label stores in the system temporary folder (of ``pid``, or all)."""
    root = Path(tempfile.gettempdir())
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    out = []
    for path in entries:
        match = _TEMP_STORE_RE.match(path.name)
        if match and (pid is None or int(match.group(1)) == pid) and is_real_dir(path):
            try:
                if path.lstat().st_uid == os.getuid():
                    out.append(path)
            except OSError:
                continue
    return out


def alive(pid: int, staging: Path | None = None) -> bool:
    """Whether the run ``pid`` (on this host, per the journal) may still be writing."""
    if staging is not None:
        host = read_journal(staging).get("host")
        if host not in (None, socket.gethostname()):
            return True  # another machine's run: not ours to judge
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def roll_back(staging: Path) -> None:
    """Undo an interrupted commit (or a run that never committed), then remove ``staging``."""
    journal = read_journal(staging)
    if journal.get("state") == "ready":
        names = [str(n) for n in journal.get("outputs", [])]
        folder = staging.parent
        record_in_place = bool(names) and not (staging / names[-1]).exists()
        if not record_in_place:
            for name in names[:-1]:
                if not (staging / name).exists() and exists(folder / name):
                    remove(folder / name)  # moved in by the interrupted commit
            old = staging / OLD
            for entry in sorted(old.iterdir()) if old.is_dir() else []:
                if not exists(folder / entry.name):
                    os.replace(entry, folder / entry.name)
    shutil.rmtree(staging, ignore_errors=True)


def write_journal(staging: Path, state: str, names: list[str]) -> None:
    """Record in ``staging`` which outputs it holds and whether all are written."""
    data = {
        "state": state,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "outputs": names,
    }
    tmp = staging / (JOURNAL + ".new")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, staging / JOURNAL)


def read_journal(staging: Path) -> dict[str, Any]:
    """The journal of a staging folder ({} when missing or unreadable)."""
    try:
        data = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def remove(path: Path) -> None:
    """Remove a file or a real folder (links are unlinked, never followed)."""
    if is_real_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
