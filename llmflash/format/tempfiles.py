"""Temporary files of interrupted commands: named after their process, removed by the next run.

Every command that writes (convert, reorder, calibrate, relufy) writes under a temporary name
`.<target>.tmp-<pid>` (or another `-<pid>` suffix) and renames when complete. A run killed with
SIGKILL cannot clean up, so each command first calls `remove_stale` on the names it uses: entries
whose process is gone (or is this one) are removed; those of a live process are left alone, so
two runs never delete each other's work. SIGINT and SIGTERM reach a command as exceptions
(KeyboardInterrupt; the CLI's `Terminated`), so its `except BaseException` cleanup removes its
temporary files at once.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call in this process, or reused: not in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: Path, prefix: str, suffix_re: str = r"tmp-(\d+)(\.tmp)?") -> list[Path]:
    """Remove `directory/<prefix><pid-suffix>` entries whose process is not running; returns them.

    `prefix` is the literal start of the name (e.g. ".model.tmp-" without the pid: pass ".model."
    and the default suffix pattern matches "tmp-1234").
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    pattern = re.compile(re.escape(prefix) + suffix_re)
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
