"""Command line of `hybridserve bench serve` and `hybridserve bench sweep`.

`register(subparsers)` adds the `bench` command to the project's parser (hybridserve/cli.py);
`python -m hybridserve.bench.cli serve ...` runs it standalone. Flag names and defaults follow
`vllm bench serve` where the two overlap.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import uuid

from hybridserve.config_flags import FlexibleArgumentParser

BACKENDS = ("vllm", "openai", "openai-chat")  # vllm = openai, as in `vllm bench serve`


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `bench serve` flag (the sweep takes them too and varies one)."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="server base URL; overrides --host/--port")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default=None,
                        help="API route (default /v1/completions, or /v1/chat/completions for openai-chat)")
    server.add_argument("--backend", choices=BACKENDS, default="openai",
                        help="vllm and openai: streaming /v1/completions; openai-chat: streaming /v1/chat/completions")
    server.add_argument("--header", nargs="*", metavar="KEY=VALUE", default=None,
                        help="HTTP headers sent with every request (they override OPENAI_API_KEY's Authorization; "
                             "x-request-id is always the request's own)")
    server.add_argument("--model", default=None,
                        help="model id: the tokenizer default, and the name requested unless --served-model-name "
                             "(default: first of /v1/models)")
    server.add_argument("--served-model-name", default=None, help="the name sent in requests (default: --model)")
    server.add_argument("--tokenizer", default=None,
                        help="tokenizer directory, Hugging Face hub id or hybridserve preset (default: the model id)")
    server.add_argument("--tokenizer-mode", default="auto",
                        help="auto / hf: the fast tokenizer; slow: the Python one (hub tokenizers); others refused")
    server.add_argument("--trust-remote-code", action="store_true",
                        help="let a hub tokenizer run its own code (transformers' trust_remote_code)")
    server.add_argument("--skip-tokenizer-init", action="store_true",
                        help="load no tokenizer: token counts come from the server's usage only (datasets that "
                             "must count tokens on the client are refused)")
    server.add_argument("--ready-check-timeout-sec", type=int, default=0,
                        help="wait up to this long for the server to answer a test request (0: no check)")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=["random", "prefix_repetition", "multi_turn", "sharegpt", "custom"],
                      default="random")
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON or custom JSONL file")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--random-input-len", "--input-len", type=int, default=1024)
    data.add_argument("--random-output-len", "--output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--random-prefix-len", type=int, default=0)
    data.add_argument("--prefix-repetition-prefix-len", type=int, default=256, help="tokens of each shared prefix")
    data.add_argument("--prefix-repetition-suffix-len", type=int, default=256, help="tokens of each prompt's own suffix")
    data.add_argument("--prefix-repetition-num-prefixes", type=int, default=10, help="distinct shared prefixes")
    data.add_argument("--prefix-repetition-output-len", type=int, default=128)
    data.add_argument("--multi-turn-num-turns", type=int, default=8,
                      help="turns per conversation (--num-prompts // this many conversations, turns sent in order, "
                           "each resending the conversation so far)")
    data.add_argument("--multi-turn-system-prompt-len", type=int, default=2048,
                      help="tokens of the system prompt every conversation opens with")
    data.add_argument("--multi-turn-user-len", type=int, default=64, help="tokens of each user message")
    data.add_argument("--multi-turn-output-len", type=int, default=128, help="answer tokens per turn")
    data.add_argument("--sharegpt-output-len", type=int, default=None)
    data.add_argument("--custom-output-len", type=int, default=256)
    data.add_argument("--custom-skip-chat-template", action="store_true")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--request-id-prefix", default=f"bench-{uuid.uuid4().hex[:8]}-",
                      help="x-request-id prefix (default: bench-<random>-, unique per run)")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests per second (inf: all at t=0)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson arrivals")
    load.add_argument("--max-concurrency", type=int, default=None, help="client-side cap on requests in flight")
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true")
    load.add_argument("--temperature", type=float, default=None)
    load.add_argument("--top-p", type=float, default=None)
    load.add_argument("--top-k", type=int, default=None)
    load.add_argument("--min-p", type=float, default=None)
    load.add_argument("--frequency-penalty", type=float, default=None)
    load.add_argument("--presence-penalty", type=float, default=None)
    load.add_argument("--repetition-penalty", type=float, default=None)
    load.add_argument("--logprobs", type=int, default=None, help="logprobs per token (completions backends)")
    load.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request")

    out = parser.add_argument_group("results")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="subset of ttft,tpot,itl,e2el")
    out.add_argument("--metric-percentiles", default="99", help='e.g. "50,90,99"')
    out.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    out.add_argument("--save-result", action="store_true")
    out.add_argument("--append-result", action="store_true",
                     help="append the result as one more JSON line to the result file (implies saving)")
    out.add_argument("--save-detailed", action="store_true", help="also save per-request arrays")
    out.add_argument("--result-dir", default=None)
    out.add_argument("--result-filename", default=None)
    out.add_argument("--label", default=None)
    out.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE")
    out.add_argument("--disable-tqdm", action="store_true")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    sweep = parser.add_argument_group("sweep")
    axis = sweep.add_mutually_exclusive_group(required=True)
    axis.add_argument("--concurrencies", help="comma-separated --max-concurrency values, e.g. 1,8,64")
    axis.add_argument("--request-rates", help="comma-separated --request-rate values, e.g. 1,4,16")
    sweep.add_argument("--server-cmd", default=None,
                       help='start a server per setting, e.g. "hybridserve serve tiny --port {port} '
                            '--max-num-seqs {concurrency}"; {port} gets a free port')
    sweep.add_argument("--server-ready-timeout", type=float, default=900.0, help="seconds to wait for /health")
    sweep.add_argument("--output-dir", default="bench_results/sweep")
    sweep.add_argument("--slo-tpot-ms", type=float, default=None)
    sweep.add_argument("--slo-ttft-ms", type=float, default=None)
    sweep.add_argument("--slo-stat", choices=["mean", "median", "p99"], default="median",
                       help="which statistic the SLOs apply to")


def _run_serve(args) -> int:
    from hybridserve.bench.serve import main

    return main(args)


def _run_sweep(args) -> int:
    from hybridserve.bench.sweep import main

    return main(args)


def register(subparsers) -> None:
    """Add `bench serve` and `bench sweep` to the top-level CLI."""
    bench = subparsers.add_parser("bench", help="serving benchmarks")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    serve = commands.add_parser("serve", help="benchmark a running OpenAI-compatible server")
    add_serve_arguments(serve)
    serve.set_defaults(func=_run_serve)
    sweep = commands.add_parser("sweep", help="bench serve over several concurrencies or rates, with plots")
    add_serve_arguments(sweep)
    add_sweep_arguments(sweep)
    sweep.set_defaults(func=_run_sweep)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m hybridserve.bench.cli {serve,sweep} ...`."""
    parser = FlexibleArgumentParser(prog="hybridserve")
    register(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(["bench", *argv])
    args.command_line = shlex.join(["hybridserve", "bench", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
