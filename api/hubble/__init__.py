"""Hubble API compatibility: the Observer gRPC service over Flowscope's store (see server.py)."""
