"""One exception hierarchy for the whole bridge.

Every error a user can meet carries a message they can act on; the CLI prints
``str(error)`` as one line and exits non-zero, never a traceback.
"""
from __future__ import annotations

from dataclasses import dataclass


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration or profile file, located for the user."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(BridgeError):
    """A configuration (or a profile it names) is invalid; holds every issue found."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class ProtocolError(BridgeError):
    """Bytes that are not a valid Modbus frame."""


class TransactionError(BridgeError):
    """A serial transaction did not produce a usable reply."""


class ReplyTimeout(TransactionError):
    """No (complete) reply within the segment's timeout."""


class BadReply(TransactionError):
    """A reply arrived but is unusable: CRC error, wrong slave/function/length."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind  # counter name: "crc", "wrong_slave", "wrong_function", "wrong_length", ...
        super().__init__(f"{kind}: {detail}")


class ExceptionReply(TransactionError):
    """The meter answered with a Modbus exception."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"meter answered with Modbus exception 0x{code:02X}")


class PortError(TransactionError):
    """The serial port is gone or failing (unplugged adapter, I/O error)."""
