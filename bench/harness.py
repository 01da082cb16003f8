"""The benchmark harness's I/O helpers: options, CPU accounting from /proc, other load on the machine,
py-spy profiles, and the API server as a process. Scenario modules use these; :mod:`bench.run` drives
the scenarios.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import httpx

from bench.report import Profile, summarize_collapsed

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
CACHE_DIR = ROOT / "var" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000


@dataclass
class BenchOptions:
    """What the runner asks of a scenario. ``reps`` and ``seconds`` of 0 mean the scenario's defaults
    (shorter ones under ``quick``)."""

    quick: bool = False
    reps: int = 0
    seconds: float = 0.0
    profile: bool = True  # profile the processes of a goal that is not met (one extra, unmeasured repetition)
    results_dir: Path = RESULTS_DIR
    profile_dir: Optional[Path] = None  # where raw profiles go (default: results_dir/profiles)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def pick_reps(self, full: int = 5, quick: int = 2) -> int:
        return self.reps or (quick if self.quick else full)

    def pick_seconds(self, full: float, quick: float) -> float:
        return self.seconds or (quick if self.quick else full)

    def profiles(self) -> Path:
        d = self.profile_dir or (self.results_dir / "profiles")
        d.mkdir(parents=True, exist_ok=True)
        return d


def machine_facts() -> dict:
    import platform

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_model": cpu, "cpus": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# --------------------------------------------------------------------------------------------
# CPU from /proc
# --------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> Optional[list[str]]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = text[text.rfind(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of ``pid`` (plus its reaped children's with ``children``), in seconds; 0 when gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # fields 14, 15
    if children:
        ticks += int(f[13]) + int(f[14])  # fields 16, 17
    return ticks / CLK_TCK


def process_table() -> dict[int, tuple[int, int, int, int]]:
    """pid -> (ppid, flags, own ticks (utime+stime), total ticks (+ reaped children's)) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = _stat_fields(int(d))
        if f is None:
            continue
        try:
            own = int(f[11]) + int(f[12])
            out[int(d)] = (int(f[1]), int(f[6]), own, own + int(f[13]) + int(f[14]))
        except (IndexError, ValueError):
            continue
    return out


def descendants(root: int, table: Optional[dict[int, tuple[int, int, int, int]]] = None) -> set[int]:
    """``root`` and every process below it."""
    table = table if table is not None else process_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(kids.get(p, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants (e.g. the server and its writer process)."""
    table = process_table()
    return sum(cpu_seconds(p) for p in descendants(root, table) if p in table)


class CpuMeter:
    """Cores used by some processes over a window: ``start()``, then ``stop()`` -> cores (1.0 = one core
    busy all the time). ``pids`` is called at both ends (processes may appear), and each pid is counted
    with its live descendants."""

    def __init__(self, pids: Callable[[], Iterable[int]]):
        self.pids = pids
        self.t0 = 0.0
        self.c0: dict[int, float] = {}

    def _read(self) -> dict[int, float]:
        table = process_table()
        out: dict[int, float] = {}
        for root in self.pids():
            for p in descendants(root, table):
                if p in table:
                    out[p] = cpu_seconds(p)
        return out

    def start(self) -> "CpuMeter":
        self.c0 = self._read()
        self.t0 = time.monotonic()
        return self

    def stop(self) -> float:
        c1 = self._read()
        dt = time.monotonic() - self.t0
        used = sum(v - self.c0.get(p, 0.0) for p, v in c1.items())
        return used / dt if dt > 0 else 0.0


def _busy_ticks() -> int:
    """user+nice+system ticks of all CPUs (/proc/stat; guest time is inside user; irq/softirq apart)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(f[1]) + int(f[2]) + int(f[3])


class ForeignLoad:
    """CPU used by user-space processes outside this process's tree (other engineers' tests, a build)
    during a window: the honest measure of "was the machine busy with something else".

    foreign = machine busy time (user+nice+system) - this tree's time - kernel threads' time. This tree's
    time is the sum over its live processes of their own plus reaped children's time, so a process of the
    tree that exits during the window is still counted (in its parent's cutime). Kernel threads (softirq
    work for our own veth traffic runs there) are reported apart."""

    def start(self) -> "ForeignLoad":
        self.t0 = time.monotonic()
        self.busy0 = _busy_ticks()
        self.table0 = process_table()
        self.ours0 = self._ours(self.table0)
        self.kern0 = self._kernel(self.table0)
        return self

    @staticmethod
    def _ours(table: dict) -> int:
        return sum(table[p][3] for p in descendants(os.getpid(), table) if p in table)

    @staticmethod
    def _kernel(table: dict) -> int:
        return sum(t for _pp, flags, _own, t in table.values() if flags & PF_KTHREAD)

    def stop(self) -> dict:
        dt = max(1e-9, time.monotonic() - self.t0)
        table = process_table()
        busy = _busy_ticks() - self.busy0
        ours = self._ours(table) - self.ours0
        kern = self._kernel(table) - self.kern0
        foreign = max(0, busy - ours - kern)
        mine = descendants(os.getpid(), table)
        own: dict[int, int] = {}
        for pid, (_pp, flags, own_ticks, _t) in table.items():
            if pid in mine or flags & PF_KTHREAD:
                continue
            d = own_ticks - (self.table0[pid][2] if pid in self.table0 else 0)  # new: all of it is in the window
            if d > 0:
                own[pid] = d
        names = []
        for pid, ticks in sorted(own.items(), key=lambda kv: -kv[1])[:3]:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60]
            except OSError:
                cmd = ""
            names.append(f"{cmd.strip() or pid} ({ticks / CLK_TCK / dt:.2f} cores)")
        return {"foreign_cores": foreign / CLK_TCK / dt, "kernel_thread_cores": kern / CLK_TCK / dt,
                "benchmark_cores": ours / CLK_TCK / dt, "top_foreign": names}


def cpu_pressure() -> float:
    """avg10 of /proc/pressure/cpu "some" (% of time runnable tasks waited for a CPU), or -1."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return -1.0


def _pressure_total_us() -> Optional[int]:
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(line.split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def quiet_pressure(seconds: float = 3.0) -> float:
    """CPU pressure ("some", % of wall time) over ``seconds`` while this process sleeps: the load of
    everything else right now. Unlike avg10 it holds nothing of a benchmark that just ended. -1 unknown."""
    t0, p0 = time.monotonic(), _pressure_total_us()
    time.sleep(seconds)
    p1 = _pressure_total_us()
    if p0 is None or p1 is None:
        return -1.0
    return 100.0 * (p1 - p0) / ((time.monotonic() - t0) * 1e6)


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


def py_spy() -> Optional[str]:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    from shutil import which

    return which("py-spy")


class SpyRecorder:
    """``py-spy record`` of a running process (and its subprocesses) for ``seconds``, non-blocking (the
    process is not paused), collapsed stacks to ``out``. ``finish()`` -> :class:`bench.report.Profile`."""

    def __init__(self, pid: int, seconds: float, out: Path, title: str, *, subprocesses: bool = False,
                 rate: int = 100, native: bool = False):
        self.out = out
        self.title = title
        self.proc: Optional[subprocess.Popen] = None
        self.error = ""
        exe = py_spy()
        if exe is None:
            self.error = "py-spy is not installed (pip install -e '.[dev]')"
            return
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(round(seconds)))), "--rate", str(rate),
               "--format", "raw", "--nonblocking", "-o", str(out)]
        if subprocesses:
            cmd.append("--subprocesses")
        if native:
            cmd.append("--native")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self, timeout: float = 60) -> Profile:
        if self.proc is None:
            return Profile(self.title, note=self.error)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        if not self.out.exists():
            return Profile(self.title, note=f"py-spy wrote nothing: {(out or '').strip()[-300:]}")
        n, top_self, top_total = summarize_collapsed(self.out.read_text(errors="replace"))
        return Profile(self.title, path=_rel(self.out), samples=n, top_self=top_self, top_total=top_total)


def profile_call(fn: Callable[[], object], out: Path, title: str) -> Profile:
    """cProfile of ``fn()`` in this process (for single-threaded pieces), summarised like py-spy's."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    prof.dump_stats(str(out))
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values()) or 1e-9  # type: ignore[attr-defined]

    def name(k: tuple) -> str:
        return f"{k[2]} ({Path(k[0]).name})"

    by_self = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
    by_cum = sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:12]  # type: ignore[attr-defined]
    return Profile(title, path=_rel(out), samples=sum(v[1] for v in st.stats.values()),  # type: ignore[attr-defined]
                   top_self=[(name(k), 100 * v[2] / total) for k, v in by_self],
                   top_total=[(name(k), 100 * v[3] / total) for k, v in by_cum],
                   note="cProfile; 'samples' are calls, % of profiled time")


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(RESULTS_DIR.resolve()))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------------------------
# The API server as a process
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``flowscope server`` (the real CLI: uvicorn, migrations, the writer process) in its own session, on
    a free port, Hubble's gRPC API off (its fixed port may be taken by a test) and, unless asked, no
    retention (a benchmark database must not shrink under the benchmark)."""

    def __init__(self, db_url: str, *, log_path: Optional[Path] = None, extra: Iterable[str] = (),
                 retention: bool = False, startup_timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flowscope.cli", "server", "--db", db_url, "--port", str(self.port),
               "--log-level", "warning", "--hubble-listen", ""]
        if not retention:
            cmd += ["--retention-max-age", "0", "--retention-max-size", "0"]
        cmd += list(extra)
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=self._log, start_new_session=True)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = Path(log_path).read_text(errors="replace")[-2000:] if log_path else ""
                raise RuntimeError(f"flowscope server exited with {self.proc.returncode} at start: {tail}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("flowscope server did not answer /healthz")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        return httpx.get(self.url + "/api/v1/status", timeout=60).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class AgentProcess:
    """The real agent (:mod:`bench.agent_proc`) in its own session; ``stop()`` -> its exit report."""

    def __init__(self, server: str, interfaces: Iterable[str], *, log_path: Optional[Path] = None,
                 extra: Iterable[str] = (), startup_timeout: float = 90):
        cmd = [sys.executable, "-m", "bench.agent_proc", "--server", server]
        for i in interfaces:
            cmd += ["--interface", i]
        cmd += list(extra)
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.log_path = log_path
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     start_new_session=True)
        self.ready: dict = {}
        line = _readline_timeout(self.proc, startup_timeout)
        if not line:
            self.stop()
            tail = Path(log_path).read_text(errors="replace")[-2000:] if log_path else ""
            raise RuntimeError(f"the agent did not start: {tail}")
        import json

        self.ready = json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60) -> dict:
        import json

        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, signal.SIGKILL)
            out = ""
        if self._log is not subprocess.DEVNULL:
            self._log.close()
            self._log = subprocess.DEVNULL
        for line in reversed((out or "").splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return {}


def _readline_timeout(p: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return box[0].strip() if box else ""


def stop_process(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a process group we started, wait, then SIGKILL it if it does not go."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)
