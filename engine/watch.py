"""Whether anything changed in a set of directories since a moment: Linux inotify, as git's
fsmonitor does it. The warm pool verifies an entry clean with `git status` once, in the background,
watching it from before that status; a take whose entry nothing touched since skips the status,
which stats every file on the path of the agents' start (4 of them: ~140 ms of CPU on 20,000 files).

Any event counts: a read makes none, a write, chmod, create, delete or rename in a watched
directory (or of it) does. Where inotify is missing or refuses (another OS, a directory gone, the
limits below), nothing is vouched for and the take runs `git status` as before. What inotify does
not see, as git's fsmonitor does not: a write through a hard link made from another directory, a
write into a file mapped in memory, a change made by another machine on a network filesystem. The
check is against accidents (a stray write, a leftover), as the status was: any agent runs as the
user and can reach the user's files whatever the pool checks.

inotify's limits are the user's, shared with their editors and file watchers (an IDE that can't add
its watches stops seeing changes): a process holds at most MAX_OPEN watches (an instance each, of
128 by default) over at most an eighth of the user's directory watches (`max_user_watches`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

# IN_MODIFY IN_ATTRIB IN_CLOSE_WRITE IN_MOVED_FROM IN_MOVED_TO IN_CREATE IN_DELETE IN_DELETE_SELF IN_MOVE_SELF
_CHANGES = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
_ONLYDIR, _DONT_FOLLOW = 0x01000000, 0x02000000  # a directory, never reached through a symlink
MAX_OPEN = 16
MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"


def _inotify():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


def _dirs_budget() -> int:
    try:
        with open(MAX_USER_WATCHES) as f:
            return int(f.read()) // 8
    except (OSError, ValueError):
        return 1024  # an eighth of the smallest default (8,192)


class _Budget:
    """What this process may hold of the user's inotify: instances and directory watches."""

    def __init__(self, instances: int, dirs: int):
        self._lock = threading.Lock()
        self.instances, self.dirs = instances, dirs

    def take(self, dirs: int) -> bool:
        with self._lock:
            if self.instances < 1 or self.dirs < dirs:
                return False
            self.instances, self.dirs = self.instances - 1, self.dirs - dirs
            return True

    def give(self, dirs: int) -> None:
        with self._lock:
            self.instances, self.dirs = self.instances + 1, self.dirs + dirs


_LIBC = _inotify()
BUDGET = _Budget(MAX_OPEN, _dirs_budget())


class Watch:
    """Events in some directories since `start`. Closed by its owner (closing one that holds many
    watches takes the kernel milliseconds: a worker thread's job)."""

    def __init__(self, fd: int, dirs: int):
        self._fd: int | None = fd
        self._dirs = dirs
        self._touched = False

    @classmethod
    def start(cls, dirs: Sequence[str | Path]) -> Watch | None:
        """Watch every one of `dirs` (blocking: run it in a worker thread); None if any can't be."""
        if _LIBC is None or not BUDGET.take(len(dirs)):
            return None
        fd, ok = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), False
        try:
            ok = fd >= 0 and all(_LIBC.inotify_add_watch(fd, os.fsencode(d), _CHANGES | _ONLYDIR | _DONT_FOLLOW) >= 0
                                 for d in dirs)
            return cls(fd, len(dirs)) if ok else None
        finally:
            if not ok:
                if fd >= 0:
                    os.close(fd)
                BUDGET.give(len(dirs))

    def untouched(self) -> bool:
        """Nothing happened in the directories since `start`: one non-blocking read, no thread."""
        if self._fd is not None and not self._touched:
            try:
                self._touched = bool(os.read(self._fd, 4096))
            except BlockingIOError:
                pass
            except OSError:
                self._touched = True
        return self._fd is not None and not self._touched

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            BUDGET.give(self._dirs)


__all__ = ["BUDGET", "MAX_OPEN", "Watch"]
