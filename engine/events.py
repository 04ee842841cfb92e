"""The engine's one event stream: what changed, published once, in process, to every consumer.

Two layers. Wake-ups: whoever changes a task publishes its id and whoever waits for that task
(stream_logs, get_status long-polls) wakes at once; they carry nothing, so the log hot path pays no
more than setting an anyio.Event. Events: task and attempt state changes, log batches (the task id
and its new last seq, once per stored batch, never per line) and merges go to every subscriber
(MCP resource notifications, the dashboard, tests).

A subscriber's buffer is bounded and never blocks the publisher: pending events coalesce by (kind,
task) (a newer task event replaces an older one of the same task, a log batch moves the last seq on),
and once more than `max_pending` distinct ones wait, the oldest is dropped and the subscriber gets a
`gap` event: it re-reads the store for whatever it cares about.
Changes made by another process sharing the state directory (a `cli-council run` in another shell)
are found by one watcher per engine (follow_store), which looks at the store only while someone
subscribes, every OTHERS_POLL_S, and publishes them with local=False.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

if TYPE_CHECKING:
    from .models import Task
    from .store import Store

logger = logging.getLogger("cli_council.events")

OTHERS_POLL_S = 0.25  # how soon a subscriber hears of a change another process made
MAX_PENDING = 256  # distinct (kind, task) events a subscriber may have waiting before one is dropped
CHANGES_PAGE = 500  # task rows read per query by the store watcher
MAX_KNOWN = 10_000  # tasks whose last published rev/seq is remembered (forgetting one only risks a repeat)
ACTIVE = frozenset({"queued", "running"})


@dataclass(frozen=True)
class Event:
    """kind "task": the task's record changed (state, attempts: ((agent, attempt state), ...));
    "logs": lines up to `seq` are stored; "merge": the task was merged as `commit` (agent, if known);
    "gap": this subscriber fell behind and events were dropped: re-read what it follows."""

    kind: Literal["task", "logs", "merge", "gap"]
    task_id: str = ""
    state: str | None = None
    attempts: tuple[tuple[str, str], ...] = ()
    seq: int = 0
    agent: str | None = None
    commit: str | None = None
    local: bool = True  # published by this process; False: found in the store, written by another

    @classmethod
    def of_task(cls, task: "Task", local: bool = True) -> "Event":
        return cls("task", task.task_id, state=str(task.state),
                   attempts=tuple((a.agent, str(a.state)) for a in task.attempts), local=local)


class Subscription:
    """One consumer's bounded view of the stream: `async for event in sub`, or `await sub.batch()`."""

    def __init__(self, task_id: str | None, max_pending: int):
        self.task_id = task_id
        self.max_pending = max_pending
        self.dropped = 0  # events lost to a full buffer, over the subscription's life
        self._gap = False
        self._pending: OrderedDict[tuple[str, str], Event] = OrderedDict()
        self._ready = anyio.Event()

    def _put(self, event: Event) -> None:
        if self.task_id is not None and event.task_id != self.task_id:
            return
        key = (event.kind, event.task_id)
        old = self._pending.get(key)
        if old is not None and event.kind == "logs":
            event = event if event.seq >= old.seq else old
        self._pending[key] = event
        if len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
            self.dropped += 1
            self._gap = True
        self._ready.set()

    def drain(self) -> list[Event]:
        """Every pending event, oldest first (a gap before them), without waiting."""
        events = [Event("gap")] * self._gap + list(self._pending.values())
        self._pending.clear()
        self._gap = False
        self._ready = anyio.Event()
        return events

    async def batch(self) -> list[Event]:
        """Wait for at least one event; return all that are pending."""
        await self._ready.wait()
        return self.drain()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            for event in await self.batch():
                yield event


class Events:
    def __init__(self) -> None:
        self._watches: dict[str, set[anyio.Event]] = {}
        self._hurried: dict[str, int] = {}  # watches per topic that want the change soon
        self._subs: set[Subscription] = set()
        self._subscribed = anyio.Event()  # set while anyone subscribes: the store watcher runs then
        self._revs: dict[str, int] = {}  # per task, the last record revision / log seq published here
        self._seqs: dict[str, int] = {}

    # wake-ups

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

    # the stream

    def emit(self, event: Event, rev: int | None = None, wake: bool = True) -> None:
        """Hand `event` to every subscriber (never waits) and, with wake, wake the task's watchers.
        rev: the task record's revision in the store, so the store watcher does not repeat it."""
        if event.kind == "logs":
            _remember(self._seqs, event.task_id, event.seq)
        elif rev is not None:
            _remember(self._revs, event.task_id, rev)
        for sub in self._subs:
            sub._put(event)
        if wake and event.task_id:
            self.publish(event.task_id)

    @asynccontextmanager
    async def subscribe(self, task_id: str | None = None,
                        max_pending: int = MAX_PENDING) -> AsyncIterator[Subscription]:
        """Events from now on (of one task, or all): subscribe first, then read the current state,
        so that nothing changed in between is missed."""
        sub = Subscription(task_id, max_pending)
        self._subs.add(sub)
        self._subscribed.set()
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            if not self._subs:
                self._subscribed = anyio.Event()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def follow_store(self, store: "Store", interval_s: float = OTHERS_POLL_S) -> None:
        """Publish what other processes change in the store, while anyone subscribes. Start it once per
        engine, in its task group. It asks SQLite whether another connection committed (PRAGMA
        data_version, no table read) and only then reads the task rows changed since the last look
        (by revision) and the last log seq of the tasks still running."""
        version, rev, running, merged = None, None, set(), set()
        while True:
            if not self._subs:
                await self._subscribed.wait()
                version = rev = None  # what happened while nobody listened is in the store, not news
            try:
                if rev is None:
                    rev = await store.max_rev()
                    running = {tid for tid, *_ in await store.owners(sorted(ACTIVE))}
                    merged = set()
                changed = await store.data_version()
                if changed != version:
                    rev = await self._publish_others(store, rev, running, merged)
                    version = changed
            except Exception:  # a store hiccup (locked, disk full) must not end the engine; look again soon
                logger.exception("looking for changes other processes made failed")
            await anyio.sleep(interval_s)

    async def _publish_others(self, store: "Store", rev: int, running: set[str], merged: set[str]) -> int:
        from .models import Task  # a lazy import keeps this module free of the models at import time

        changed: set[str] = set()
        while True:  # a page at a time, until the newest row
            page = await store.changed_since(rev, CHANGES_PAGE)
            changed.update(row[0] for row in page)
            for task_id, row_rev, state, data in page:
                rev = max(rev, row_rev)
                (running.add if state in ACTIVE else running.discard)(task_id)
                if self._revs.get(task_id, 0) >= row_rev:
                    continue  # published here when it was written
                try:
                    task = Task.model_validate_json(data)
                except ValueError:
                    continue  # a row this version cannot read: nobody here can show it either
                _remember(self._revs, task_id, row_rev)
                self.emit(Event.of_task(task, local=False))
                if state == "merged" and task_id not in merged:
                    merged.add(task_id)
                    self.emit(Event("merge", task_id, commit=task.merge_commit, local=False))
            if len(page) < CHANGES_PAGE:
                break
        for task_id, seq in (await store.last_seqs(sorted(running | changed))).items():
            if seq > self._seqs.get(task_id, 0):
                self.emit(Event("logs", task_id, seq=seq, local=False))
        return rev


def _remember(seen: dict[str, int], task_id: str, value: int) -> None:
    if task_id not in seen and len(seen) >= MAX_KNOWN:
        seen.clear()
    if value > seen.get(task_id, 0):
        seen[task_id] = value


async def wait_for(ev: anyio.Event, timeout: float) -> bool:
    """True when `ev` is set within `timeout` seconds."""
    with anyio.move_on_after(timeout):
        await ev.wait()
    return ev.is_set()
