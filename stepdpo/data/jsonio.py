"""JSON on the prepare hot path: orjson when installed (several times faster than the standard
library both ways), else the standard library with the same behaviour for valid JSON.

Differences that matter: orjson accepts only standard JSON (no NaN/Infinity literals), so such a
line is rejected as invalid JSON, which PRM800K-format data never needs. Both write UTF-8 text
without escaping non-ASCII characters.
"""

from __future__ import annotations

import json

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
