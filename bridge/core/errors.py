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


class PduException(BridgeError):
    """A request that must be answered with a Modbus exception (``code``) for ``function``."""

    def __init__(self, function: int, code: int):  # on a server's hot path: no message built here
        self.function = function
        self.code = code

    def __str__(self) -> str:
        return f"Modbus exception 0x{self.code:02X} for function {self.function}"

    def pdu(self) -> bytes:
        return bytes(((self.function | 0x80) & 0xFF, self.code))


class UnknownProfile(BridgeError):
    """A profile reference that is neither a built-in name nor an existing file."""


class ImageReadError(BridgeError):
    """A read the register image may not serve; each north side says it in its own terms."""


class NoSuchUnit(ImageReadError):
    def __init__(self, unit: int):
        self.unit = unit
        super().__init__(f"no meter has unit id {unit}")


class OutsideImage(ImageReadError):
    def __init__(self, unit: int, address: int, count: int):
        super().__init__(f"unit {unit}: registers {address}..{address + count - 1} are not in its image")


class NotFresh(ImageReadError):
    def __init__(self, unit: int):
        self.unit = unit
        super().__init__(f"unit {unit}: never read, stale or offline")
