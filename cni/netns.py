"""Netlink sockets inside a container's network namespace, without forking.

``setns(2)`` switches only the calling thread, and a socket keeps the namespace it was created in.
So :func:`netlink_in` switches this thread into the namespace, opens a NETLINK_ROUTE socket, switches
straight back, and hands the socket to pyroute2. Every later operation runs from the host namespace;
other threads (of the node agent that hosts the CNI service) never notice.

(pyroute2's own ``IPRoute(netns=...)`` forks a child per socket and, by default, *creates* a missing
namespace, which is wrong for DEL/CHECK of a deleted container.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
from contextlib import contextmanager
from typing import Iterator

from cni import errors as E
from cni.errors import CNIError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class NetnsGone(CNIError):
    def __init__(self, path: str, why: str):
        super().__init__(E.UNKNOWN_CONTAINER, "network namespace does not exist", f"{path}: {why}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """An fd of the namespace at ``path`` (checked to be a network namespace); NetnsGone otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsGone(path, "no such file") from None
    except OSError as e:
        raise NetnsGone(path, e.strerror or str(e)) from None
    try:
        # Entering and leaving validates the fd (EINVAL: not a netns) without side effects.
        socket_in(fd).close()
    except OSError as e:
        os.close(fd)
        why = "not a network namespace" if e.errno == errno.EINVAL else (e.strerror or str(e))
        raise NetnsGone(path, why) from None
    return fd


def socket_in(ns_fd: int) -> socket.socket:
    """A NETLINK_ROUTE socket living in the namespace ``ns_fd``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(ns_fd)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
        finally:
            try:
                _setns(own)
            except OSError as e:  # pragma: no cover - cannot happen with a valid fd of our own namespace
                os.write(2, f"flowscope-cni: FATAL: cannot return to own network namespace: {e}\n".encode())
                os._exit(70)
    finally:
        os.close(own)


@contextmanager
def netlink_in(ns_fd: int | None = None) -> Iterator["object"]:
    """pyroute2 IPRoute on the host namespace (``None``) or on ``ns_fd``; closed on exit."""
    from pyroute2 import IPRoute

    if ns_fd is None:
        ipr = IPRoute()
    else:
        ipr = IPRoute(fileno=socket_in(ns_fd).detach())
    try:
        yield ipr
    finally:
        ipr.close()
