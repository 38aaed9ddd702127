"""`hybridserve` command line: serve | generate | bench. Each part registers its own subcommand; vLLM's
underscore flag spellings (`--max_model_len`) are read as dashes everywhere."""

from __future__ import annotations

import argparse
import sys

from hybridserve import __version__
from hybridserve.config_flags import FlexibleArgumentParser

SUBCOMMAND_MODULES = ("hybridserve.serve.cli", "hybridserve.engine.cli", "hybridserve.bench.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = FlexibleArgumentParser(
        prog="hybridserve", description="Inference server for NVIDIA Nemotron-3-Nano and the NemotronH family."
    )
    parser.add_argument("--version", action="version", version=f"hybridserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{serve,generate,bench}")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
