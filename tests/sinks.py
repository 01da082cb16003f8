"""An in-process consumer of the agent's output, standing where the shipper stands (the agent's
flows are collected in a list instead of being posted to a server)."""

from __future__ import annotations

from flowscope import schema


class ListSink:
    def __init__(self):
        self.flows: list[schema.Flow] = []
        self.lost: list[tuple[str, int, int | None]] = []

    stats = None

    def start(self):
        pass

    def put(self, flows):
        self.flows.extend(flows)

    def report_lost(self, source, n, cpu=None):
        self.lost.append((source, n, cpu))

    def close(self, deadline_s: float = 0):
        pass
