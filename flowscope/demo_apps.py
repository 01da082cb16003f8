"""Small programs the demo runs inside its pods: a gRPC service and client (no code generation: raw
bytes over a generic handler), a DNS server, and a Kafka producer/consumer.

    python -m flowscope.demo_apps grpc-server PORT
    python -m flowscope.demo_apps grpc-client HOST:PORT
    python -m flowscope.demo_apps dns-server PORT NAME=IP [NAME=IP ...]
    python -m flowscope.demo_apps dns-client SERVER NAME [NAME ...]
    python -m flowscope.demo_apps kafka-producer HOST:PORT TOPIC
    python -m flowscope.demo_apps kafka-consumer HOST:PORT TOPIC GROUP

Every program loops until killed; errors are printed and retried, never fatal.
"""

from __future__ import annotations

import random
import sys
import time

SERVICE = "shop.Catalog"
ITEMS = {b"apple": b"1.20", b"pear": b"0.90", b"plum": b"2.10"}


def grpc_server(port: int) -> None:
    from concurrent import futures

    import grpc

    def get_item(request: bytes, context) -> bytes:
        price = ITEMS.get(request)
        if price is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no item {request.decode(errors='replace')}")
        return price

    def list_items(request: bytes, context):
        for name in ITEMS:
            yield name

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "GetItem": grpc.unary_unary_rpc_method_handler(get_item),
        "ListItems": grpc.unary_stream_rpc_method_handler(list_items),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    server.wait_for_termination()


def grpc_client(target: str) -> None:
    import grpc

    while True:
        try:
            with grpc.insecure_channel(target) as ch:
                get = ch.unary_unary(f"/{SERVICE}/GetItem")
                lst = ch.unary_stream(f"/{SERVICE}/ListItems")
                for _ in range(20):
                    name = random.choice(list(ITEMS) + [b"kiwi"])  # kiwi: NOT_FOUND
                    try:
                        get(name, timeout=2)
                    except grpc.RpcError:
                        pass
                    if random.random() < 0.3:
                        list(lst(b"", timeout=2))
                    time.sleep(0.7)
        except Exception as e:  # noqa: BLE001 - keep the demo going
            print(f"grpc client: {e}", file=sys.stderr)
            time.sleep(1)


def dns_server(port: int, records: list[str]) -> None:
    from dnslib import QTYPE, RR, A, AAAA
    from dnslib.server import BaseResolver, DNSServer

    table: dict[str, list[str]] = {}
    for rec in records:
        name, ip = rec.split("=", 1)
        table.setdefault(name.rstrip(".") + ".", []).append(ip)

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            qname = str(request.q.qname)
            ips = table.get(qname)
            if not ips:
                reply.header.rcode = 3  # NXDOMAIN
                return reply
            for ip in ips:
                if ":" in ip and request.q.qtype == QTYPE.AAAA:
                    reply.add_answer(RR(qname, QTYPE.AAAA, rdata=AAAA(ip), ttl=30))
                elif ":" not in ip and request.q.qtype == QTYPE.A:
                    reply.add_answer(RR(qname, QTYPE.A, rdata=A(ip), ttl=30))
            return reply

    server = DNSServer(Resolver(), port=port, address="0.0.0.0")
    server.start()


def dns_client(server: str, names: list[str]) -> None:
    from dnslib import DNSRecord

    while True:
        for name in names + ["nosuch.demo."]:
            try:
                DNSRecord.question(name, "A").send(server, 53, timeout=1)
            except Exception:  # noqa: BLE001
                pass
            time.sleep(1)


def kafka_producer(bootstrap: str, topic: str) -> None:
    from kafka import KafkaProducer

    while True:
        try:
            p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, request_timeout_ms=5000)
            n = 0
            while True:
                p.send(topic, f"order {n}".encode())
                p.flush(timeout=5)
                n += 1
                time.sleep(1)
        except Exception as e:  # noqa: BLE001 - the broker may still be starting
            print(f"kafka producer: {e}", file=sys.stderr)
            time.sleep(2)


def kafka_consumer(bootstrap: str, topic: str, group: str) -> None:
    from kafka import KafkaConsumer

    while True:
        try:
            c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=6000,
                              heartbeat_interval_ms=1000, auto_offset_reset="earliest", request_timeout_ms=8000)
            for _ in c:
                pass
        except Exception as e:  # noqa: BLE001
            print(f"kafka consumer: {e}", file=sys.stderr)
            time.sleep(2)


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "grpc-server":
        grpc_server(int(args[0]))
    elif cmd == "grpc-client":
        grpc_client(args[0])
    elif cmd == "dns-server":
        dns_server(int(args[0]), args[1:])
        while True:
            time.sleep(3600)
    elif cmd == "dns-client":
        dns_client(args[0], args[1:])
    elif cmd == "kafka-producer":
        kafka_producer(args[0], args[1])
    elif cmd == "kafka-consumer":
        kafka_consumer(args[0], args[1], args[2])
    else:
        print(f"unknown program {cmd}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
