"""Free TCP ports leased to attempts, so parallel attempts that start dev servers do not collide.

A port is claimed by creating CLI_COUNCIL_HOME/ports/<port> exclusively, holding the claiming
process's pid and start time: every council process on the machine (a server, a `run`) shares
the directory, so no two running attempts get the same port, and a claim whose process died is
taken over. Ports come from below Linux's ephemeral range (32768+), where the agents' own
outgoing connections do not land, and must be free to bind when claimed.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path

from .runner import proc_start_time

LOW, HIGH = 20000, 32767
TRIES = 500


def env(ports: list[int]) -> dict[str, str]:
    """COUNCIL_PORT and PORT (the first), COUNCIL_PORT_1..N (each)."""
    if not ports:
        return {}
    return {"COUNCIL_PORT": str(ports[0]), "PORT": str(ports[0]),
            **{f"COUNCIL_PORT_{i}": str(p) for i, p in enumerate(ports, 1)}}


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


class Ports:
    def __init__(self, root: Path, low: int = LOW, high: int = HIGH):
        self.root = root
        self.low, self.high = low, high
        self._me = f"{os.getpid()} {proc_start_time(os.getpid())}"

    def lease(self, n: int) -> list[int]:
        """n ports claimed for this process (blocking: call it from a worker thread)."""
        self.root.mkdir(parents=True, exist_ok=True)
        got: list[int] = []
        try:
            for _ in range(TRIES):
                if len(got) == n:
                    return got
                port = random.randint(self.low, self.high)
                if port not in got and self._claim(port):
                    if _bindable(port):
                        got.append(port)
                    else:
                        self._unclaim(port)
        except BaseException:
            self.release(got)
            raise
        self.release(got)
        raise OSError(errno.EADDRNOTAVAIL, f"no {n} free ports found in {self.low}-{self.high}")

    def release(self, ports: list[int]) -> None:
        for port in ports:
            self._unclaim(port)

    def _claim(self, port: int) -> bool:
        path = self.root / str(port)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._me)
            return True
        return False

    def _unclaim(self, port: int) -> None:
        path = self.root / str(port)
        try:
            if path.read_text() == self._me:
                path.unlink()
        except OSError:
            pass

    @staticmethod
    def _stale(path: Path) -> bool:
        try:
            pid, start = path.read_text().split()
        except (OSError, ValueError):
            return False  # being written right now, or unreadable: leave it
        return str(proc_start_time(int(pid))) != start
