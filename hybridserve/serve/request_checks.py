"""Fields we know but do not implement are rejected (never fail open); unknown fields are logged."""

from __future__ import annotations

import logging
from typing import Any

from hybridserve.serve.errors import bad_request
from hybridserve.serve.protocol import UNSUPPORTED_FIELDS

logger = logging.getLogger("hybridserve.serve")


def reject_unsupported(req: Any) -> None:
    extra = req.model_extra or {}
    for name in UNSUPPORTED_FIELDS:
        if extra.get(name) is not None:
            raise bad_request(f"{name} is not supported by hybridserve (no constrained decoding); "
                              "remove it rather than have it silently ignored", name)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.get("type", "text") != "text":
        raise bad_request(f"response_format type {fmt.get('type')!r} is not supported yet (only 'text'); "
                          "hybridserve has no constrained decoding", "response_format")
    unknown = [k for k in req.unknown_fields() if k not in UNSUPPORTED_FIELDS]
    if unknown:  # names are client text: a few shown (the log filter escapes and caps each)
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        logger.warning("ignoring unknown request fields: %s%s", ", ".join(unknown[:10]), more)
