"""Sans-I/O L7 parsing: TCP reassembly, protocol detection, HTTP/1.1, HTTP/2 + gRPC, Kafka and DNS.

Bytes in, :class:`~probe.l7.records.L7Event` out; nothing here does I/O or raises on bad input.
The front door is :class:`~probe.l7.conversation.Conversation` (one TCP connection) and
:class:`~probe.l7.conversation.DnsConversation` (UDP datagrams).
"""

from probe.l7.config import L7Config
from probe.l7.conversation import Conversation, DnsConversation
from probe.l7.records import DnsRecord, HttpRecord, KafkaRecord, L7Event

__all__ = [
    "Conversation",
    "DnsConversation",
    "DnsRecord",
    "HttpRecord",
    "KafkaRecord",
    "L7Config",
    "L7Event",
]
