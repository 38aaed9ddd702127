"""`hybridserve serve MODEL [flags]`: the OpenAI-compatible server.

Accepts `vllm serve` command lines: the settings flags are made from the config dataclasses
(`EngineConfig`, `ServeSettings`, `HubOptions`, `ServerOptions` below), vLLM's underscore spellings
work, and the flags that only exist for vLLM compatibility are in one table
(`hybridserve/compat_flags.py`) that says what each does. Before anything starts, every
configuration error (a refused flag, a model that cannot be found, a context longer than the
model's, a missing file, a port in use) is printed once and the exit status is 2.
Standalone: `python -m hybridserve.serve.cli MODEL [flags]`.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hybridserve.compat_flags import add_compat_flags, compat_effects, log_compat_effects
from hybridserve.config import ConfigError, EngineConfig, ModelConfig
from hybridserve.config_flags import FlexibleArgumentParser, add_config_flags, config_from_args
from hybridserve.hub import HubOptions, ModelNotFoundError, resolve
from hybridserve.serve.context import ServeSettings

logger = logging.getLogger("hybridserve.serve")


@dataclass(frozen=True)
class ServerOptions:
    """The serve command's own settings (the listener, files, where sampling defaults come from)."""

    host: str = "0.0.0.0"  # address to listen on
    port: int = 8000  # port to listen on (0: a free port, printed at start-up)
    uvicorn_log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "warning"  # uvicorn's own log level
    chat_template: str | None = None  # a Jinja chat template file to use instead of the model's
    generation_config: str = field(default="auto", metadata={"help": (
        "defaults for unset temperature / top_p / top_k: auto (the checkpoint's generation_config.json), "
        "vllm (none: 1.0 / 1.0 / off), or a directory with a generation_config.json")})


class StartupError(ValueError):
    """A configuration the server cannot start with; printed once, exit status 2."""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="checkpoint directory, Hugging Face hub id, or preset name (default: the tiny preset, "
                        "random weights)")
    p.add_argument("--model", help="same as the positional MODEL")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="name(s) clients use in `model`; the first is reported (default: MODEL)")
    add_config_flags(p.add_argument_group("server"), ServerOptions)
    add_config_flags(p.add_argument_group("model source"), HubOptions)
    add_config_flags(p.add_argument_group("engine"), EngineConfig)
    add_config_flags(p.add_argument_group("requests"), ServeSettings,
                     skip=("served_model_names", "max_num_seqs", "generation_defaults"))
    add_compat_flags(p, serve=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description=__doc__.split("\n\n")[0])
    add_serve_arguments(p)
    p.set_defaults(func=run)


@dataclass
class ServePlan:
    """Everything checked and resolved before the server starts."""

    config: EngineConfig
    model_config: ModelConfig
    settings: ServeSettings
    server: ServerOptions
    sock: socket.socket
    effects: list[str]
    random_weights: bool


def plan(args: argparse.Namespace) -> ServePlan:
    """Check the whole configuration and claim the port; StartupError says what is wrong."""
    from hybridserve.engine.model_runner import resolve_max_model_len
    from hybridserve.serve.sampling import load_generation_defaults

    if args.model and args.model_tag and args.model != args.model_tag:
        raise StartupError(f"the model is given twice ({args.model_tag} and --model {args.model})")
    name = args.model or args.model_tag or "tiny"
    try:
        effects = compat_effects(args)
        hub = config_from_args(HubOptions, args)
        server = config_from_args(ServerOptions, args)
        loads_weights = args.load_format == "auto"
        model_dir = resolve(name, hub, weights=loads_weights)
        tokenizer = resolve(args.tokenizer, hub, weights=False) if args.tokenizer else None
        names = args.served_model_name or [name]
        config = config_from_args(EngineConfig, args, model=model_dir, tokenizer=tokenizer,
                                  served_model_name=names[0])
        model_config = ModelConfig.from_hf(model_dir)
        resolve_max_model_len(config, model_config)
    except (ModelNotFoundError, ConfigError, ValueError) as e:
        raise StartupError(str(e)) from None
    if loads_weights and model_config.preset is None and not model_config.has_weights:
        raise StartupError(f"{name}: no *.safetensors weights in {model_dir} (--load-format dummy serves random "
                           "weights of this shape)")
    tokenizer_dir = Path(tokenizer or model_dir)
    if tokenizer_dir.is_dir() and not (tokenizer_dir / "tokenizer.json").is_file():
        raise StartupError(f"{tokenizer_dir}: no tokenizer.json (give --tokenizer a tokenizer directory or preset)")
    if server.chat_template and not Path(server.chat_template).is_file():
        raise StartupError(f"--chat-template {server.chat_template}: no such file")
    defaults_dir = {"auto": model_dir if Path(model_dir).is_dir() else None, "vllm": None}.get(
        server.generation_config, server.generation_config)
    if defaults_dir is not None and server.generation_config not in ("auto", "vllm") and not (
            Path(defaults_dir) / "generation_config.json").is_file():
        raise StartupError(f"--generation-config {defaults_dir}: no generation_config.json there")
    settings = config_from_args(ServeSettings, args, served_model_names=names,
                                max_num_seqs=config.max_num_seqs,
                                generation_defaults=load_generation_defaults(defaults_dir))
    return ServePlan(config, model_config, settings, server, listen_socket(server.host, server.port), effects,
                     random_weights=not loads_weights or model_config.preset is not None)


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now: a port in use is a start-up error, and port 0 gets its real number."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _log_startup(p: ServePlan, model_given: bool) -> None:
    if p.random_weights:
        what = "no model given: the embedded 'tiny' preset" if not model_given else p.config.model
        logger.info("%s: serving RANDOM weights (a preset or --load-format %s): output is noise", what,
                    p.config.load_format)
    log_compat_effects(p.effects)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from hybridserve.serve.app import build_app
    from hybridserve.serve.server import DrainingServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        p = plan(args)
    except StartupError as e:
        logger.error("%s", e)
        return 2
    _log_startup(p, model_given=bool(args.model or args.model_tag))
    config, template = p.config, p.server.chat_template

    async def create_engine():
        from hybridserve.engine.client import EngineClient

        engine = await EngineClient.create(config)
        if template:
            engine.tokenizer.chat_template = Path(template).read_text()
        return engine

    holder: dict[str, DrainingServer] = {}
    app = build_app(p.settings, engine_factory=create_engine,
                    on_engine_failure=lambda e: holder["server"].engine_failed(e))
    uv_config = uvicorn.Config(app, log_level=p.server.uvicorn_log_level, timeout_graceful_shutdown=5,
                               timeout_keep_alive=5)
    server = holder["server"] = DrainingServer(uv_config, app.state.ctx, p.settings.shutdown_timeout)
    host, port = p.sock.getsockname()[:2]
    names = p.settings.served_model_names
    logger.info("listening on http://%s:%d (model name%s: %s)", host, port, "s" if len(names) > 1 else "",
                ", ".join(names))
    server.run(sockets=[p.sock])
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = FlexibleArgumentParser(prog="hybridserve serve", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
