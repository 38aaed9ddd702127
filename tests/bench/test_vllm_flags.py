"""`bench serve` takes `vllm bench serve`'s flags with their meaning (fake streaming server)."""

from __future__ import annotations

import json

from bench_cli import run_cli
from test_serve_e2e import serve_argv

from hybridserve.bench.sweep import free_port


def test_backend_vllm_headers_sampling_and_append_result(fake_server, tokenizer_dir, tmp_path, capsys):
    """--backend vllm is streaming completions; --header reaches every request (x-request-id stays the
    request's own); --logprobs and penalties are sent; --append-result adds one JSON line per run."""
    with fake_server() as server:
        argv = ["serve", "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir), "--disable-tqdm",
                "--result-dir", str(tmp_path), "--result-filename", "r.json", "--append-result",
                "--backend", "vllm", "--header", "x-team=bench", "x-request-id=ignored", "--logprobs", "2",
                "--repetition-penalty", "1.1", "--trust-remote-code", "--tokenizer-mode", "auto",
                "--num-prompts", "3", "--random-input-len", "12", "--random-output-len", "4"]
        for _ in range(2):
            code, _, err = run_cli(argv, capsys)
            assert code == 0, err
        record = server.record
    assert set(record.routes) == {"/v1/completions"}
    assert all(p["stream"] and p["logprobs"] == 2 and p["repetition_penalty"] == 1.1 for p in record.payloads)
    assert all(h["x-team"] == "bench" for h in record.headers)
    assert all(rid != "ignored" for rid in record.request_ids)
    runs = [json.loads(line) for line in (tmp_path / "r.json").read_text().splitlines()]
    assert [r["backend"] for r in runs] == ["vllm", "vllm"] and all(r["completed"] == 3 for r in runs)


def test_ready_check_sends_a_test_request_first(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server() as server:
        code, out, err = run_cli(serve_argv(server, tokenizer_dir, tmp_path, "--ready-check-timeout-sec", "30",
                                            "--num-prompts", "2", "--random-input-len", "8",
                                            "--random-output-len", "3"), capsys)
        ids = server.record.request_ids
    assert code == 0, err
    assert ids[0].endswith("-ready") and len(ids) == 3 and "answered the test request" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 2  # the test request is not measured


def test_ready_check_gives_up_after_its_timeout(tokenizer_dir, capsys):
    code, _, err = run_cli(["serve", "--port", str(free_port()), "--tokenizer", str(tokenizer_dir),
                            "--ready-check-timeout-sec", "2", "--num-prompts", "1"], capsys)
    assert code == 2 and "cannot reach the server" in err


def test_skip_tokenizer_init_counts_with_the_server(fake_server, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) for i in range(4)))
    with fake_server() as server:
        code, _, err = run_cli(["serve", "--base-url", server.base_url, "--skip-tokenizer-init", "--disable-tqdm",
                                "--dataset-name", "custom", "--dataset-path", str(data),
                                "--custom-skip-chat-template", "--custom-output-len", "5", "--num-prompts", "4", "--ignore-eos",
                                "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"],
                               capsys)
        record = server.record
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["total_input_tokens"] == sum(record.prompt_tokens) == 12  # from the server's usage
    assert result["total_output_tokens"] == 20
    code, _, err = run_cli(["serve", "--base-url", "http://127.0.0.1:1", "--skip-tokenizer-init"], capsys)
    assert code == 2


def test_skip_tokenizer_init_refuses_the_random_dataset(fake_server, capsys):
    with fake_server() as server:
        code, _, err = run_cli(["serve", "--base-url", server.base_url, "--skip-tokenizer-init"], capsys)
    assert code == 2 and "--skip-tokenizer-init: the random dataset builds prompts of exact token lengths" in err


def test_unsupported_tokenizer_mode_is_refused(fake_server, tokenizer_dir, capsys):
    with fake_server() as server:
        code, _, err = run_cli(["serve", "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir),
                                "--tokenizer-mode", "mistral"], capsys)
    assert code == 2 and "--tokenizer-mode mistral: not supported" in err


def test_underscore_spellings(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server() as server:
        code, _, err = run_cli(serve_argv(server, tokenizer_dir, tmp_path, "--num_prompts", "2",
                                          "--random_input_len=8", "--random-output-len", "2"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["num_prompts"] == 2
