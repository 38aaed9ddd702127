"""`hybridserve serve`: the recipe's flags parse; a real server process drains on SIGTERM and exits 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from hybridserve.bench.sweep import free_port
from hybridserve.cli import build_parser
from hybridserve.serve.cli import engine_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ("serve nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8 --host 0.0.0.0 --port 8000 --served-model-name nano "
          "--max-num-seqs 8 --max-model-len 262144 --max-num-batched-tokens 8192 --tensor-parallel-size 1 "
          "--gpu-memory-utilization 0.85 --kv-cache-dtype fp8 --mamba-ssm-cache-dtype float32 --trust-remote-code "
          "--async-scheduling --enable-auto-tool-choice --tool-call-parser qwen3_coder "
          "--reasoning-parser-plugin nano_v3_reasoning_parser.py --reasoning-parser nano_v3 --api-key k "
          "--load-format dummy --max-queued-requests 10 --shutdown-timeout 5 --default-max-tokens 1000 "
          "--default-thinking-budget 64 --enforce-eager --seed 3 --dtype bfloat16 --device cpu").split()


def test_recipe_flags_parse():
    args = build_parser().parse_args(RECIPE)
    assert args.func.__module__ == "hybridserve.serve.cli"
    assert args.model_tag == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8"
    assert args.served_model_name == ["nano"] and args.max_model_len == 262144
    args.model = args.model_tag
    cfg = engine_config(args)
    assert (cfg.kv_cache_dtype, cfg.max_num_seqs, cfg.gpu_memory_utilization) == ("fp8", 8, 0.85)
    assert (cfg.load_format, cfg.dtype, cfg.device, cfg.seed, cfg.enforce_eager) == ("dummy", "bfloat16", "cpu", 3, True)


@pytest.mark.parametrize("alias", ["nano_v3", "nemotron_v3", "nemotron_3"])
def test_reasoning_parser_aliases(alias):
    assert build_parser().parse_args(["serve", "--reasoning-parser", alias]).reasoning_parser == alias


@pytest.mark.parametrize("argv", [["serve", "--no-such-flag"], ["serve", "--reasoning-parser", "deepseek_r1"],
                                  ["serve", "--tool-call-parser", "hermes"], ["serve", "--kv-cache-dtype", "int4"]])
def test_bad_flags_are_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_max_model_len_suffix():
    assert build_parser().parse_args(["serve", "--max-model-len", "32k"]).max_model_len == 32768


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
        chunks: list[dict] = []

        def stream():
            body = {"prompt": "Once", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                chunks.extend(json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {"))

        t = threading.Thread(target=stream)
        t.start()
        while not chunks and t.is_alive():
            time.sleep(0.02)
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
    assert "RANDOM weights" in "".join(log) and "built in" in "".join(log)
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
