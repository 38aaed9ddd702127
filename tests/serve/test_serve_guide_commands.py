"""The deployment guide's serve and bench commands, with `vllm` replaced by `hybridserve`, against a
local Hugging Face cache that holds a tiny NemotronH checkpoint under the guide's model id.

Serve: `VLLM_USE_FLASHINFER_MOE_FP8=1 VLLM_FLASHINFER_MOE_BACKEND=throughput hybridserve serve
nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8 --trust-remote-code --async-scheduling --kv-cache-dtype fp8
--tensor-parallel-size 1` (plus `--port 0`: tests share the machine). Bench: the guide's flags
(`--dataset-name random --random-input-len --random-output-len --num-warmups --ignore-eos
--max-concurrency --num-prompts`) with smaller values, so a CPU runs it in seconds; no `--model`
and no `--tokenizer`, so the client asks the server for the model and loads the tokenizer from the
hub cache by its id, as `vllm bench serve` does. The server is stopped with Ctrl-C (SIGINT to its
process group, as a terminal sends it): it exits 0 without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hybridserve.config import ModelConfig
from hybridserve.model.loader import load_model, save_checkpoint
from hybridserve.tokenizer import load_tokenizer
from tests.serve.helpers import start_stream

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-FP8"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hf_cache(root: Path) -> Path:
    """The hub cache layout huggingface_hub reads: refs/main -> snapshots/<commit>/files."""
    repo = root / ("models--" + MODEL_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    save_checkpoint(load_model(ModelConfig.from_hf("tiny"), "dummy", seed=5), repo / "snapshots" / COMMIT,
                    tokenizer=load_tokenizer("tiny"))
    return root


class Server:
    """`hybridserve serve ...` as its own process group, its log collected."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "hybridserve", *argv], cwd=ROOT, env=env,
                                     stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while True:
            assert self.proc.poll() is None, self.log
            assert time.monotonic() < deadline, "server not ready:\n" + self.log
            if url is None and (m := re.search(r"listening on (http://\S+:\d+)", self.log)):
                url = m.group(1)
            if url is not None:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.2)

    def ctrl_c(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    cache = hf_cache(tmp_path_factory.mktemp("hf-cache"))
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "VLLM_USE_FLASHINFER_MOE_FP8": "1", "VLLM_FLASHINFER_MOE_BACKEND": "throughput"}


def test_guide_serve_and_bench_commands_against_a_local_hub_cache(hub_env, tmp_path):
    server = Server(["serve", MODEL_ID, "--trust-remote-code", "--async-scheduling", "--kv-cache-dtype", "fp8",
                     "--tensor-parallel-size", "1", "--port", "0", "--host", "127.0.0.1",
                     "--max-model-len", "512"], hub_env)
    try:
        url = server.wait_ready()
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == MODEL_ID
        port = url.rsplit(":", 1)[1]
        bench = subprocess.run(
            [sys.executable, "-m", "hybridserve", "bench", "serve", "--port", port, "--dataset-name", "random",
             "--random-input-len", "24", "--random-output-len", "6", "--num-warmups", "2", "--ignore-eos",
             "--max-concurrency", "4", "--num-prompts", "8", "--disable-tqdm", "--save-result",
             "--result-dir", str(tmp_path), "--result-filename", "guide.json"],
            cwd=ROOT, env=hub_env, capture_output=True, text=True, timeout=300)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        result = json.loads((tmp_path / "guide.json").read_text())
        assert (result["completed"], result["failed"]) == (8, 0)
        assert result["total_output_tokens"] == 8 * 6 and result["total_input_tokens"] == 8 * 24
        assert result["model_id"] == result["tokenizer_id"] == MODEL_ID
        assert server.ctrl_c() == 0, server.log
    finally:
        server.kill()
    log = server.log
    assert "RANDOM weights" not in log  # the cached checkpoint's own weights were served
    assert "loading weights" in log  # with a progress bar
    assert "vLLM compatibility flag --trust-remote-code: no effect" in log
    assert "vLLM compatibility flag --async-scheduling" not in log  # a real engine setting now
    assert "Traceback" not in log, log


def test_ctrl_c_drains_in_flight_requests(hub_env):
    """SIGINT to the process group drains like SIGTERM: the running stream finishes normally (no 500,
    no dead engine), new requests get 503 meanwhile, exit status 0, and no traceback."""
    server = Server(["serve", "--port", "0", "--host", "127.0.0.1", "--device", "cpu", "--max-model-len", "4096",
                     "--shutdown-timeout", "60"], hub_env)
    try:
        url = server.wait_ready()
        t, chunks = start_stream(url, {"prompt": "Once", "max_tokens": 1000, "ignore_eos": True})
        os.killpg(server.proc.pid, signal.SIGINT)
        time.sleep(0.3)
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 503
        t.join(120)
        assert server.proc.wait(60) == 0, server.log
    finally:
        server.kill()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"]) == 1000
    assert "Traceback" not in server.log and "EngineDeadError" not in server.log, server.log
