"""Prometheus ``/metrics``: Hubble's flow metrics (same names and labels) plus Flowscope's own gauges.

Counting happens once per committed batch (``FlowMetrics.observe_batches``, from the writer thread): one
lock per batch and a few dict increments per flow; a scrape only renders the dicts (custom collector,
no per-flow prometheus-client objects). Every metric holds at most ``max_series`` label sets: beyond that
new label sets are counted under ``other`` (and ``flowscope_metrics_overflow_total{metric}`` says so), so
a port scan or a flood of Kafka topics cannot blow up the scrape.

Hubble's metrics (``hubble_`` prefix), as Hubble defines them:

* ``flows_processed_total{type,subtype,verdict}`` — type Trace/Drop/PolicyVerdict/L7/SockTrace; subtype
  the observation point (``to-endpoint``) or the L7 protocol;
* ``drop_total{reason,protocol}`` — drop records (the policy-verdict record of the same packet is counted in
  ``policy_verdicts_total``, not twice here);
* ``tcp_flags_total{flag,family}`` — SYN, SYN-ACK, FIN, RST records;
* ``http_requests_total{method,protocol,reporter}``, ``http_responses_total{method,protocol,status,reporter}``,
  ``http_request_duration_seconds{method,reporter}`` (histogram, on responses);
* ``kafka_requests_total{topic,api_key,error_code,reporter}``, ``kafka_request_duration_seconds{topic,api_key,reporter}``;
* ``dns_queries_total{rcode,qtypes,ips_returned}``, ``dns_responses_total{...}``;
* ``policy_verdicts_total{direction,match,action}``;
* ``port_distribution_total{protocol,port}`` — forwarded, non-reply flows by destination port;
* ``lost_events_total{source}`` — loss reported by agents plus live-stream drops (``HUBBLE_RING_BUFFER``).

``reporter`` is ``client`` for egress, ``server`` for ingress, as in Hubble.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from flowscope import schema

DEFAULT_MAX_SERIES = 1000
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OTHER = "other"
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_EVENT_TYPES = {schema.EVENT_DROP: "Drop", schema.EVENT_DEBUG: "Debug", schema.EVENT_CAPTURE: "Capture",
                schema.EVENT_TRACE: "Trace", schema.EVENT_POLICY_VERDICT: "PolicyVerdict", schema.EVENT_L7: "L7"}
_MATCH = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all"}
_POINT_NAMES: dict[str, str] = {}


def _point(p: schema.TraceObservationPoint) -> str:
    name = _POINT_NAMES.get(p.value)
    if name is None:
        name = _POINT_NAMES[p.value] = "" if p.value == "UNKNOWN_POINT" else p.value.lower().replace("_", "-")
    return name


class _Series:
    """Counter values by label tuple, at most ``max_series`` of them."""

    __slots__ = ("name", "doc", "labels", "values", "max_series", "overflow", "_other")

    def __init__(self, name: str, doc: str, labels: Sequence[str], max_series: int) -> None:
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}
        self.max_series = max_series
        self.overflow = 0
        self._other = (OTHER,) * len(self.labels)

    def key(self, key: tuple[str, ...]) -> tuple[str, ...]:
        if key in self.values or len(self.values) < self.max_series:
            return key
        self.overflow += 1
        return self._other

    def inc(self, key: tuple[str, ...], n: float = 1.0) -> None:
        v = self.values
        if key in v:
            v[key] += n
        else:
            k = self.key(key)
            v[k] = v.get(k, 0.0) + n


class _Histogram(_Series):
    __slots__ = ("buckets", "hist")

    def __init__(self, name: str, doc: str, labels: Sequence[str], max_series: int,
                 buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        super().__init__(name, doc, labels, max_series)
        self.buckets = tuple(buckets)
        self.hist: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts..., +Inf count, sum

    def observe(self, key: tuple[str, ...], value: float) -> None:
        h = self.hist.get(key)
        if h is None:
            key = self.key(key)
            h = self.hist.get(key)
            if h is None:
                h = self.hist[key] = [0.0] * (len(self.buckets) + 2)
                self.values[key] = 0.0
        for i, b in enumerate(self.buckets):
            if value <= b:
                h[i] += 1
                break
        else:
            h[len(self.buckets)] += 1
        h[-1] += value
        self.values[key] += 1


class FlowMetrics:
    """Hubble's flow metrics over the flows the server ingests."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        m = max_series
        self._lock = threading.Lock()
        self.flows_processed = _Series("hubble_flows_processed", "Total number of flows processed",
                                       ("type", "subtype", "verdict"), m)
        self.drops = _Series("hubble_drop", "Number of drops", ("reason", "protocol"), m)
        self.tcp_flags = _Series("hubble_tcp_flags", "TCP flag occurrences", ("flag", "family"), m)
        self.http_requests = _Series("hubble_http_requests", "Count of HTTP requests",
                                     ("method", "protocol", "reporter"), m)
        self.http_responses = _Series("hubble_http_responses", "Count of HTTP responses",
                                      ("method", "protocol", "status", "reporter"), m)
        self.http_duration = _Histogram("hubble_http_request_duration_seconds",
                                        "Quantiles of HTTP request duration in seconds", ("method", "reporter"), m)
        self.kafka_requests = _Series("hubble_kafka_requests", "Count of Kafka requests",
                                      ("topic", "api_key", "error_code", "reporter"), m)
        self.kafka_duration = _Histogram("hubble_kafka_request_duration_seconds",
                                         "Quantiles of Kafka request duration in seconds",
                                         ("topic", "api_key", "reporter"), m)
        self.dns_queries = _Series("hubble_dns_queries", "Number of DNS queries observed",
                                   ("rcode", "qtypes", "ips_returned"), m)
        self.dns_responses = _Series("hubble_dns_responses", "Number of DNS responses observed",
                                     ("rcode", "qtypes", "ips_returned"), m)
        self.policy_verdicts = _Series("hubble_policy_verdicts", "Number of policy verdict events",
                                       ("direction", "match", "action"), m)
        self.ports = _Series("hubble_port_distribution", "Numbers of packets distributed by destination port",
                             ("protocol", "port"), m)
        self.lost = _Series("hubble_lost_events", "Number of lost events", ("source",), 16)
        self.series: list[_Series] = [
            self.flows_processed, self.drops, self.tcp_flags, self.http_requests, self.http_responses,
            self.http_duration, self.kafka_requests, self.kafka_duration, self.dns_queries, self.dns_responses,
            self.policy_verdicts, self.ports, self.lost]
        self.ingested_flows = 0
        self.ingested_batches = 0

    # ---- counting (pure) -----------------------------------------------------------------

    def observe_batches(self, batches: Iterable[Any]) -> None:
        """Committed ``api.store.PreparedBatch``es."""
        with self._lock:
            for b in batches:
                if getattr(b, "duplicate", False):  # a retried batch stored before: counted then
                    continue
                self._flows(b.flows)
                for (_t, _node, source, num, _cpu) in b.lost_rows:
                    self.lost.inc((source,), float(num))
                self.ingested_flows += len(b.flows)
                self.ingested_batches += 1

    def observe_flows(self, flows: Iterable[schema.Flow], lost: Iterable[tuple[str, int]] = ()) -> None:
        with self._lock:
            self._flows(flows)
            for source, num in lost:
                self.lost.inc((source,), float(num))

    def _flows(self, flows: Iterable[schema.Flow]) -> None:
        processed = self.flows_processed.inc
        for f in flows:
            verdict = f.verdict.value
            et = f.event_type
            etype = et.type if et is not None else 0
            l7 = f.l7
            if l7 is not None:
                sub = "HTTP" if l7.http is not None else "DNS" if l7.dns is not None else \
                    "Kafka" if l7.kafka is not None else ""
                processed(("L7", sub, verdict))
                self._l7(f, l7)
            else:
                if f.Type.value == "SOCK":
                    tname = "SockTrace"
                elif etype in _EVENT_TYPES:
                    tname = _EVENT_TYPES[etype]
                else:
                    tname = "Drop" if verdict == "DROPPED" else "Trace"
                processed((tname, _point(f.trace_observation_point) if tname == "Trace" else "", verdict))
            if etype == schema.EVENT_POLICY_VERDICT:
                action = verdict.lower()
                direction = f.traffic_direction.value.lower()
                if direction == "traffic_direction_unknown":
                    direction = "unknown"
                self.policy_verdicts.inc((direction, _MATCH.get(f.policy_match_type, str(f.policy_match_type)), action))
            l4 = f.l4
            if l4 is None:
                if verdict == "DROPPED" and etype != schema.EVENT_POLICY_VERDICT:
                    self.drops.inc((f.drop_reason_desc.value, ""))
                continue
            tcp = l4.TCP
            if verdict == "DROPPED" and etype != schema.EVENT_POLICY_VERDICT:
                self.drops.inc((f.drop_reason_desc.value, _l4_name(l4)))
            if tcp is not None:
                fl = tcp.flags
                if fl is not None:
                    ip = f.IP
                    family = ip.ipVersion.value if ip is not None else ""
                    if fl.SYN:
                        self.tcp_flags.inc(("SYN-ACK" if fl.ACK else "SYN", family))
                    if fl.FIN:
                        self.tcp_flags.inc(("FIN", family))
                    if fl.RST:
                        self.tcp_flags.inc(("RST", family))
            if verdict == "FORWARDED" and f.is_reply is not True and l7 is None:
                if tcp is not None:
                    self.ports.inc(("TCP", str(tcp.destination_port)))
                elif l4.UDP is not None:
                    self.ports.inc(("UDP", str(l4.UDP.destination_port)))
                elif l4.SCTP is not None:
                    self.ports.inc(("SCTP", str(l4.SCTP.destination_port)))

    def _l7(self, f: schema.Flow, l7: schema.Layer7) -> None:
        d = f.traffic_direction.value
        reporter = "client" if d == "EGRESS" else "server" if d == "INGRESS" else "unknown"
        typ = l7.type.value
        h = l7.http
        if h is not None:
            method = h.method.upper() if h.method.upper() in _HTTP_METHODS else OTHER
            if typ == "REQUEST":
                self.http_requests.inc((method, h.protocol, reporter))
            elif typ == "RESPONSE":
                self.http_responses.inc((method, h.protocol, str(h.code), reporter))
                lat = int(l7.latency_ns)
                if lat > 0:
                    self.http_duration.observe((method, reporter), lat / 1e9)
            return
        k = l7.kafka
        if k is not None:
            if typ == "RESPONSE" or typ == "REQUEST":
                self.kafka_requests.inc((k.topic, k.api_key, str(k.error_code), reporter))
            lat = int(l7.latency_ns)
            if lat > 0:
                self.kafka_duration.observe((k.topic, k.api_key, reporter), lat / 1e9)
            return
        dns = l7.dns
        if dns is not None:
            key = (str(dns.rcode) if typ == "RESPONSE" else "", ",".join(dns.qtypes), str(len(dns.ips) > 0).lower())
            if typ == "RESPONSE":
                self.dns_responses.inc(key)
            else:
                self.dns_queries.inc(key)

    # ---- rendering -----------------------------------------------------------------------

    def families(self, extra_lost: Optional[dict[str, float]] = None) -> Iterator[Any]:
        with self._lock:
            overflow = {s.name: s.overflow for s in self.series if s.overflow}
            for s in self.series:
                if isinstance(s, _Histogram):
                    fam = HistogramMetricFamily(s.name, s.doc, labels=s.labels)
                    for key, h in s.hist.items():
                        cum, buckets = 0.0, []
                        for i, b in enumerate(s.buckets):
                            cum += h[i]
                            buckets.append((_fmt(b), cum))
                        cum += h[len(s.buckets)]
                        buckets.append(("+Inf", cum))
                        fam.add_metric(list(key), buckets, h[-1])
                    yield fam
                    continue
                fam = CounterMetricFamily(s.name, s.doc, labels=s.labels)
                values = dict(s.values)
                if s is self.lost and extra_lost:
                    for src, n in extra_lost.items():
                        values[(src,)] = values.get((src,), 0.0) + n
                for key, v in values.items():
                    fam.add_metric(list(key), v)
                yield fam
            ov = CounterMetricFamily("flowscope_metrics_overflow", "Label sets counted under 'other' because a "
                                     "metric reached its series limit", labels=("metric",))
            for name, n in overflow.items():
                ov.add_metric([name], n)
            yield ov


def _l4_name(l4: schema.Layer4) -> str:
    for name in ("TCP", "UDP", "SCTP", "ICMPv4", "ICMPv6"):
        if getattr(l4, name) is not None:
            return name
    return ""


def _fmt(b: float) -> str:
    return repr(float(b))


class ServerCollector(Collector):
    """Everything ``/metrics`` shows: Hubble's flow metrics and the server's own state."""

    def __init__(self, flows: FlowMetrics, *, store: Any = None, writer: Any = None, hub: Any = None,
                 alerts: Any = None, exporter: Any = None) -> None:
        self.flows = flows
        self.store, self.writer, self.hub, self.alerts, self.exporter = store, writer, hub, alerts, exporter

    def collect(self) -> Iterator[Any]:
        hub = self.hub
        extra = {"HUBBLE_RING_BUFFER": float(hub.dropped)} if hub is not None and hub.dropped else None
        yield from self.flows.families(extra)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("flowscope_ingest_flows", "Flows stored by this server since it started",
                      self.flows.ingested_flows)
        yield counter("flowscope_ingest_batches", "Ingest batches stored since start", self.flows.ingested_batches)
        if self.writer is not None:
            yield gauge("flowscope_ingest_queue_batches", "Ingest batches decoded and waiting for their commit",
                        self.writer.pending)
            yield counter("flowscope_ingest_transactions", "Write transactions committed", self.writer.transactions)
        if hub is not None:
            yield gauge("flowscope_stream_subscribers", "Live stream clients", hub.subscribers)
            yield counter("flowscope_stream_published_flows", "Flows offered to live stream clients", hub.published)
            yield counter("flowscope_stream_dropped_flows", "Flows dropped for slow live stream clients", hub.dropped)
        if self.store is not None:
            yield gauge("flowscope_storage_flows", "Flows in the database", self.store.num_flows())
            size = self.store.db_size_bytes()
            if size is not None:
                yield gauge("flowscope_storage_bytes", "Size of the database (SQLite: file, WAL and shared memory)",
                            size)
        if self.alerts is not None:
            a = self.alerts
            yield gauge("flowscope_alert_rules", "Alert rules loaded", len(a.rules()))
            yield gauge("flowscope_alerts_firing", "Alert groups firing", a.firing())
            yield counter("flowscope_alert_notifications", "Alert notifications (firing, resolved) produced",
                          a.notifications)
            d = CounterMetricFamily("flowscope_alert_deliveries", "Webhook delivery attempts", labels=("result",))
            d.add_metric(["success"], a.deliveries_ok)
            d.add_metric(["failure"], a.deliveries_failed)
            yield d
            o = GaugeMetricFamily("flowscope_alert_outbox", "Notifications by delivery status", labels=("status",))
            for status, n in sorted(a.store.outbox_counts().items()):
                o.add_metric([status], n)
            yield o
        ex = self.exporter
        if ex is not None:
            yield counter("flowscope_export_flows", "Flows written to the export file", ex.stats.flows)
            yield counter("flowscope_export_bytes", "Bytes written to the export file", ex.stats.bytes)
            yield counter("flowscope_export_rotations", "Export file rotations", ex.stats.rotations)
            yield counter("flowscope_export_errors", "Export write errors", ex.stats.errors)


def make_registry(collector: ServerCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def fanout(*listeners: Optional[Callable[[Sequence[Any]], None]]) -> Callable[[Sequence[Any]], None]:
    """One ``on_commit`` callback calling each listener in turn; one failing does not stop the others."""
    import logging

    log = logging.getLogger("flowscope.commit")
    fns = [f for f in listeners if f is not None]

    def on_commit(batches: Sequence[Any]) -> None:
        for fn in fns:
            try:
                fn(batches)
            except Exception:  # noqa: BLE001
                log.exception("commit listener %s failed", getattr(fn, "__qualname__", fn))
    return on_commit
