"""The single writer: one thread owns all inserts (SQLite has one writer), coalescing the batches that
arrive while it is busy into one transaction. Callers get a future that resolves after the commit.

With ``process=True`` the transaction itself runs in a child process (:class:`WriterProcess`): decoding
requests (this process) and inserting rows (the child) then use two cores instead of taking turns on
one interpreter lock. Rows cross over as msgpack on a pipe (~1 µs per flow); the child is the only
writer, exits when its stdin closes, and is restarted if it dies (the batches in flight then fail with
503; agents retry them).
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future
from typing import Any, BinaryIO, Callable, Optional, Sequence

import msgspec

from .store import FlowStore, PreparedBatch

log = logging.getLogger(__name__)

_STOP = object()


class WriterClosed(RuntimeError):
    """The writer is shut down; nothing more is accepted."""


class WriterError(RuntimeError):
    """The writer process failed a transaction or died."""


class WriterDied(WriterError):
    """The writer process died while a transaction was in flight (it may or may not have committed)."""


# --------------------------------------------------------------------------------------------
# The writer process
# --------------------------------------------------------------------------------------------

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()
_LEN = struct.Struct("<Q")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            raise EOFError("pipe closed")
        buf += chunk
    return bytes(buf)


def _recv(f: BinaryIO) -> bytes:
    (n,) = _LEN.unpack(_read_exact(f, _LEN.size))
    return _read_exact(f, n)


def _send(f: BinaryIO, payload: bytes) -> None:
    f.write(_LEN.pack(len(payload)))
    f.write(payload)
    f.flush()


def child_main(db_url: str) -> int:  # pragma: no cover - runs in the child (python -m api.writer URL)
    """Serve write requests on stdin/stdout until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (it closes our stdin)
    from .db import make_engine

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the reply pipe
    engine = make_engine(db_url)
    store = FlowStore(engine)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    _send(out, _enc.encode(["ready", os.getpid()]))
    try:
        while True:
            try:
                msg = _recv(inp)
            except EOFError:
                return 0
            batches = [PreparedBatch([], rows, lost, dict(nodes), received, batch_id=bid)
                       for rows, lost, nodes, received, bid in _dec.decode(msg)]
            try:
                n, last_id = store.write_batches(batches)
                reply: Any = ["ok", n, last_id, [b.first_id for b in batches], [b.duplicate for b in batches]]
            except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the requests
                reply = ["err", f"{type(e).__name__}: {e}"]
            try:
                _send(out, _enc.encode(reply))
            except (BrokenPipeError, OSError):
                return 0
    finally:
        engine.dispose()


class WriterProcess:
    """A child process (``python -m api.writer URL``) that runs :meth:`FlowStore.write_batches` for the
    parent, one call at a time, over length-prefixed msgpack on its stdin/stdout. It exits when its stdin
    closes, so it never outlives the server."""

    def __init__(self, db_url: str, start_timeout: float = 60.0) -> None:
        self.db_url = db_url
        self.start_timeout = start_timeout
        self._proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen([sys.executable, "-m", "api.writer", self.db_url], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, close_fds=True)
        self._proc = proc
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], self.start_timeout)
            if not ready:
                raise OSError(f"no answer within {self.start_timeout:.0f}s")
            hello = _dec.decode(_recv(proc.stdout))
        except (EOFError, OSError, msgspec.DecodeError) as e:
            self.stop()
            raise WriterError(f"the writer process failed to start (exit code {proc.poll()}): {e}") from e
        if not (isinstance(hello, list) and hello and hello[0] == "ready"):
            self.stop()
            raise WriterError(f"the writer process said {hello!r} instead of ready")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write(self, batches: Sequence[PreparedBatch]) -> tuple[int, int]:
        if not self.alive():
            if self._proc is not None:
                log.error("writer process exited (code %s); starting a new one", self._proc.returncode)
                self.stop()
            self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        msg = _enc.encode([[b.rows, b.lost_rows, list(b.nodes.items()), b.received_ns, b.batch_id] for b in batches])
        try:
            _send(proc.stdin, msg)
            reply = _dec.decode(_recv(proc.stdout))
        except (EOFError, OSError) as e:
            code = proc.poll()
            self.stop()
            raise WriterDied(f"the writer process died (exit code {code}); the batch may not be stored") from e
        if reply[0] != "ok":
            raise WriterError(reply[1])
        _, n, last_id, first_ids, duplicates = reply
        for b, first, dup in zip(batches, first_ids, duplicates):
            if dup:
                b.mark_duplicate(first)
            else:
                b.first_id = first
        return n, last_id

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()  # the child sees EOF and exits after its current transaction
            except OSError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------------------------
# The coordinating thread
# --------------------------------------------------------------------------------------------


class BatchWriter:
    """``submit(batch)`` queues a prepared batch; the writer thread inserts everything queued (up to
    ``max_rows`` flows) in one transaction, resolves each batch's future with its flow count, then calls
    ``on_commit(batches)`` (where live subscribers are fed). A failed transaction fails all of its
    futures with the error; nothing is half-stored.

    ``process``: run the transactions in a :class:`WriterProcess` over ``store``'s database (a file or
    server database; not ``:memory:``)."""

    def __init__(self, store: FlowStore, on_commit: Optional[Callable[[Sequence[PreparedBatch]], None]] = None,
                 *, max_rows: int = 50_000, process: bool = False) -> None:
        self.store = store
        self.on_commit = on_commit
        self.max_rows = max_rows
        self._child = WriterProcess(store.engine.url.render_as_string(hide_password=False)) if process else None
        self._q: "queue.SimpleQueue[object]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flowscope-writer", daemon=True)
        self._closed = False
        self._started = False
        self._lock = threading.Lock()
        self.transactions = 0
        self.pending = 0  # batches queued or being written

    @property
    def child_pid(self) -> Optional[int]:
        return self._child.pid if self._child is not None else None

    def start(self) -> "BatchWriter":
        """Start the thread (and the writer process); idempotent, ``submit`` starts it too."""
        with self._lock:
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        if self._started or self._closed:
            return
        self._started = True
        if self._child is not None:
            self._child.start()
        self._thread.start()

    def submit(self, batch: PreparedBatch) -> "Future[int]":
        fut: "Future[int]" = Future()
        with self._lock:
            if self._closed:
                raise WriterClosed("the server is shutting down")
            self._start_locked()
            self.pending += 1
            self._q.put((batch, fut))
        return fut

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread and the writer process."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
            self._q.put(_STOP)
        if started:
            self._thread.join(timeout)
        if self._child is not None:
            self._child.stop()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._q.get()
            if item is _STOP:
                break
            group = [item]
            rows = len(item[0])  # type: ignore[index]
            while rows < self.max_rows:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
                rows += len(nxt[0])  # type: ignore[index]
            self._write(group)  # type: ignore[arg-type]

    def _insert(self, batches: Sequence[PreparedBatch]) -> None:
        if self._child is None:
            self.store.insert_prepared(batches)
            return
        before = self.store.last_id()
        try:
            n, last_id = self._child.write(batches)
        except WriterDied:
            if all(b.batch_id for b in batches):
                n, last_id = self._recover_by_batch_id(batches)
                self.store.note_inserted(n, last_id)
                return
            # Did the transaction commit before the child died? It is the only writer, so the newest id
            # tells: unchanged -> nothing stored, write again (on a new child); advanced by exactly this
            # batch -> stored, only the answer was lost.
            total = sum(len(b) for b in batches)
            now = self.store.db_last_id()
            if total and now == before + total:
                log.warning("the writer process died after committing %d flows", total)
                n, last_id = total, now
                first = before + 1
                for b in batches:
                    b.first_id = first
                    first += len(b)
            elif now == before:
                log.warning("the writer process died before committing; writing again")
                n, last_id = self._child.write(batches)
            else:
                raise
        self.store.note_inserted(n, last_id)

    def _recover_by_batch_id(self, batches: Sequence[PreparedBatch]) -> tuple[int, int]:
        """After the writer process died mid-transaction: the batch ids recorded with the flows tell
        whether it committed (all recorded: answer from the record) or not (none: write again)."""
        assert self._child is not None
        applied = self.store.applied_batches([b.batch_id for b in batches])
        if not applied:
            log.warning("the writer process died before committing; writing again")
            return self._child.write(batches)
        if len(applied) < len({b.batch_id for b in batches}):
            raise WriterError("the writer process died; the batches are partly recorded (retry them)")
        log.warning("the writer process died after committing %d batches", len(batches))
        n = last = 0
        for b in batches:
            first, count = applied[b.batch_id]
            b.first_id = first
            n += count
            last = max(last, first + count - 1 if count else 0)
        return n, last

    def _write(self, group: list[tuple[PreparedBatch, "Future[int]"]]) -> None:
        batches = [b for b, _ in group]
        try:
            self._insert(batches)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
            log.error("writing %d batches failed: %s", len(batches), exc)
            with self._lock:
                self.pending -= len(group)
            for _, fut in group:
                fut.set_exception(exc)
            return
        self.transactions += 1
        with self._lock:
            self.pending -= len(group)
        for b, fut in group:
            fut.set_result(len(b))
        if self.on_commit is not None:
            try:
                self.on_commit(batches)
            except Exception:  # noqa: BLE001 - live delivery must not stop storage
                log.exception("publishing a committed batch failed")


def default_process_writer(url: str) -> bool:
    """Whether a writer process can serve this database URL (not for in-memory SQLite)."""
    return ":memory:" not in url and "mode=memory" not in url and os.cpu_count() != 1


if __name__ == "__main__":  # pragma: no cover - the writer process
    if len(sys.argv) != 2:
        print("usage: python -m api.writer DB_URL  (started by the server; speaks msgpack on stdin/stdout)",
              file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(child_main(sys.argv[1]))
