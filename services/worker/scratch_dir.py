"""Scratch disk-tier directories: the G3 directory of a worker that no later worker can find.

A worker started without ``--instance-id`` or ``--disk-cache-dir`` gets a random id, so its
default directory (``<tmp>/kvmesh-kv-cache/<instance-id>``) would never be read again and
never be cleaned up. Such a directory is claimed as scratch: it holds a marker file the worker
keeps locked (``flock``) while it lives; the worker deletes the directory when it stops
gracefully, and any worker starting later deletes every scratch directory whose marker is
no longer locked (its owner died without stopping). Directories without a marker (given with
``--disk-cache-dir``, or named by a stable instance id) are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".kvmesh-scratch"


class ScratchDir:
    """A scratch directory this process owns until ``remove``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        # Locked before it gets its real name, so a sweeper never sees it unlocked.
        temporary = path / f"{MARKER}.{os.getpid()}"
        self._lock = open(temporary, "w")  # noqa: SIM115 - held open for the process's life
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.replace(temporary, path / MARKER)

    def remove(self) -> None:
        """Delete the directory (a graceful stop: no later worker would read it)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def sweep_dead(root: Path) -> list[Path]:
    """Delete the scratch directories under ``root`` whose owner is gone; returns them."""
    removed: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            marker = entry / MARKER
            if not marker.is_file():
                continue
            with contextlib.suppress(OSError), open(marker) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its owner lives
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        log.info("removed %d disk-tier directories of workers that died: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed
