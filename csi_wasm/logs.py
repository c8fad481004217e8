"""One structured line per event: ``event(log, "publish", volume_id=..., image=..., digest=...)``.

Fields are whatever the caller passes; callers never pass secrets (credentials
objects hide their password from repr, and no code logs secret maps).

Many fields carry what a pod author or a registry wrote (an ``image`` attribute, an
error message quoting a manifest), so every field is bounded
(``MAX_FIELD_CHARS``, the rest replaced by a note of how much was cut) and escaped:
a JSON line stays one valid JSON object; a text line quotes, with JSON escapes,
any value that is not plain printable ASCII, so a newline or another control
character in a field can never start a forged line. A traceback's lines (text
format) are indented, so they cannot pass for log lines either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

EVENT_FIELDS = "event_fields"
MAX_FIELD_CHARS = 4096
# what a text-format value may hold unquoted: printable ASCII without spaces, quotes or backslashes
_PLAIN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+", re.ASCII)


def event(log: logging.Logger, name: str, level: int = logging.INFO, trace: bool = False, **fields: Any) -> None:
    """One structured line; ``trace``: with the traceback of the exception being handled."""
    if log.isEnabledFor(level):
        log.log(level, name, exc_info=trace, extra={EVENT_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line["event"] = bounded(line["event"])
        line.update({str(key): bounded(value) for key, value in getattr(record, EVENT_FIELDS, {}).items()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)  # ensure_ascii: no raw control or line-separator characters


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, EVENT_FIELDS, {})
        pairs = " ".join(f"{_quote(key)}={_quote(bounded(value))}" for key, value in fields.items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname.lower():5} {_quote(bounded(record.getMessage()))} {pairs}".rstrip()
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            text += "".join(f"\n    | {line}" for line in trace.splitlines())
        return text


def bounded(value: Any) -> Any:
    """``value`` with its text cut at MAX_FIELD_CHARS (numbers, booleans and None pass as they are)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}...[{len(text) - MAX_FIELD_CHARS} more characters cut]"


def _quote(value: Any) -> str:
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def configure(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("csi_wasm")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
