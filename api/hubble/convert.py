"""Flowscope's flow schema (msgspec, :mod:`flowscope.schema`) <-> Hubble's protobuf messages, both ways.

* :func:`flow_to_proto` is the hot path (every flow a gRPC client reads): hand-written, field by field.
  Everything :class:`schema.Flow` carries has a place in ``flow.Flow``; Flowscope's own fields go to
  ``flow.Flow.flowscope`` (field 500000, which Hubble clients skip).
* :func:`flow_from_proto` goes through protojson's shape (``MessageToDict``), which *is* the schema's
  JSON shape, and validates with msgspec: anything the schema cannot hold (a field Flowscope does not
  model, an enum value it does not know, a port above 65535) is a :class:`ConvertError` naming the field,
  never silently dropped. The deprecated ``drop_reason`` and ``reply`` fields are accepted when they
  agree with ``drop_reason_desc``/``is_reply`` (Cilium sets both) and are otherwise an error.
* Filters: :func:`filter_from_proto`/:func:`filter_to_proto` map ``flow.FlowFilter`` onto
  :class:`flowscope.filters.FlowFilter`, so gRPC requests run through the same filter engine as REST and
  the websocket. Hubble filter fields Flowscope does not evaluate are refused (a filter silently
  ignored would widen the answer).

Round trips ``schema -> proto -> schema`` are the identity, and ``MessageToDict(flow_to_proto(f),
preserving_proto_field_name=True) == msgspec.to_builtins(f)`` (tests check both).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import msgspec
from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue, Int32Value

from flowscope import schema
from flowscope.filters import FlowFilter

time_ns_of = schema.parse_timestamp  # cached per second for canonical text

from .pb import extension_pb2 as xpb
from .pb import flow_pb2 as fpb
from .pb import observer_pb2 as opb

__all__ = [
    "ConvertError",
    "flow_to_proto",
    "flow_from_proto",
    "lost_to_proto",
    "lost_from_proto",
    "timestamp",
    "timestamp_ns",
    "flow_response",
    "lost_response",
    "stored_flow_response",
    "envelope_response",
    "filter_from_proto",
    "filter_to_proto",
    "UNSUPPORTED_FILTER_FIELDS",
    "validate_field_mask",
    "masked",
]


class ConvertError(ValueError):
    """A message that does not fit the other side; the text names the field."""


_NS = 1_000_000_000


def timestamp(ns: int) -> Timestamp:
    s, n = divmod(int(ns), _NS)
    return Timestamp(seconds=s, nanos=n)


def timestamp_ns(ts: Timestamp) -> int:
    return ts.seconds * _NS + ts.nanos


def _ts_text(text: str) -> Timestamp:
    s, n = divmod(time_ns_of(text), _NS)
    return Timestamp(seconds=s, nanos=n)


# --------------------------------------------------------------------------------------------
# schema -> proto (hot)
# --------------------------------------------------------------------------------------------


def _endpoint(e: schema.Endpoint) -> Any:
    return fpb.Endpoint(ID=e.ID, identity=e.identity, cluster_name=e.cluster_name, namespace=e.namespace,
                        labels=e.labels, pod_name=e.pod_name,
                        workloads=[fpb.Workload(name=w.name, kind=w.kind) for w in e.workloads])


def _tcp_flags(fl: schema.TCPFlags) -> Any:
    return fpb.TCPFlags(FIN=fl.FIN, SYN=fl.SYN, RST=fl.RST, PSH=fl.PSH, ACK=fl.ACK, URG=fl.URG, ECE=fl.ECE,
                        CWR=fl.CWR, NS=fl.NS)


def _l4(l4: schema.Layer4) -> Any:
    if (t := l4.TCP) is not None:
        if t.flags is not None:
            return fpb.Layer4(TCP=fpb.TCP(source_port=t.source_port, destination_port=t.destination_port,
                                          flags=_tcp_flags(t.flags)))
        return fpb.Layer4(TCP=fpb.TCP(source_port=t.source_port, destination_port=t.destination_port))
    if (u := l4.UDP) is not None:
        return fpb.Layer4(UDP=fpb.UDP(source_port=u.source_port, destination_port=u.destination_port))
    if (i4 := l4.ICMPv4) is not None:
        return fpb.Layer4(ICMPv4=fpb.ICMPv4(type=i4.type, code=i4.code))
    if (i6 := l4.ICMPv6) is not None:
        return fpb.Layer4(ICMPv6=fpb.ICMPv6(type=i6.type, code=i6.code))
    if (sc := l4.SCTP) is not None:
        return fpb.Layer4(SCTP=fpb.SCTP(source_port=sc.source_port, destination_port=sc.destination_port))
    return fpb.Layer4()


def _l7(l7: schema.Layer7) -> Any:
    m = fpb.Layer7(type=l7.type.number, latency_ns=int(l7.latency_ns))
    if (h := l7.http) is not None:
        m.http.CopyFrom(fpb.HTTP(code=h.code, method=h.method, url=h.url, protocol=h.protocol,
                                 headers=[fpb.HTTPHeader(key=x.key, value=x.value) for x in h.headers]))
    elif (d := l7.dns) is not None:
        m.dns.CopyFrom(fpb.DNS(query=d.query, ips=d.ips, ttl=d.ttl, cnames=d.cnames,
                               observation_source=d.observation_source, rcode=d.rcode, qtypes=d.qtypes,
                               rrtypes=d.rrtypes))
    elif (k := l7.kafka) is not None:
        m.kafka.CopyFrom(fpb.Kafka(error_code=k.error_code, api_version=k.api_version, api_key=k.api_key,
                                   correlation_id=k.correlation_id, topic=k.topic))
    return m


def _policies(ps: list[schema.Policy]) -> list[Any]:
    return [fpb.Policy(name=p.name, namespace=p.namespace, labels=p.labels, revision=int(p.revision), kind=p.kind)
            for p in ps]


def _extension(x: schema.FlowscopeExtension) -> Any:
    m = xpb.FlowExtension(event=x.event, egress_packets=int(x.egress_packets), egress_bytes=int(x.egress_bytes),
                          ingress_packets=int(x.ingress_packets), ingress_bytes=int(x.ingress_bytes))
    if x.flow_start:
        m.flow_start.CopyFrom(_ts_text(x.flow_start))
    if x.flow_end:
        m.flow_end.CopyFrom(_ts_text(x.flow_end))
    return m


def flow_to_proto(f: schema.Flow) -> Any:
    """``flow.Flow`` with everything the schema flow carries (message presence included)."""
    kw: dict[str, Any] = {}
    if f.time:
        kw["time"] = _ts_text(f.time)
    if f.uuid:
        kw["uuid"] = f.uuid
    if (em := f.emitter) is not None:
        kw["emitter"] = fpb.Emitter(name=em.name, version=em.version)
    if f.verdict.number:
        kw["verdict"] = f.verdict.number
    if (eth := f.ethernet) is not None:
        kw["ethernet"] = fpb.Ethernet(source=eth.source, destination=eth.destination)
    if (ip := f.IP) is not None:
        kw["IP"] = fpb.IP(source=ip.source, destination=ip.destination, ipVersion=ip.ipVersion.number,
                          encrypted=ip.encrypted)
    if f.l4 is not None:
        kw["l4"] = _l4(f.l4)
    if f.source is not None:
        kw["source"] = _endpoint(f.source)
    if f.destination is not None:
        kw["destination"] = _endpoint(f.destination)
    if f.Type.number:
        kw["Type"] = f.Type.number
    if f.node_name:
        kw["node_name"] = f.node_name
    if f.node_labels:
        kw["node_labels"] = f.node_labels
    if f.source_names:
        kw["source_names"] = f.source_names
    if f.destination_names:
        kw["destination_names"] = f.destination_names
    if f.l7 is not None:
        kw["l7"] = _l7(f.l7)
    if (et := f.event_type) is not None:
        kw["event_type"] = fpb.CiliumEventType(type=et.type, sub_type=et.sub_type)
    if (ss := f.source_service) is not None:
        kw["source_service"] = fpb.Service(name=ss.name, namespace=ss.namespace)
    if (ds := f.destination_service) is not None:
        kw["destination_service"] = fpb.Service(name=ds.name, namespace=ds.namespace)
    if f.traffic_direction.number:
        kw["traffic_direction"] = f.traffic_direction.number
    if f.policy_match_type:
        kw["policy_match_type"] = f.policy_match_type
    if f.trace_observation_point.number:
        kw["trace_observation_point"] = f.trace_observation_point.number
    if f.drop_reason_desc.number:
        kw["drop_reason_desc"] = f.drop_reason_desc.number
    if f.is_reply is not None:
        kw["is_reply"] = BoolValue(value=f.is_reply)
    if (itf := f.interface) is not None:
        kw["interface"] = fpb.NetworkInterface(index=itf.index, name=itf.name)
    if f.Summary:
        kw["Summary"] = f.Summary
    if f.egress_allowed_by:
        kw["egress_allowed_by"] = _policies(f.egress_allowed_by)
    if f.ingress_allowed_by:
        kw["ingress_allowed_by"] = _policies(f.ingress_allowed_by)
    if f.egress_denied_by:
        kw["egress_denied_by"] = _policies(f.egress_denied_by)
    if f.ingress_denied_by:
        kw["ingress_denied_by"] = _policies(f.ingress_denied_by)
    if (ag := f.aggregate) is not None:
        kw["aggregate"] = fpb.Aggregate(ingress_flow_count=ag.ingress_flow_count,
                                        egress_flow_count=ag.egress_flow_count,
                                        unknown_direction_flow_count=ag.unknown_direction_flow_count)
    if f.flowscope is not None:
        kw["flowscope"] = _extension(f.flowscope)
    return fpb.Flow(**kw)


def lost_to_proto(ev: schema.LostEvent) -> Any:
    m = fpb.LostEvent(source=ev.source.number, num_events_lost=int(ev.num_events_lost))
    if ev.cpu is not None:
        m.cpu.CopyFrom(Int32Value(value=ev.cpu))
    return m


# --------------------------------------------------------------------------------------------
# proto -> schema (validated)
# --------------------------------------------------------------------------------------------


def _as_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _convert(d: dict[str, Any], typ: type, what: str) -> Any:
    try:
        return msgspec.convert(d, typ)
    except msgspec.ValidationError as e:
        text = str(e)
        if "unknown field" in text:
            text += " (a Hubble field that Flowscope's flow schema does not carry)"
        raise ConvertError(f"{what} does not fit Flowscope's schema: {text}") from None


def flow_from_proto(msg: Any) -> schema.Flow:
    """The schema flow of a ``flow.Flow``. Raises :class:`ConvertError` for anything the schema cannot
    hold exactly."""
    d = _as_dict(msg)
    if "drop_reason" in d:  # deprecated twin of drop_reason_desc
        desc = msg.drop_reason_desc
        if d["drop_reason"] != desc:
            raise ConvertError(f"flow.drop_reason ({d['drop_reason']}) disagrees with drop_reason_desc ({desc}); "
                               "Flowscope keeps only drop_reason_desc")
        del d["drop_reason"]
    if "reply" in d:  # deprecated twin of is_reply
        if not msg.HasField("is_reply") or msg.is_reply.value != d["reply"]:
            raise ConvertError("flow.reply is set but is_reply is absent or different; Flowscope keeps only is_reply")
        del d["reply"]
    return _convert(d, schema.Flow, "flow")


def lost_from_proto(msg: Any) -> schema.LostEvent:
    d = _as_dict(msg)
    return _convert(d, schema.LostEvent, "lost event")


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def flow_response(f: Any, node_name: str, time_ns: Optional[int]) -> Any:
    """``GetFlowsResponse`` around a ``flow.Flow``."""
    if time_ns is None:
        return opb.GetFlowsResponse(flow=f, node_name=node_name)
    return opb.GetFlowsResponse(flow=f, node_name=node_name, time=timestamp(time_ns))


def lost_response(ev: Any, node_name: str = "", time_ns: Optional[int] = None) -> Any:
    if time_ns is None:
        return opb.GetFlowsResponse(lost_events=ev, node_name=node_name)
    return opb.GetFlowsResponse(lost_events=ev, node_name=node_name, time=timestamp(time_ns))


_flow_decoder = msgspec.json.Decoder(schema.Flow)


def stored_flow_response(body: bytes, node_name: str, time_ns: int, mask: Optional[FieldMask] = None) -> Any:
    """The response for a stored flow (its canonical JSON ``body``, as the store keeps it)."""
    f = flow_to_proto(_flow_decoder.decode(body))
    if mask is not None:
        f = masked(f, mask)
    return flow_response(f, node_name, time_ns)


class _Envelope(msgspec.Struct):
    flow: Optional[schema.Flow] = None
    lost_events: Optional[schema.LostEvent] = None
    node_name: str = ""
    time: str = ""


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def envelope_response(envelope: bytes, mask: Optional[FieldMask] = None) -> Optional[Any]:
    """The response for one JSON envelope (``{"flow"|"lost_events", "node_name", "time"}``, what the
    live hub queues), or None for an envelope of another kind."""
    env = _envelope_decoder.decode(envelope)
    t = time_ns_of(env.time) if env.time else None
    if env.flow is not None:
        f = flow_to_proto(env.flow)
        if mask is not None:
            f = masked(f, mask)
        return flow_response(f, env.node_name, t)
    if env.lost_events is not None:
        return lost_response(lost_to_proto(env.lost_events), env.node_name, t)
    return None


# --------------------------------------------------------------------------------------------
# Field masks
# --------------------------------------------------------------------------------------------


def validate_field_mask(mask: FieldMask) -> None:
    """Raise ConvertError unless every path names a field of ``flow.Flow``."""
    if not mask.IsValidForDescriptor(fpb.Flow.DESCRIPTOR):
        bad = [p for p in mask.paths if not FieldMask(paths=[p]).IsValidForDescriptor(fpb.Flow.DESCRIPTOR)]
        raise ConvertError(f"field_mask: not a path of flow.Flow: {', '.join(bad)}")


def masked(f: Any, mask: FieldMask) -> Any:
    """A new ``flow.Flow`` with only the masked fields of ``f``."""
    out = fpb.Flow()
    mask.MergeMessage(f, out)
    return out


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------

UNSUPPORTED_FILTER_FIELDS: tuple[str, ...] = (
    "source_ip_xlated", "source_cluster_name", "destination_cluster_name", "trace_id", "ip_trace_id", "encrypted",
)
"""Hubble FlowFilter fields that Flowscope's filter engine does not evaluate (requests using them are
refused with INVALID_ARGUMENT)."""


def filter_from_proto(msg: Any) -> FlowFilter:
    """The Flowscope filter of a ``flow.FlowFilter``. Raises ConvertError for fields Flowscope cannot
    evaluate."""
    used = [name for name in UNSUPPORTED_FILTER_FIELDS if len(getattr(msg, name))]
    if msg.HasField("experimental") and len(msg.experimental.cel_expression):
        used.append("experimental.cel_expression")
    if used:
        raise ConvertError(f"filter field(s) not supported by Flowscope: {', '.join(used)}")
    d = _as_dict(msg)
    d.pop("experimental", None)
    return _convert(d, FlowFilter, "filter")


def filter_to_proto(ff: FlowFilter) -> Any:
    """The ``flow.FlowFilter`` of a Flowscope filter (ports given as numbers become text, as in Hubble)."""
    d = msgspec.to_builtins(ff)
    for name in ("source_port", "destination_port"):
        if name in d:
            d[name] = [str(v) for v in d[name]]
    msg = fpb.FlowFilter()
    json_format.ParseDict(d, msg)
    return msg


def filters_from_proto(msgs: Iterable[Any], what: str) -> list[FlowFilter]:
    out = []
    for i, m in enumerate(msgs):
        try:
            out.append(filter_from_proto(m))
        except ConvertError as e:
            raise ConvertError(f"{what}[{i}]: {e}") from None
    return out
