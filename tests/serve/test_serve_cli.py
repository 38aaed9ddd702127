"""`hybridserve serve`: flags made from the configs, vLLM's spellings and compatibility flags, start-up
checks before listening, and a real server process that drains on SIGTERM and Ctrl-C and exits 0."""

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import httpx
import psutil
import pytest

from hybridserve.bench.sweep import free_port
from hybridserve.cli import build_parser
from hybridserve.compat_flags import compat_effects
from hybridserve.config import EngineConfig
from hybridserve.config_flags import (
    FlexibleArgumentParser,
    add_config_flags,
    config_from_args,
    option_strings,
)
from hybridserve.hub import HubOptions
from hybridserve.serve.cli import main as serve_main
from hybridserve.serve.cli import plan
from hybridserve.serve.context import ServeSettings
from tests.serve.helpers import start_stream

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ("serve nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8 --host 0.0.0.0 --port 8000 --served-model-name nano "
          "--max-num-seqs 8 --max-model-len 262144 --max-num-batched-tokens 8192 --tensor-parallel-size 1 "
          "--gpu-memory-utilization 0.85 --kv-cache-dtype fp8 --mamba-ssm-cache-dtype float32 --trust-remote-code "
          "--async-scheduling --enable-auto-tool-choice --tool-call-parser qwen3_coder "
          "--reasoning-parser-plugin nano_v3_reasoning_parser.py --reasoning-parser nano_v3 --api-key k "
          "--load-format dummy --max-queued-requests 10 --shutdown-timeout 5 --default-max-tokens 1000 "
          "--default-thinking-budget 64 --enforce-eager --seed 3 --dtype bfloat16 --device cpu").split()


def _args(argv):
    args = build_parser().parse_args(argv)
    assert args.func.__module__ == "hybridserve.serve.cli"
    return args


def test_recipe_flags_parse():
    args = _args(RECIPE)
    assert args.model_tag == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8"
    assert args.served_model_name == ["nano"] and args.max_model_len == 262144
    cfg = config_from_args(EngineConfig, args, model="tiny")
    assert (cfg.kv_cache_dtype, cfg.max_num_seqs, cfg.gpu_memory_utilization) == ("fp8", 8, 0.85)
    assert (cfg.load_format, cfg.dtype, cfg.device, cfg.seed, cfg.enforce_eager) == ("dummy", "bfloat16", "cpu", 3, True)
    settings = config_from_args(ServeSettings, args, served_model_names=["nano"], max_num_seqs=8,
                                generation_defaults={})
    assert (settings.api_key, settings.max_queued_requests, settings.default_thinking_budget) == ("k", 10, 64)


def test_flags_are_made_from_the_config_fields_with_their_defaults():
    """Every EngineConfig / ServeSettings / HubOptions field with a flag defaults to the field's default."""
    args = _args(["serve"])
    for cls, skip in ((EngineConfig, {"model", "served_model_name"}), (HubOptions, set()),
                      (ServeSettings, {"served_model_names", "max_num_seqs", "generation_defaults", "api_key"})):
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                assert getattr(args, f.name) == f.default, f.name


def test_a_field_added_to_a_config_gets_its_flag():
    @dataclasses.dataclass(frozen=True)
    class Later:
        speculative_tokens: int = 0  # draft tokens per step
        headroom: float = 0.1  # memory kept free (10% by default)
        overlap: bool = True
        mode: typing.Literal["a", "b"] = "a"
        hidden: int = dataclasses.field(default=1, metadata={"flag": False})

    parser = FlexibleArgumentParser()
    add_config_flags(parser, Later)
    args = parser.parse_args(["--speculative_tokens", "3", "--no-overlap", "--mode", "b"])
    assert config_from_args(Later, args) == Later(speculative_tokens=3, overlap=False, mode="b")
    assert "draft tokens per step (default: 0)" in parser.format_help()
    assert "memory kept free (10% by default) (default: 0.1)" in parser.format_help()  # a % is text, not a format
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--hidden", "2"])


@pytest.mark.parametrize("command", [["serve"], ["generate"], ["bench", "serve"], ["bench", "sweep"]])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0 and "--help" in capsys.readouterr().out


def test_vllm_underscore_spellings_and_compat_flags_parse():
    args = _args(["serve", "--mamba_ssm_cache_dtype", "float16", "--max_model_len=4k", "--no-enable-prefix-caching",
                  "--generation_config", "vllm", "--enable-log-requests", "--disable-log-requests",
                  "--tokenizer-mode", "auto", "--data-parallel-size", "1", "--max-cudagraph-capture-size", "256",
                  "--kv-cache-dtype", "fp8_e4m3", "--trust_remote_code", "--async-scheduling",
                  "--enable-chunked-prefill", "--reasoning-parser", "nemotron_v3", "-tp", "1"])
    assert (args.mamba_ssm_cache_dtype, args.max_model_len, args.generation_config) == ("float16", 4096, "vllm")
    assert args.enable_log_requests is True and args.kv_cache_dtype == "fp8_e4m3"
    assert args.enable_prefix_caching is False  # a real setting now, not a compatibility flag
    assert _args(["serve"]).enable_prefix_caching is True
    effects = compat_effects(args)
    assert not any("prefix" in e for e in effects)
    assert args.max_cudagraph_capture_size == 256  # a real engine setting
    assert not any(e.startswith(("--max-cudagraph-capture-size", "--async-scheduling")) for e in effects)
    assert any(e.startswith("--trust-remote-code: no effect") for e in effects)
    assert compat_effects(_args(["serve", "--no-disable-log-stats"]))[0].startswith("--no-disable-log-stats: no effect")


@pytest.mark.parametrize("flag,reason", [
    (["--tokenizer-mode", "slow"], "only the fast tokenizer"),
    (["--data-parallel-size", "2"], "one server per GPU behind a router"),
    (["--no-enable-chunked-prefill"], "prefill is always chunked"),
    (["--tool-call-parser", "hermes"], "only the Nemotron tool-call format"),
    (["--reasoning-parser", "deepseek_r1"], "only the Nemotron reasoning parser"),
])
def test_refused_flags_say_why(flag, reason):
    with pytest.raises(ValueError, match=reason):
        compat_effects(_args(["serve", *flag]))


@pytest.mark.parametrize("argv", [["serve", "--no-such-flag"], ["serve", "--kv-cache-dtype", "int4"],
                                  ["serve", "--quantization", "awq"],
                                  ["serve", "--max-model-len", "0"], ["serve", "--load-format", "pt"]])
def test_bad_flags_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_max_model_len_suffix():
    assert build_parser().parse_args(["serve", "--max-model-len", "32k"]).max_model_len == 32768


def test_docs_table_lists_every_serve_flag():
    """docs/serving.md has one flag table; every flag of `serve` (generated or compatibility) is in it."""
    table = (ROOT / "docs" / "serving.md").read_text().split("## Flags", 1)[1].split("\n## ", 1)[0]
    parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    missing = [s for s in option_strings(parser) if s.startswith("--") and f"`{s}" not in table
               and s not in ("--help",) and not s.startswith("--no-")]
    assert not missing, f"document these flags in the docs/serving.md flag table: {missing}"


@pytest.mark.parametrize("extra,message", [
    (["--max-model-len", "1M"], "exceeds the model's limit"),
    (["/nonexistent/checkpoint"], "/nonexistent/checkpoint: no such directory"),
    (["nvidia/not-in-the-cache"], "not in the Hugging Face cache"),
    (["--chat-template", "/nonexistent.jinja"], "--chat-template /nonexistent.jinja: no such file"),
    (["--tokenizer-mode", "slow"], "only the fast tokenizer"),
    (["--generation-config", "/"], "no generation_config.json there"),
])
def test_configuration_errors_stop_before_listening_with_status_2(extra, message, caplog, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    caplog.set_level(logging.INFO)
    assert serve_main(["--device", "cpu", "--port", "0", "--download-dir", str(tmp_path), *extra]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], errors
    assert not any("listening on" in r.getMessage() for r in caplog.records)


def test_a_port_in_use_is_a_startup_error(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_main(["--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_port_zero_gets_a_real_port():
    args = _args(["serve", "--device", "cpu", "--host", "127.0.0.1", "--port", "0"])
    p = plan(args)
    try:
        host, port = p.sock.getsockname()
        assert host == "127.0.0.1" and port > 0 and p.random_weights
    finally:
        p.sock.close()


def test_real_server_process_drains_on_sigterm_and_exits_zero():
    """SIGTERM: readiness drops at once, the running request is aborted after --shutdown-timeout, exit 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hybridserve", "serve", "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
         "--max-num-seqs", "4", "--max-model-len", "4096", "--shutdown-timeout", "2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "".join(log)
            assert time.monotonic() < deadline, "server not ready: " + "".join(log)
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the engine core should run in its own process"
        t, chunks = start_stream(url, {"prompt": "Once", "max_tokens": 4000, "ignore_eos": True})
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        t.join(120)
        assert proc.wait(60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
    # still generating after the 2 s drain window: aborted, and the client is told so
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert 0 < sum(len(c["choices"]) for c in chunks) < 4000
    assert "RANDOM weights" in "".join(log)
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
