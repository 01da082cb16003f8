"""Per-invocation log: lines go to stderr (relayed by the thin client when the service ran the
request) and, when the config names a ``logFile``, are appended there too.

One object per request, so concurrent requests in the service never mix their lines.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _fmt_value(v: object) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\\') or not s.isprintable():
        return json.dumps(s)
    return s


class RequestLog:
    def __init__(self, command: str = "", container_id: str = "", ifname: str = ""):
        self.fields = {"cmd": command, "container": container_id[:12], "ifname": ifname}
        self.level = LEVELS["info"]
        self.file: str = ""
        self.lines: list[tuple[int, str]] = []

    def configure(self, level: str, file: str = "") -> None:
        self.level = LEVELS.get(level, LEVELS["info"])
        self.file = file

    def log(self, level: str, msg: str, **kv: object) -> None:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 1_000_000_000 // 1_000_000:03d}Z"
        parts = [f"time={ts}", f"level={level}"]
        parts += [f"{k}={_fmt_value(v)}" for k, v in self.fields.items() if v]
        parts.append(f"msg={_fmt_value(msg)}")
        parts += [f"{k}={_fmt_value(v)}" for k, v in kv.items()]
        self.lines.append((LEVELS[level], " ".join(parts)))

    def debug(self, msg: str, **kv: object) -> None:
        self.log("debug", msg, **kv)

    def info(self, msg: str, **kv: object) -> None:
        self.log("info", msg, **kv)

    def warning(self, msg: str, **kv: object) -> None:
        self.log("warning", msg, **kv)

    def error(self, msg: str, **kv: object) -> None:
        self.log("error", msg, **kv)

    def render(self) -> str:
        """The lines at or above the configured level, for stderr."""
        return "".join(line + "\n" for lvl, line in self.lines if lvl >= self.level)

    def flush_file(self) -> Optional[str]:
        """Append to the log file; returns an error text instead of raising (logging must not fail a verb)."""
        if not self.file:
            return None
        text = self.render()
        if not text:
            return None
        try:
            os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
            fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as e:
            return f"cannot write log file {self.file}: {e}"
        return None
