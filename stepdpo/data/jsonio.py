"""JSON on the prepare hot path: orjson when installed (several times faster than the standard
library both ways), else the standard library with the same behaviour for valid JSON.

Differences that matter: orjson accepts only standard JSON (no NaN/Infinity literals), so such a
line is rejected as invalid JSON, which PRM800K-format data never needs. Both write UTF-8 text
without escaping non-ASCII characters.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None

JSONDecodeError = json.JSONDecodeError  # orjson.JSONDecodeError subclasses it

if orjson is not None:
    loads = orjson.loads
    canonical_json = orjson.dumps  # compact separators, UTF-8, no ASCII escaping

    def dumps_line(obj) -> bytes:
        return orjson.dumps(obj) + b"\n"

else:
    loads = json.loads
    _encoder = json.JSONEncoder(ensure_ascii=False)
    _compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

    def canonical_json(obj) -> bytes:
        return _compact.encode(obj).encode("utf-8")

    def dumps_line(obj) -> bytes:
        return (_encoder.encode(obj) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------ file layouts
LAYOUT_HINT = ("stepdpo reads JSON Lines (one object per line), a JSON array of objects, or a stream of "
                "concatenated (e.g. pretty-printed) JSON objects")


def records(path: Path, layout: dict):
    """(line, raw bytes or parsed row, is_text) for every record of the file, whatever its layout:

    * JSON Lines: each line as bytes (parsed by the caller: a bad line is one rejected line);
    * a JSON array, or concatenated JSON objects (pretty-printed samples of PRM800K are shipped that way):
      each value parsed here; `line` is the line where the value starts. A value that does not parse is
      one rejected record, and reading resumes at the next line that starts an object.
    `layout["name"]` says which layout was found."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    text_head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    first_line = text_head.split(b"\n", 1)[0].strip()
    # A JSON array starts with "["; a pretty-printed object stream with a line that is only "{". Anything else
    # is JSON Lines, where a line that does not parse (invalid UTF-8 included) is one rejected line.
    whole = text_head.startswith(b"[") or first_line == b"{"
    if not whole:
        layout["name"] = "jsonl"
        with path.open("rb") as f:  # bytes: a line with invalid UTF-8 is one rejected line, not a crash
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                yield lineno, line, True
        return
    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    layout["name"] = "json-array" if text.lstrip().startswith("[") else "concatenated-json"
    yield from _values(text, array=layout["name"] == "json-array")


_DECODER = json.JSONDecoder()


def _values(text: str, array: bool):
    """Values of a JSON array or of concatenated JSON values, with the line each starts on."""
    import bisect
    import re

    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    ws = re.compile(r"[ \t\r\n]*")
    pos = ws.match(text, 0).end()
    if array:
        pos = ws.match(text, pos + 1).end()  # past "["
    while pos < len(text):
        if array and text[pos] == "]":
            return
        start = pos
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else \
                "nested too deeply to parse"
            yield line_of(start), Unparsable(detail), False
            # resume at the next line that starts a new object (pretty-printed values start at column 0)
            nxt = re.compile(r"\n[\[{]").search(text, start + 1)
            if nxt is None:
                return
            pos = nxt.start() + 1
            continue
        yield line_of(start), value, False
        pos = ws.match(text, pos).end()
        if array and pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()


class Unparsable:
    """A value of a whole-file layout that is not valid JSON (rejected like an invalid JSON line)."""

    def __init__(self, detail: str):
        self.detail = detail




def parsed_records(path: Path):
    """(line, parsed value or None, why it is not valid JSON or None) for every non-blank record of any layout."""
    for line, raw, is_text in records(path, {}):
        if is_text and not raw.strip():
            continue
        if raw.__class__ is Unparsable:
            yield line, None, f"not valid JSON ({raw.detail})"
            continue
        try:
            yield line, (loads(raw) if is_text else raw), None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            detail = getattr(e, "msg", None) or ("not valid UTF-8" if isinstance(e, UnicodeDecodeError) else
                                                 "nested too deeply")
            yield line, None, f"not valid JSON ({detail})"
