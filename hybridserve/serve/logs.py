"""Client-controlled text in the API process's log lines: escaped and capped.

Field names, request ids, model names and paths come from clients. Written raw, a newline in one
forges a log line and 20,000 unknown field names make one line of 150 KB. `ClientTextFilter` (on the
"hybridserve.serve" logger, installed by `build_app`) rewrites every string argument of a record:
control characters become escapes and anything past `LOG_TEXT_LIMIT` characters is cut, saying how
much was left out. The format string itself is ours and left alone.
"""

from __future__ import annotations

import logging
import re

LOG_TEXT_LIMIT = 256
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clip(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """`text` safe for one log line or error message: control characters escaped, at most ~`limit` chars."""
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return f"{text}...({cut} more characters)" if cut > 0 else text


class ClientTextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(clip(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: clip(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_log_filter(logger: logging.Logger) -> None:
    if not any(isinstance(f, ClientTextFilter) for f in logger.filters):
        logger.addFilter(ClientTextFilter())
