"""Flags accepted only so that vLLM command lines work: the one table of what each really does.

A flag here is not a setting of ours. Each entry says its true effect; a value we cannot honour
is refused with the reason (exit status 2, before anything starts), every other value is
accepted and its effect logged once at start-up. An entry is left out when a config already has a
field of that name (`add_compat_flags` skips flags the parser has): once the engine gains a
setting of such a name, the real flag takes over with no change here. docs/serving.md lists the same
effects; a test keeps the two in step.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridserve.config_flags import flag_name, option_strings

logger = logging.getLogger("hybridserve")

REASONING_PARSERS = ("nano_v3", "nemotron_v3", "nemotron_3")
TOOL_CALL_PARSERS = ("qwen3_coder", "qwen3_xml")


@dataclass(frozen=True)
class CompatFlag:
    name: str  # the dest; the flag is --name-with-dashes
    effect: str  # what giving it really does (logged, documented)
    kind: type = bool  # bool: --x / --no-x; else the value's type
    refuse: Callable[[Any], str | None] = lambda value: None  # the reason a value is refused, or None
    serve_only: bool = False
    metavar: str | None = None


def _only(allowed: tuple[Any, ...], reason: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in allowed else reason


COMPAT_FLAGS = (
    CompatFlag("trust_remote_code", "no effect: NemotronH is built in, no code from the checkpoint is run"),
    CompatFlag("enable_chunked_prefill", "no effect: long prompts are always prefilled in chunks of "
                                         "--max-num-batched-tokens",
               refuse=_only((True,), "prefill is always chunked; it cannot be turned off")),
    CompatFlag("disable_log_stats", "no effect: the engine logs one throughput line every 10 s while busy"),
    CompatFlag("tokenizer_mode", "no effect: the checkpoint's fast tokenizer (tokenizer.json) is used", str,
               _only(("auto", "hf"), "only the fast tokenizer (tokenizer.json) is supported: use auto or hf")),
    CompatFlag("data_parallel_size", "no effect: one engine per server", int,
               _only((1,), "one engine per server: for data parallelism run one server per GPU behind a router")),
    CompatFlag("enable_auto_tool_choice", "no effect: tool_choice auto is always available", serve_only=True),
    CompatFlag("tool_call_parser", "no effect: the Nemotron tool-call parser (qwen3_coder format) is built in", str,
               _only(TOOL_CALL_PARSERS, f"only the Nemotron tool-call format is built in: {', '.join(TOOL_CALL_PARSERS)}"),
               serve_only=True),
    CompatFlag("reasoning_parser", "no effect: the Nemotron reasoning parser (nano_v3) is built in and always on", str,
               _only(REASONING_PARSERS, f"only the Nemotron reasoning parser is built in: {', '.join(REASONING_PARSERS)}"),
               serve_only=True),
    CompatFlag("reasoning_parser_plugin", "no effect: the file is not loaded (the parsers are built in)", str,
               serve_only=True, metavar="FILE"),
    CompatFlag("tool_parser_plugin", "no effect: the file is not loaded (the parsers are built in)", str,
               serve_only=True, metavar="FILE"),
    CompatFlag("disable_log_requests", "no effect: requests are only logged with --enable-log-requests "
                                       "(vLLM's default since 0.11)", serve_only=True),
)


def add_compat_flags(parser: argparse.ArgumentParser, serve: bool) -> list[CompatFlag]:
    """Add the table's flags the parser does not have yet (a real setting of that name wins)."""
    known = option_strings(parser)
    group = parser.add_argument_group("accepted for vLLM compatibility (see docs/serving.md)")
    added = []
    for flag in COMPAT_FLAGS:
        if (flag.serve_only and not serve) or flag_name(flag.name) in known:
            continue
        if flag.kind is bool:
            group.add_argument(flag_name(flag.name), dest=flag.name, action=argparse.BooleanOptionalAction,
                               default=None, help=flag.effect.replace("%", "%%"))
        else:
            group.add_argument(flag_name(flag.name), dest=flag.name, type=flag.kind, default=None,
                               metavar=flag.metavar, help=flag.effect.replace("%", "%%") or None)
        added.append(flag)
    parser.set_defaults(compat_flags=tuple(f.name for f in added))
    return added


def compat_effects(args: argparse.Namespace) -> list[str]:
    """`--flag value: effect` for each compatibility flag given; raises ValueError for a refused value."""
    effects = []
    for flag in COMPAT_FLAGS:
        value = getattr(args, flag.name, None)
        if value is None or flag.name not in getattr(args, "compat_flags", ()):
            continue
        reason = flag.refuse(value)
        spelled = flag_name(flag.name) if value is True else (
            "--no-" + flag_name(flag.name)[2:] if value is False else f"{flag_name(flag.name)} {value}")
        if reason:
            raise ValueError(f"{spelled}: {reason}")
        effects.append(f"{spelled}: {flag.effect}")
    return effects


def log_compat_effects(effects: list[str]) -> None:
    for line in effects:
        logger.info("vLLM compatibility flag %s", line)
