"""Run the bench CLI in-process (a module of its own: a `conftest` import is ambiguous across folders)."""

from __future__ import annotations

from hybridserve.bench import cli


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `hybridserve bench ...` in-process; returns (exit code, stdout, stderr)."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
