"""The watch a pool entry's take trusts instead of a `git status`: reads never end it, any change in a
watched directory does, and what it can't watch it refuses to vouch for."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from engine.watch import BUDGET, MAX_OPEN, Watch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


def tree(tmp_path: Path) -> list[Path]:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.txt").write_text("one\n")
    return [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]


def started(dirs: list[Path]) -> Watch:
    watch = Watch.start(dirs)
    assert watch is not None
    return watch


def test_reads_and_what_came_before_the_start_leave_it_untouched(tmp_path):
    dirs = tree(tmp_path)
    (tmp_path / "a" / "before.txt").write_text("made before\n")
    watch = started(dirs)
    try:
        for _ in range(2):
            assert (tmp_path / "a" / "b" / "f.txt").read_text() == "one\n"
            assert sorted(os.listdir(tmp_path / "a")) == ["b", "before.txt"]
            os.stat(tmp_path / "a" / "b" / "f.txt")
            assert watch.untouched()
    finally:
        watch.close()


@pytest.mark.parametrize("change", ["write", "append", "create", "delete", "rename", "chmod", "utime", "mkdir"])
def test_any_change_below_ends_it_for_good(tmp_path, change):
    dirs = tree(tmp_path)
    f = tmp_path / "a" / "b" / "f.txt"
    watch = started(dirs)
    try:
        assert watch.untouched()
        {"write": lambda: f.write_text("two\n"),
         "append": lambda: f.open("a").write("more\n"),
         "create": lambda: (tmp_path / "a" / "new.txt").write_text(""),
         "delete": f.unlink,
         "rename": lambda: f.rename(f.with_name("g.txt")),
         "chmod": lambda: f.chmod(0o755),
         "utime": lambda: os.utime(f, ns=(1, 1)),
         "mkdir": lambda: (tmp_path / "a" / "b" / "c").mkdir()}[change]()
        assert not watch.untouched()
        assert not watch.untouched(), "an ended watch stays ended"
    finally:
        watch.close()


def test_what_cannot_be_watched_is_vouched_for_by_nothing(tmp_path):
    dirs = tree(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    assert Watch.start([*dirs, tmp_path / "gone"]) is None
    assert Watch.start([*dirs, tmp_path / "a" / "b" / "f.txt"]) is None, "a file is no directory"
    assert Watch.start([*dirs, tmp_path / "link"]) is None, "a symlink is not followed"
    watch = started(dirs)
    watch.close()
    watch.close()
    assert not watch.untouched(), "a closed watch vouches for nothing"


def test_a_process_holds_at_most_max_open_watches(tmp_path):
    """Each is an inotify instance, of the 128 a user has by default beside their editors' and tools'."""
    dirs = tree(tmp_path)
    held = [started(dirs) for _ in range(MAX_OPEN - 1)]
    try:
        assert Watch.start([tmp_path / "gone"]) is None
        held.append(started(dirs))  # the last one: the refused one gave its slot back
        assert Watch.start(dirs) is None
        held.pop().close()
        held.append(started(dirs))
    finally:
        for w in held:
            w.close()
    started(dirs).close()


def test_a_process_watches_at_most_its_share_of_the_users_directory_watches(tmp_path, monkeypatch):
    dirs = tree(tmp_path)
    monkeypatch.setattr(BUDGET, "dirs", 5)
    first = started(dirs)
    try:
        assert Watch.start(dirs) is None, "3 more directories than the 2 left"
        assert Watch.start([tmp_path / "gone", tmp_path]) is None
        second = started(dirs[:2])  # the refused ones gave their share back
        second.close()
    finally:
        first.close()
    started(dirs).close()
    assert BUDGET.dirs == 5
