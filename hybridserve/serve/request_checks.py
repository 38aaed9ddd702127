"""Unknown request fields are logged (accepted, never silently meaningful)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("hybridserve.serve")


def warn_unknown_fields(req: Any) -> None:
    unknown = req.unknown_fields()
    if unknown:  # names are client text: a few shown (the log filter escapes and caps each)
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        logger.warning("ignoring unknown request fields: %s%s", ", ".join(unknown[:10]), more)
