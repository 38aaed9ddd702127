"""Serving benchmark: `hybridserve bench serve` (a load generator whose numbers mean what
`vllm bench serve`'s numbers mean) and `hybridserve bench sweep` (curves, plots, operating point).

Entry point for the CLI is `hybridserve.bench.cli.register`.
"""
