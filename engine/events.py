"""In-process change events: whoever changes a task publishes its id; whoever waits for that task
wakes at once instead of polling the store.

The seed of the engine's one event stream: today the logbook publishes when a task's lines are
stored and the engine when a task's record changes. Changes made by another process (a `run` in
another shell) are not published here; waiters bound their wait and look at the store then.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio


class Events:
    def __init__(self) -> None:
        self._watches: dict[str, set[anyio.Event]] = {}
        self._hurried: dict[str, int] = {}  # watches per topic that want the change soon

    def publish(self, topic: str) -> None:
        """Wake every watch on `topic`."""
        for ev in self._watches.pop(topic, ()):
            ev.set()

    def waited_on(self, topic: str) -> bool:
        """Whether someone watches `topic` in a hurry (a writer then hurries what it would batch)."""
        return topic in self._hurried

    @contextmanager
    def watch(self, topic: str, hurry: bool = True) -> Iterator[anyio.Event]:
        """An event set by the next publish of `topic`. Watch before looking at the state, then wait:
        a change made while looking is not missed. hurry=False: a watcher content with batches."""
        ev = anyio.Event()
        self._watches.setdefault(topic, set()).add(ev)
        if hurry:
            self._hurried[topic] = self._hurried.get(topic, 0) + 1
        try:
            yield ev
        finally:
            if hurry:
                self._hurried[topic] -= 1
                if not self._hurried[topic]:
                    del self._hurried[topic]
            watches = self._watches.get(topic)
            if watches is not None:
                watches.discard(ev)
                if not watches:
                    del self._watches[topic]


async def wait_for(ev: anyio.Event, timeout: float) -> bool:
    """True when `ev` is set within `timeout` seconds."""
    with anyio.move_on_after(timeout):
        await ev.wait()
    return ev.is_set()
