"""Command-line flags made from config dataclasses: one `--flag` per field, defaulting to the field.

`add_config_flags(parser, Config)` is how `serve` and `generate` get their settings flags, so a
default lives only in its field and a field added to a config later has its flag at once. What a
flag looks like comes from the field:

* its type: `bool` -> `--x` / `--no-x`; `int`, `float`, `str` (optional or not) -> a value;
  `Literal[...]` -> choices; `list[...]` / `tuple[...]` -> one or more values;
* its metadata, all optional: `help`; `choices`; `aliases` (other spellings, e.g. vLLM's `-tp`);
  `parse` (the value's parser, e.g. `token_count`); `env` (environment variables read for the
  default, first set wins); `flag: False` (no flag);
* else its trailing `# comment` in the class source is the help.

`FlexibleArgumentParser` reads `--foo_bar` as `--foo-bar`, as vLLM does, so flags copied from a
vLLM command line work either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Iterable
from typing import Any

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def token_count(text: str) -> int:
    """A positive integer, optionally with a k / m suffix (1024-based, as vLLM reads `32k`)."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1]) * scale) if scale > 1 else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def limit_or_unbounded(text: str) -> int | None:
    """An integer limit, or -1 / none for no limit (None)."""
    if text.strip().lower() in ("-1", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer (or -1 for no limit): {text!r}") from None


def normalize_flag_spelling(argv: Iterable[str]) -> list[str]:
    """`--foo_bar[=v]` -> `--foo-bar[=v]` (values are left alone)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.partition("=")[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser (and its subparsers) that accepts vLLM's underscore flag spellings."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(normalize_flag_spelling(args), namespace)


def field_comments(cls: type) -> dict[str, str]:
    """Trailing `# comment` of each field line in the class source ({} if the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2) for line in source.splitlines() if (m := _COMMENT.match(line))}


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                     skip: Iterable[str] = ()) -> list[str]:
    """Add one flag per field of dataclass `cls` (except `skip` and `flag: False`); returns the dests."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    added = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or meta.get("flag", True) is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        for var in meta.get("env", ()):
            if os.environ.get(var):
                default = os.environ[var]
                break
        kind, _ = _base_type(hints[f.name])
        help_text = meta.get("help") or comments.get(f.name) or ""
        names = [flag_name(f.name), *meta.get("aliases", ())]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            origin = typing.get_origin(kind)
            if origin is typing.Literal:
                kwargs["choices"] = typing.get_args(kind)
                kind = type(kwargs["choices"][0])
            elif origin in (list, tuple):
                kwargs["nargs"] = "+"
                kind = (typing.get_args(kind) or (str,))[0]
            kwargs["type"] = meta.get("parse") or (kind if kind in (int, float) else str)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = meta.get("metavar")
        hidden = default in (None, "", [], ()) or (kind is bool and default is False) or "env" in meta  # no secrets
        shown = "" if hidden else f" (default: {default})"
        kwargs["help"] = (help_text + shown).strip().replace("%", "%%") or None  # argparse formats help with %
        parser.add_argument(*names, **kwargs)
        added.append(f.name)
    return added


def config_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """An instance of `cls` from the parsed flags of its fields (plus `fixed` values)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name) and f.name not in fixed}
    return cls(**values, **fixed)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--flag` spelling the parser (and its argument groups) knows."""
    return {s for action in parser._actions for s in action.option_strings}
