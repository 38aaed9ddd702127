"""`hybridserve serve MODEL_OR_PRESET [flags]`: the OpenAI-compatible server.

Accepts the flags of `vllm serve` that NVIDIA's Nemotron recipe uses, with the same meaning, so the
recipe's command works with the program name changed. Parser flags are accepted for compatibility;
the right reasoning and tool parsers are built in. Unknown flags are an error.
Standalone: `python -m hybridserve.serve.cli MODEL [flags]`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hybridserve.config import LOAD_FORMATS

logger = logging.getLogger("hybridserve.serve")

REASONING_PARSERS = ("nano_v3", "nemotron_v3", "nemotron_3")
TOOL_CALL_PARSERS = ("qwen3_coder",)


def _token_count(text: str) -> int:
    """An integer, optionally with a k / m suffix (1024-based, as vLLM reads `--max-model-len 32k`)."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1]) * scale) if scale > 1 else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", metavar="MODEL_OR_PRESET",
                   help="checkpoint directory or preset name (default: the tiny preset, random weights)")
    p.add_argument("--model", help="same as the positional MODEL_OR_PRESET")
    p.add_argument("--tokenizer", help="tokenizer directory or preset (default: the model's)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", help="name(s) clients use in `model` (first is reported)")
    p.add_argument("--api-key", default=os.environ.get("HYBRIDSERVE_API_KEY") or os.environ.get("VLLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every endpoint except /health, /ping, /metrics")
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=_token_count, help="context limit in tokens (e.g. 8192, 32k)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="max concurrent running sequences")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per engine step")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    g.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"), default="auto")
    g.add_argument("--mamba-ssm-cache-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    g.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    g.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g = p.add_argument_group("requests")
    g.add_argument("--max-queued-requests", "--max-num-queued-reqs", type=int, default=2048,
                   help="requests allowed to wait beyond --max-num-seqs; more get 503 + Retry-After "
                        "(-1: unbounded)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may finish before they are aborted")
    g.add_argument("--default-max-tokens", type=int, default=8192,
                   help="output cap when a request sets no max_tokens (also capped by the context left)")
    g.add_argument("--default-thinking-budget", type=int, default=None,
                   help="reasoning-token budget for requests that set none (default: unlimited)")
    g.add_argument("--chat-template", help="a Jinja chat template file to use instead of the model's")
    g = p.add_argument_group("vLLM compatibility (parsers are built in)")
    g.add_argument("--enable-auto-tool-choice", action="store_true", help="accepted; auto tool choice is always on")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default="qwen3_coder")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default="nano_v3")
    g.add_argument("--reasoning-parser-plugin", metavar="FILE", help="accepted and ignored (built in)")
    g.add_argument("--tool-parser-plugin", metavar="FILE", help="accepted and ignored (built in)")
    g.add_argument("--trust-remote-code", action="store_true", help="accepted; no remote code is run")
    g.add_argument("--async-scheduling", action="store_true", help="accepted; scheduling is always overlapped")
    g.add_argument("--uvicorn-log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description=__doc__.split("\n\n")[0])
    add_serve_arguments(p)
    p.set_defaults(func=run)


def engine_config(args: argparse.Namespace):
    from hybridserve.config import EngineConfig

    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer,
        served_model_name=(args.served_model_name or [None])[0], load_format=args.load_format,
        dtype=args.dtype, device=args.device, seed=args.seed, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
        mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size)


def _log_startup(args: argparse.Namespace, model_given: bool) -> None:
    if not model_given:
        logger.info("no model given: serving the embedded 'tiny' preset with RANDOM weights (output is noise)")
    elif not Path(args.model).is_dir() or args.load_format != "auto":
        logger.info("%s: no checkpoint weights are loaded (preset or --load-format dummy): RANDOM weights",
                    args.model)
    logger.info("reasoning parser %s and tool-call parser %s are built in; --reasoning-parser-plugin / "
                "--tool-parser-plugin are not needed and are ignored", args.reasoning_parser, args.tool_call_parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from hybridserve.serve.app import build_app
    from hybridserve.serve.context import ServeSettings
    from hybridserve.serve.sampling import load_generation_defaults
    from hybridserve.serve.server import DrainingServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model and args.model_tag and args.model != args.model_tag:
        logger.error("the model is given twice (%s and --model %s)", args.model_tag, args.model)
        return 2
    model_given = bool(args.model or args.model_tag)
    args.model = args.model or args.model_tag or "tiny"
    if args.chat_template and not Path(args.chat_template).is_file():
        logger.error("--chat-template %s: no such file", args.chat_template)
        return 2
    try:
        config = engine_config(args)
    except ValueError as e:
        logger.error("invalid configuration: %s", e)
        return 2
    _log_startup(args, model_given)
    names = args.served_model_name or [args.model]
    settings = ServeSettings(
        served_model_names=names, api_key=args.api_key, default_max_tokens=args.default_max_tokens,
        default_thinking_budget=args.default_thinking_budget, max_num_seqs=args.max_num_seqs,
        max_queued_requests=None if args.max_queued_requests < 0 else args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout,
        generation_defaults=load_generation_defaults(args.model if Path(args.model).is_dir() else None))

    async def create_engine():
        from hybridserve.engine.client import EngineClient

        engine = await EngineClient.create(config)
        if args.chat_template:
            engine.tokenizer.chat_template = Path(args.chat_template).read_text()
        return engine

    holder: dict[str, DrainingServer] = {}
    app = build_app(settings, engine_factory=create_engine,
                    on_engine_failure=lambda e: holder["server"].engine_failed(e))
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                               timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server = holder["server"] = DrainingServer(uv_config, app.state.ctx, args.shutdown_timeout)
    logger.info("listening on http://%s:%d (model name%s: %s)", args.host, args.port,
                "s" if len(names) > 1 else "", ", ".join(names))
    server.run()
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridserve serve", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
