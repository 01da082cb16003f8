"""CNI error codes and the error type every verb raises.

A :class:`CNIError` becomes the spec's error object on stdout (``{cniVersion, code, msg, details}``)
and a non-zero exit status. Codes 1-99 are the spec's; 100+ are Flowscope's own.
"""

from __future__ import annotations

# Spec codes (CNI 1.1.0, "Error" section).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
NOT_AVAILABLE_IMPACT = 51

# Flowscope's plugin-specific codes (100+).
IPAM_EXHAUSTED = 100
INTERFACE_EXISTS = 101
NETLINK_FAILURE = 102
IPAM_FAILURE = 103
CHECK_FAILED = 104
INTERNAL = 199

CODE_NAMES = {
    INCOMPATIBLE_VERSION: "incompatible CNI version",
    UNSUPPORTED_FIELD: "unsupported field in network configuration",
    UNKNOWN_CONTAINER: "container unknown or does not exist",
    INVALID_ENV: "invalid or missing environment variables",
    IO_FAILURE: "I/O failure",
    DECODE_FAILURE: "failed to decode content",
    INVALID_CONFIG: "invalid network configuration",
    TRY_AGAIN: "try again later",
    NOT_AVAILABLE: "plugin not available",
    NOT_AVAILABLE_IMPACT: "plugin not available, existing containers may be affected",
    IPAM_EXHAUSTED: "no IP addresses available",
    INTERFACE_EXISTS: "interface already exists",
    NETLINK_FAILURE: "netlink operation failed",
    IPAM_FAILURE: "IPAM failure",
    CHECK_FAILED: "attachment does not match prevResult",
    INTERNAL: "internal error",
}


class CNIError(Exception):
    """An error to report to the runtime. ``msg`` is short; ``details`` says what exactly and why."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = int(code)
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg

    def to_dict(self, cni_version: str) -> dict:
        return {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}

    @classmethod
    def from_dict(cls, obj: object, fallback: str = "") -> "CNIError":
        """An error object printed by another plugin (delegated IPAM); ``fallback`` if it is not one."""
        if isinstance(obj, dict) and isinstance(obj.get("code"), int):
            return cls(obj["code"], str(obj.get("msg") or CODE_NAMES.get(obj["code"], "error")),
                       str(obj.get("details") or ""))
        return cls(INTERNAL, "plugin failed", fallback)
