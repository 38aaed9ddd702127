"""`bench serve` against the real `hybridserve serve` (tiny preset, CPU), started as a subprocess."""

from __future__ import annotations

import json
import sys

import pytest
from bench_cli import run_cli

from hybridserve.bench.sweep import ManagedServer, free_port

try:
    import hybridserve.serve.app  # noqa: F401

    SERVER_MISSING = ""
except ImportError as e:
    SERVER_MISSING = f"hybridserve.serve.app cannot be imported yet ({e}); the lead enables this test"


@pytest.mark.skipif(bool(SERVER_MISSING), reason=SERVER_MISSING)
def test_bench_serve_against_hybridserve_tiny(tmp_path, capsys):
    port = free_port()
    command = f"{sys.executable} -m hybridserve.cli serve tiny --host 127.0.0.1 --port {port}"
    server = ManagedServer(command, f"http://127.0.0.1:{port}", tmp_path / "server.log", 300, stop_grace_s=10)
    with server:
        code, out, err = run_cli(
            ["serve", "--port", str(port), "--tokenizer", "tiny", "--num-prompts", "4",
             "--random-input-len", "16", "--random-output-len", "6", "--ignore-eos", "--max-concurrency", "2",
             "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
             "--result-filename", "r.json"],
            capsys,
        )  # fmt: skip
    assert code == 0, err + out
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["output_lens"] == [6] * 4  # from the server's usage chunks
    assert result["total_output_tokens"] == 24
    assert result["input_lens"] == [16] * 4  # the server counts the prompt as the client built it
    assert all(len(itl) == 5 for itl in result["itls"])  # one SSE chunk per token
    assert result["server_model"]["id"] == "tiny"
    # the server's side of the run from its /metrics: every request's first token, within the client's TTFT
    assert 0 < result["server_mean_queue_time_ms"] <= result["server_mean_ttft_ms"] <= result["mean_ttft_ms"]
    assert result["engine_steps"] >= 6 and result["engine_mean_tokens_per_step"] > 0  # a prefill and 5 decodes at least
    assert "Server mean TTFT (from its arrival)" in out and "Engine steps:" in out
    assert server.process is None  # stopped
