"""The agent's on-disk spool (probe.spool): order, bound, restart, torn writes, exclusive use.

Real files in a temporary directory; the crash cases use a real child process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from probe.spool import Spool, SpoolError

ROOT = Path(__file__).resolve().parent.parent


def drain(sp: Spool) -> list[bytes]:
    out = []
    while (rec := sp.peek()) is not None:
        out.append(rec)
        sp.pop()
    return out


def segments(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("seg-*.spool"))


def test_fifo_across_segments_and_consumed_segments_are_deleted(tmp_path):
    recs = [f"record {i} ".encode() * (i % 7 + 1) for i in range(500)]
    with Spool(str(tmp_path), segment_bytes=2048, max_bytes=10 << 20) as sp:
        for r in recs:
            assert sp.append(r)
        assert len(segments(tmp_path)) > 5
        assert sp.peek() == recs[0] and sp.peek() == recs[0]  # peek does not consume
        assert drain(sp) == recs
        assert sp.peek() is None and not sp and sp.pending_bytes == 0
        assert len(segments(tmp_path)) == 1  # only the (empty or fresh) tail is left


def test_bounded_refuses_and_keeps_what_it_has(tmp_path):
    with Spool(str(tmp_path), segment_bytes=1000, max_bytes=4000) as sp:
        accepted = []
        for i in range(100):
            rec = b"%03d" % i + b"x" * 97
            if not sp.append(rec):
                break
            accepted.append(rec)
        assert 30 <= len(accepted) < 40, len(accepted)  # 108 bytes per record, 4000 bytes
        assert sp.refused == 1
        assert sp.used_bytes <= 4000
        assert not sp.append(b"y" * 200)
        assert drain(sp) == accepted  # nothing of what was accepted is lost
        assert sp.append(b"room again")


def test_reopen_continues_after_the_last_pop(tmp_path):
    with Spool(str(tmp_path), segment_bytes=300) as sp:
        for i in range(20):
            sp.append(b"r%02d" % i)
        for _ in range(7):
            sp.peek()
            sp.pop()
    with Spool(str(tmp_path), segment_bytes=300) as sp:
        sp.append(b"new")
        assert drain(sp) == [b"r%02d" % i for i in range(7, 20)] + [b"new"]


def test_a_second_agent_cannot_use_the_same_directory(tmp_path):
    with Spool(str(tmp_path)):
        with pytest.raises(SpoolError, match="in use"):
            Spool(str(tmp_path))
    Spool(str(tmp_path)).close()  # released on close


def test_bad_arguments():
    with pytest.raises(ValueError, match="fsync policy"):
        Spool("/nonexistent-never-created", fsync="sometimes")


def test_unusable_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot use spool directory"):
        Spool(str(f / "spool"))


def _child(directory: Path, body: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import os, signal, sys
        from probe.spool import Spool
        sp = Spool({str(directory)!r}, segment_bytes=4096, cursor_interval=3600, fsync_interval=3600)
    """) + textwrap.dedent(body) + "\nsys.stdout.write('ready\\n'); sys.stdout.flush(); signal.pause()\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_kill_9_loses_no_appended_record_and_resends_at_most_what_was_popped(tmp_path):
    """A killed agent: every appended record is still there (write(2) before append returns); records
    popped after the last cursor save come again (the server skips them by batch id), none is skipped."""
    p = _child(tmp_path, """
        for i in range(300):
            sp.append(b"batch-%04d" % i)
        for i in range(120):
            sp.peek(); sp.pop()
    """)
    try:
        assert p.stdout.readline() == "ready\n"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with Spool(str(tmp_path)) as sp:
        got = drain(sp)
    want = [b"batch-%04d" % i for i in range(300)]
    assert got == want[len(want) - len(got):], "records must be a suffix, in order"
    assert len(got) >= 180  # nothing un-popped lost
    assert len(got) <= 300


def test_torn_tail_is_cut_and_counted(tmp_path):
    with Spool(str(tmp_path)) as sp:
        for i in range(10):
            sp.append(b"complete-%d" % i)
    seg = tmp_path / segments(tmp_path)[-1]
    with open(seg, "ab") as f:  # a crash in the middle of an append: header and half a payload
        f.write(b"\x40\x00\x00\x00\x12\x34\x56\x78partial")
    with Spool(str(tmp_path)) as sp:
        assert sp.corrupt_bytes == 15
        sp.append(b"after")
        assert drain(sp) == [b"complete-%d" % i for i in range(10)] + [b"after"]


def test_corrupt_record_in_the_middle_skips_its_segment_only(tmp_path):
    with Spool(str(tmp_path), segment_bytes=200) as sp:
        for i in range(30):
            sp.append(b"rec-%02d-" % i + b"p" * 20)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    first = tmp_path / segs[0]
    data = bytearray(first.read_bytes())
    data[40] ^= 0xFF  # flip a byte in the second record's payload or header
    first.write_bytes(bytes(data))
    with Spool(str(tmp_path), segment_bytes=200) as sp:
        got = drain(sp)
        assert sp.corrupt_bytes > 0
    assert got[0] == b"rec-00-" + b"p" * 20
    later = [b"rec-%02d-" % i + b"p" * 20 for i in range(30)]
    # everything from the second segment on is intact and in order
    assert got[1:] == later[len(later) - len(got) + 1:]
    assert len(got) >= 30 - 7


def test_fsync_always_and_never_work(tmp_path):
    for policy in ("always", "never"):
        d = tmp_path / policy
        with Spool(str(d), fsync=policy, segment_bytes=100) as sp:
            for i in range(20):
                sp.append(b"%d" % i)
        with Spool(str(d)) as sp:
            assert drain(sp) == [b"%d" % i for i in range(20)]


def test_cursor_never_points_at_a_deleted_segment(tmp_path):
    with Spool(str(tmp_path), segment_bytes=64) as sp:
        for i in range(50):
            sp.append(b"x%02d" % i + b"." * 20)
        for _ in range(25):
            sp.peek()
            sp.pop()
        # simulate a crash: the files as they are now, without close() saving the cursor
        snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "LOCK"}
    crash = tmp_path.parent / "crash"
    crash.mkdir()
    for name, data in snapshot.items():
        (crash / name).write_bytes(data)
    with Spool(str(crash), segment_bytes=64) as sp:
        got = drain(sp)
    want = [b"x%02d" % i + b"." * 20 for i in range(50)]
    assert got == want[len(want) - len(got):] and len(got) >= 25
    assert os.path.exists(crash / "cursor")
