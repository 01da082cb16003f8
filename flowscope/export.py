"""Flow export to a file: Hubble JSON lines with size-based rotation and allow/deny filters.

Hubble's exporter, for the agent (``flowscope agent --export-file-path ...``) and for the server
(``flowscope server --export-file-path ...``, ``Settings.export``): one ``GetFlowsResponse`` per line
(``{"flow": {...}, "node_name": "...", "time": "..."}``, and ``{"lost_events": {...}}`` lines for reported
loss), exactly what ``hubble observe -o jsonpb`` prints, so ``flowscope observe --input-file``, ``jq``,
``hubble-audit2policy`` or a log shipper read it.

Options, as Hubble names them (``--hubble-export-*`` there):

* ``--export-file-path``: the file (appended to; its directory is created);
* ``--export-file-max-size-mb`` (default 10): rotate before a write would make the file bigger;
* ``--export-file-max-backups`` (default 5): rotated files kept, named like lumberjack's
  (``flows-2024-11-27T06-10-01.123.json``), oldest removed first; ``--export-file-compress`` gzips them;
* ``--export-allowlist`` / ``--export-denylist``: FlowFilters as JSON (repeatable, or a JSON array),
  the same semantics as ``observe --allowlist``;
* ``--export-fieldmask``: keep only these fields (``time,verdict,source.namespace,IP.source,...``).

Every batch is flushed to the file when written. A write that fails (disk full, ...) is counted and
logged, never raised into the agent or the ingest path.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import msgspec
import orjson

from flowscope import schema
from flowscope.filters import FilterError, FilterSet, FlowFilter

log = logging.getLogger("flowscope.export")
_MiB = 1024 * 1024


class ExportError(ValueError):
    """Invalid export options (the message names the option)."""


@dataclass
class ExportConfig:
    path: str
    max_size_mb: float = 10.0
    max_backups: int = 5
    compress: bool = False
    allowlist: list[str] = field(default_factory=list)   # FlowFilter JSON (objects or arrays)
    denylist: list[str] = field(default_factory=list)
    field_mask: list[str] = field(default_factory=list)  # dotted paths

    def filterset(self) -> FilterSet:
        return FilterSet(_filters(self.allowlist, "--export-allowlist"), _filters(self.denylist, "--export-denylist"))

    def validate(self) -> "ExportConfig":
        if not self.path:
            raise ExportError("--export-file-path: empty path")
        if self.max_size_mb <= 0:
            raise ExportError(f"--export-file-max-size-mb: must be positive, got {self.max_size_mb}")
        if self.max_backups < 0:
            raise ExportError(f"--export-file-max-backups: must be 0 or more, got {self.max_backups}")
        self.filterset()
        for p in self.field_mask:
            if not p or any(not part for part in p.split(".")):
                raise ExportError(f"--export-fieldmask: invalid field path {p!r}")
        return self


def _filters(raws: Iterable[str], flag: str) -> list[FlowFilter]:
    out: list[FlowFilter] = []
    for raw in raws:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ExportError(f"{flag}: not JSON ({e}): {raw!r}") from None
        for item in obj if isinstance(obj, list) else [obj]:
            try:
                ff = msgspec.convert(item, FlowFilter)
                FilterSet([ff])
            except (msgspec.ValidationError, FilterError) as e:
                raise ExportError(f"{flag}: invalid FlowFilter {orjson.dumps(item).decode()}: {e}") from None
            out.append(ff)
    return out


def _mask(obj: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in paths:
        src: Any = obj
        for part in path:
            if not isinstance(src, dict) or part not in src:
                src = None
                break
            src = src[part]
        if src is None:
            continue
        dst = out
        for part in path[:-1]:
            dst = dst.setdefault(part, {})
        dst[path[-1]] = src
    return out


@dataclass
class ExportStats:
    flows: int = 0
    lost_events: int = 0
    filtered: int = 0
    bytes: int = 0
    rotations: int = 0
    errors: int = 0
    last_error: str = ""


def backup_name(path: str, t: Optional[float] = None) -> str:
    """``dir/flows-2024-11-27T06-10-01.123.json`` for ``dir/flows.json`` (lumberjack's naming, UTC)."""
    t = time.time() if t is None else t
    stem, ext = os.path.splitext(path)
    secs, ms = divmod(round(t * 1000), 1000)
    return f"{stem}-{time.strftime('%Y-%m-%dT%H-%M-%S', time.gmtime(secs))}.{ms:03d}{ext}"


class FlowExporter:
    """Appends flows as Hubble JSON lines to ``cfg.path``; thread-safe."""

    def __init__(self, cfg: ExportConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg.validate()
        fs = cfg.filterset()
        self._match = None if fs.matches_all else fs.match
        self._mask = [p.split(".") for p in cfg.field_mask] or None
        self._max = int(cfg.max_size_mb * _MiB)
        self._clock = clock
        self._lock = threading.Lock()
        self.stats = ExportStats()
        self._fh: Any = None
        self._size = 0
        self._open()

    # ---- file handling -------------------------------------------------------------------

    def _open(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.cfg.path))
        os.makedirs(parent, exist_ok=True)
        self._fh = open(self.cfg.path, "ab")
        self._size = self._fh.tell()

    def _rotate(self) -> None:
        self._fh.close()
        self._fh = None
        path = self.cfg.path
        target = backup_name(path, self._clock())
        n = 1
        while os.path.exists(target) or os.path.exists(target + ".gz"):  # two rotations in one millisecond
            stem, ext = os.path.splitext(backup_name(path, self._clock()))
            target = f"{stem}-{n}{ext}"
            n += 1
        os.replace(path, target)
        if self.cfg.compress:
            with open(target, "rb") as src, gzip.open(target + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.unlink(target)
        self.stats.rotations += 1
        self._prune()
        self._open()

    def backups(self) -> list[str]:
        """Rotated files, oldest first."""
        stem, ext = os.path.splitext(self.cfg.path)
        pattern = f"{glob.escape(stem)}-[0-9][0-9][0-9][0-9]-*{glob.escape(ext)}"
        files = glob.glob(pattern) + glob.glob(pattern + ".gz")
        return sorted(files, key=lambda p: (os.path.getmtime(p), p))

    def _prune(self) -> None:
        old = self.backups()
        for p in old[: max(0, len(old) - self.cfg.max_backups)]:
            try:
                os.unlink(p)
            except OSError as e:
                log.warning("cannot remove old export file %s: %s", p, e)

    def _write_lines(self, lines: list[bytes]) -> None:
        if not lines:
            return
        with self._lock:
            try:
                if self._fh is None:
                    self._open()
                chunk: list[bytes] = []
                size = 0
                written = 0
                for line in lines:
                    n = len(line) + 1
                    if self._size + size + n > self._max and (self._size + size) > 0:
                        if chunk:
                            self._fh.write(b"\n".join(chunk) + b"\n")
                            self._size += size
                            written += size
                            chunk, size = [], 0
                        self._fh.flush()
                        self._rotate()
                    chunk.append(line)
                    size += n
                self._fh.write(b"\n".join(chunk) + b"\n")
                self._size += size
                self._fh.flush()
                self.stats.bytes += written + size
            except (OSError, ValueError) as e:  # ValueError: the file object was closed under us
                self.stats.errors += 1
                self.stats.last_error = str(e)
                if self.stats.errors % 100 == 1:
                    log.error("writing flows to %s failed: %s", self.cfg.path, e)
                try:
                    if self._fh is not None:
                        self._fh.close()
                except OSError:
                    pass
                self._fh = None

    # ---- input ---------------------------------------------------------------------------

    def _line(self, body: bytes, node_name: str, time_text: str) -> bytes:
        if self._mask is not None:
            body = orjson.dumps(_mask(orjson.loads(body), self._mask))
        return schema.envelope_json(body, node_name, time_text)

    def write_flows(self, flows: Sequence[schema.Flow]) -> None:
        """Flows as the agent builds them (``Agent.on_flows``)."""
        match = self._match
        lines = []
        for f in flows:
            if match is not None and not match(f):
                continue
            lines.append(self._line(schema.flow_to_json(f), f.node_name, f.time))
        self.stats.filtered += len(flows) - len(lines)
        self.stats.flows += len(lines)
        self._write_lines(lines)

    def write_lost(self, source: str, num_lost: int, *, cpu: Optional[int] = None, node_name: str = "",
                   time_ns: Optional[int] = None) -> None:
        self.stats.lost_events += 1
        self._write_lines([schema.encode(schema.lost_envelope(source, num_lost, cpu, node_name, time_ns))])

    def write_batches(self, batches: Sequence[Any]) -> None:
        """Committed ``api.store.PreparedBatch``es (the server): the stored JSON, no re-encoding."""
        from api.store import format_time

        match = self._match
        lines = []
        total = 0
        for b in batches:
            for it in b.live_items():
                total += 1
                if match is not None and not match(it.flow):
                    continue
                lines.append(self._line(it.body, it.node_name, format_time(it.time_ns)))
            for (t_ns, node, source, num, cpu) in b.lost_rows:
                self.stats.lost_events += 1
                lines.append(schema.encode(schema.lost_envelope(source, num, cpu, node, t_ns)))
        self.stats.filtered += total - (len(lines) - sum(len(b.lost_rows) for b in batches))
        self.stats.flows += len(lines) - sum(len(b.lost_rows) for b in batches)
        self._write_lines(lines)

    # ---- lifecycle (the agent's services protocol) ---------------------------------------

    def start(self) -> None:
        pass

    def stop(self) -> None:
        """Flush (the file stays open: the agent emits its last flows after stopping services)."""
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.flush()
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.close()
                finally:
                    self._fh = None


def attach_to_agent(agent: Any, cfg: ExportConfig) -> FlowExporter:
    """Export every flow the agent emits (chained with an existing ``on_flows``) and what it reports lost."""
    exporter = FlowExporter(cfg)
    previous = agent.on_flows

    def on_flows(flows: list[schema.Flow]) -> None:
        exporter.write_flows(flows)
        if previous is not None:
            previous(flows)

    agent.on_flows = on_flows
    shipper = agent.shipper
    report = shipper.report_lost

    def report_lost(source: str, n: int, cpu: Optional[int] = None) -> None:
        report(source, n, cpu)
        if n > 0:
            exporter.write_lost(source, n, cpu=cpu, node_name=agent.cfg.node_name, time_ns=time.time_ns())

    shipper.report_lost = report_lost
    agent.services.append(exporter)
    return exporter


# --------------------------------------------------------------------------------------------
# Command-line options (flowscope server / flowscope agent)
# --------------------------------------------------------------------------------------------


def export_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--export-*`` click options (Hubble's exporter flags without the ``hubble-`` prefix)."""
    import click

    opts = [
        click.option("--export-file-path", default=None, metavar="PATH",
                     help="Write flows as Hubble JSON lines to this file (export is off without it)."),
        click.option("--export-file-max-size-mb", type=click.FloatRange(min=0.001), default=10.0, show_default=True,
                     help="Rotate the export file at this size."),
        click.option("--export-file-max-backups", type=click.IntRange(min=0), default=5, show_default=True,
                     help="Rotated export files to keep."),
        click.option("--export-file-compress", is_flag=True, help="Gzip rotated export files."),
        click.option("--export-allowlist", multiple=True, metavar="JSON",
                     help='Export only flows matching this FlowFilter, e.g. \'{"verdict":["DROPPED"]}\' (repeatable).'),
        click.option("--export-denylist", multiple=True, metavar="JSON",
                     help="Do not export flows matching this FlowFilter (repeatable)."),
        click.option("--export-fieldmask", default=None, metavar="FIELDS",
                     help="Comma list of fields to keep, e.g. time,verdict,source.namespace,IP.source."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


EXPORT_OPTION_NAMES = ("export_file_path", "export_file_max_size_mb", "export_file_max_backups",
                       "export_file_compress", "export_allowlist", "export_denylist", "export_fieldmask")


def export_config_from_options(opts: dict[str, Any]) -> Optional[ExportConfig]:
    """The ExportConfig for the ``--export-*`` options in ``opts`` (None without a path); invalid values
    raise ``click.BadParameter`` naming the option."""
    import click

    path = opts.get("export_file_path")
    if not path:
        return None
    mask = [p.strip() for p in (opts.get("export_fieldmask") or "").split(",") if p.strip()]
    cfg = ExportConfig(path=path, max_size_mb=float(opts.get("export_file_max_size_mb") or 10.0),
                       max_backups=int(opts.get("export_file_max_backups", 5)),
                       compress=bool(opts.get("export_file_compress")),
                       allowlist=list(opts.get("export_allowlist") or ()),
                       denylist=list(opts.get("export_denylist") or ()), field_mask=mask)
    try:
        return cfg.validate()
    except ExportError as e:
        raise click.BadParameter(str(e)) from None
