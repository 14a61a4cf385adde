"""The state directory: the one writable place for what the bridge keeps between runs.

``Config.state_dir`` (resolved by ``load_config``: the ``state_dir`` key, else ``$STATE_DIRECTORY``
set by systemd, else ``state/`` next to the configuration file) holds the OPC UA certificates, the
MQTT queue and Sparkplug bdSeq, and the energy store. ``ensure_state_dir`` makes sure it exists and
is writable before anything is kept there, failing with one line the user can act on;
``state_path`` names a file or folder inside it.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from bridge.core.errors import BridgeError

STATE_DIR_MODE = 0o750  # the service user and its group; like systemd's StateDirectoryMode=0750
_HINT = "set state_dir to a writable folder"


def ensure_state_dir(path: str) -> Path:
    """Create the state directory (and missing parents, mode 0750) if needed and check that it is a
    writable folder; ``BridgeError`` with one line naming the path and the reason otherwise."""
    if not path:
        raise BridgeError(f"state_dir is not set; {_HINT}")
    directory = Path(path)
    try:
        if directory.exists() and not directory.is_dir():
            raise _error(directory, "not a folder (a file is in the way)")
        missing = list(itertools.takewhile(lambda p: not p.exists(), (directory, *directory.parents)))
        present = directory.parents[len(missing) - 1] if missing else directory  # the nearest existing one
        if missing and not present.is_dir():
            raise _error(directory, f"cannot create ({present} is a file, not a folder)")
        for folder in reversed(missing):  # parents first, each with our mode (makedirs sets it on the last only)
            folder.mkdir(mode=STATE_DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise _error(directory, f"cannot create ({_reason(exc, directory)})") from None
    try:  # a real write: permission bits do not stop root, a read-only mount or a full disk do
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _error(directory, f"not writable ({_reason(exc, directory)})") from None
    return directory


def state_path(config_state_dir: str, *parts: str) -> Path:
    """``parts`` inside the state directory (nothing is created); ``BridgeError`` when it is not set."""
    if not config_state_dir:
        raise BridgeError(f"state_dir is not set; {_HINT}")
    return Path(config_state_dir).joinpath(*parts)


def _reason(exc: OSError, directory: Path) -> str:
    reason = (exc.strerror or str(exc)).lower()
    # the file that failed, when it is not the state directory itself (a parent, the write probe)
    if exc.filename and Path(exc.filename) != directory and Path(exc.filename).parent != directory:
        reason = f"{reason}: {exc.filename}"
    return reason


def _error(directory: Path, what: str) -> BridgeError:
    return BridgeError(f"state_dir {directory}: {what}; {_HINT}")
