"""The shipped example configuration passes `check`, and `check` reports a broken copy of it
the way the documentation says: every error on its own line, at the right line, exit 2.

These run the real command line in a subprocess, as a user or an installer script would.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from support import BRIDGE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "example.yaml"
PREFIX = "modbus-bridge: error: "


def check(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BRIDGE, "check", "-c", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


def meter_names(text: str) -> list[str]:
    data = yaml.safe_load(text)
    return [m["name"] for seg in data["segments"] for m in seg["meters"]]


def test_example_config_passes_check():
    result = check(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(f"configuration {EXAMPLE}: OK")
    names = meter_names(EXAMPLE.read_text())
    assert len(names) >= 4
    for name in names:
        assert f"meter {name}:" in result.stdout, name
    assert f"{len(names)} meter(s)" in result.stdout
    assert "2 segment(s)" in result.stdout
    assert "modbus tcp: 0.0.0.0:502" in result.stdout


def _line_index(lines: list[str], text: str, start: int = 0) -> int:
    """0-based index of the first line at or after ``start`` whose stripped form starts with ``text``."""
    for i in range(start, len(lines)):
        if lines[i].strip().startswith(text):
            return i
    raise AssertionError(f"{text!r} not found in the example after line {start + 1}")


def _break_example() -> tuple[str, dict[str, int]]:
    """The example with three errors; the key path and 1-based line of each."""
    lines = EXAMPLE.read_text().splitlines()
    expected: dict[str, int] = {}

    # 1. duplicate unit: the second meter of panel-a takes the first one's unit
    first_unit = _line_index(lines, "unit:", _line_index(lines, "- name: incomer"))
    taken = lines[first_unit].split(":", 1)[1].split("#")[0].strip()
    second = _line_index(lines, "- name: lighting")
    second_unit = _line_index(lines, "unit:", second)
    lines[second_unit] = lines[second_unit].split("unit:")[0] + f"unit: {taken}"
    expected["segments[0].meters[1].unit"] = second_unit + 1

    # 2. unknown key: a misspelt poll_interval on the third meter of panel-a
    third = _line_index(lines, "- name: sockets")
    poll = _line_index(lines, "poll_interval:", third)
    lines[poll] = lines[poll].replace("poll_interval:", "poll_intervall:")
    expected["segments[0].meters[2].poll_intervall"] = poll + 1

    # 3. bad parity on panel-b
    parity = _line_index(lines, "parity:", _line_index(lines, "- name: panel-b"))
    lines[parity] = lines[parity].split("parity:")[0] + "parity: X"
    expected["segments[1].parity"] = parity + 1

    return "\n".join(lines) + "\n", expected


def test_broken_example_reports_every_error_at_its_line(tmp_path):
    text, expected = _break_example()
    path = tmp_path / "broken.yaml"
    path.write_text(text)

    result = check(path)

    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert len(errors) == 3, errors
    assert all(e.startswith(PREFIX) for e in errors), errors
    reported = [e[len(PREFIX):] for e in errors]
    for (key, line), error in zip(sorted(expected.items(), key=lambda kv: kv[1]), reported):
        assert error.startswith(f"{path}:{line}: {key}: "), (error, key, line)
    by_key = {key: error for key, error in zip(sorted(expected, key=expected.get), reported)}
    assert "is already used by meter 'incomer'" in by_key["segments[0].meters[1].unit"]
    assert "did you mean 'poll_interval'?" in by_key["segments[0].meters[2].poll_intervall"]
    assert "unknown parity 'X'" in by_key["segments[1].parity"]


def test_missing_config_file_is_one_line_and_exit_2():
    result = check("/nonexistent.yaml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{PREFIX}/nonexistent.yaml: file not found"]
