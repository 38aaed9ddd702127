"""`bench serve` end to end against the fake streaming server: counts, flags and failures."""

from __future__ import annotations

import json
import re

from bench_cli import run_cli

from hybridserve.bench.sweep import free_port


def serve_argv(server, tokenizer_dir, tmp_path, *extra) -> list[str]:
    return [
        "serve", "--base-url", server.base_url, "--tokenizer", str(tokenizer_dir), "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "r.json",
        *extra,
    ]  # fmt: skip


def load_result(tmp_path) -> dict:
    return json.loads((tmp_path / "r.json").read_text())


def report_value(stdout: str, label: str) -> float:
    return float(re.search(rf"^{re.escape(label)}\s+(\S+)", stdout, re.M).group(1))


def test_random_ignore_eos_counts_match_the_server(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(eos_after=3) as server:
        code, out, err = run_cli(
            serve_argv(server, tokenizer_dir, tmp_path, "--num-prompts", "12", "--random-input-len", "20",
                       "--random-output-len", "9", "--ignore-eos", "--max-concurrency", "4", "--num-warmups", "2"),
            capsys,
        )  # fmt: skip
        record = server.record
    assert code == 0, err
    result = load_result(tmp_path)
    # what the server generated (12 timed + 2 warmups) vs what the report counts (the 12 only)
    assert len(record.completion_tokens) == 14
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["output_lens"] == [9] * 12  # --ignore-eos: exactly --random-output-len each
    assert result["total_output_tokens"] == sum(record.completion_tokens[2:]) == 108
    assert result["input_lens"] == [20] * 12
    assert result["total_input_tokens"] == sum(record.prompt_tokens[2:]) == 240
    assert report_value(out, "Total generated tokens:") == 108
    assert report_value(out, "Total input tokens:") == 240
    assert report_value(out, "Successful requests:") == 12
    # one message per token: 8 gaps per request, and the payload vLLM sends
    assert all(len(itl) == 8 for itl in result["itls"])
    assert all(p["max_tokens"] == 9 and p["ignore_eos"] and p["stream_options"] == {"include_usage": True}
               for p in record.payloads)  # fmt: skip
    assert len(set(record.request_ids)) == 14 and all(record.request_ids)  # unique x-request-id
    # the client never ran more than 4 at once, and its exact peak agrees
    assert record.max_inflight <= 4 and 1 <= result["max_concurrent_requests"] <= 4
    assert result["output_throughput"] == result["total_output_tokens"] / result["duration"]
    assert result["model_id"] == "fake-model" and result["server_model"]["id"] == "fake-model"
    assert "--random-output-len 9" in result["command"]
    assert re.fullmatch(r"\d{8}-\d{6}", result["date"])
    assert {"mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_client_queue_time_ms"} <= result.keys()


def test_eos_stops_early_without_ignore_eos(fake_server, tokenizer_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(5)))
    common = ["--dataset-name", "custom", "--dataset-path", str(prompts), "--num-prompts", "5",
              "--custom-output-len", "7", "--backend", "openai-chat"]  # fmt: skip
    with fake_server(eos_after=3) as server:
        code, _, err = run_cli(serve_argv(server, tokenizer_dir, tmp_path, *common), capsys)
        assert code == 0, err
        assert load_result(tmp_path)["output_lens"] == [3] * 5  # the server's usage, not the budget
        code, _, err = run_cli(serve_argv(server, tokenizer_dir, tmp_path, *common, "--ignore-eos"), capsys)
        assert code == 0, err
        result = load_result(tmp_path)
        assert result["output_lens"] == [7] * 5
        assert result["total_input_tokens"] == 15
        assert all(p["max_completion_tokens"] == 7 and "messages" in p for p in server.record.payloads)


def test_request_rate_spreads_arrivals(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server() as server:
        code, out, err = run_cli(
            serve_argv(server, tokenizer_dir, tmp_path, "--num-prompts", "10", "--random-input-len", "8",
                       "--random-output-len", "3", "--request-rate", "40", "--seed", "3"),
            capsys,
        )  # fmt: skip
    assert code == 0, err
    result = load_result(tmp_path)
    assert result["request_rate"] == 40.0 and result["burstiness"] == 1.0
    assert result["duration"] >= 10 / 40  # the last request leaves at exactly N / rate
    starts = sorted(result["start_times"])
    assert starts[-1] - starts[0] >= 0.2
    assert "Request rate configured (RPS):" in out


def test_server_tokenizer_mismatch_realigns_prompts(fake_server, tokenizer_dir, tmp_path, capsys):
    args = ["--num-prompts", "3", "--random-input-len", "10", "--random-output-len", "2"]
    with fake_server(tokenize_extra=1) as server:
        code, out, _ = run_cli(serve_argv(server, tokenizer_dir, tmp_path, *args), capsys)
        assert code == 0
        assert "tokenizer mismatch" in out
        # re-truncated to 10 server tokens, one of which is the extra: 9 prompt words arrive
        assert server.record.prompt_tokens == [9, 9, 9]
    with fake_server(has_tokenize=False) as server:
        code, out, _ = run_cli(serve_argv(server, tokenizer_dir, tmp_path, *args), capsys)
        assert code == 0
        assert "could not check prompt lengths" in out
        assert server.record.prompt_tokens == [10, 10, 10]


def assert_clean_failure(code: int, out: str, err: str, expected: str) -> None:
    assert code != 0
    assert expected in err
    assert "Traceback" not in out + err


def test_unreachable_server(tokenizer_dir, tmp_path, capsys):
    port = free_port()  # nothing listens there
    code, out, err = run_cli(["serve", "--port", str(port), "--tokenizer", str(tokenizer_dir), "--num-prompts", "2"], capsys)
    assert_clean_failure(code, out, err, "cannot reach the server")
    assert "Serving Benchmark Result" not in out


def test_wrong_model_name_fails_before_sending(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server() as server:
        code, out, err = run_cli(serve_argv(server, tokenizer_dir, tmp_path, "--model", "nope", "--num-prompts", "2"), capsys)
        assert server.record.payloads == []
    assert_clean_failure(code, out, err, "model 'nope' is not served")
    assert "fake-model" in err


def test_wrong_model_404_per_request_is_reported_as_failure(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(list_models=False) as server:
        code, out, err = run_cli(
            serve_argv(server, tokenizer_dir, tmp_path, "--model", "nope", "--num-prompts", "3",
                       "--random-input-len", "8", "--random-output-len", "2"),
            capsys,
        )  # fmt: skip
    assert_clean_failure(code, out, err, "3 of 3 requests failed")
    assert report_value(out, "Successful requests:") == 0
    assert report_value(out, "Failed requests:") == 3
    assert "HTTP 404: The model `nope` does not exist." in out
    assert load_result(tmp_path)["failed"] == 3


def test_error_frame_mid_stream_fails_the_request(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(fail_after_tokens=2) as server:
        code, out, err = run_cli(
            serve_argv(server, tokenizer_dir, tmp_path, "--num-prompts", "4", "--random-input-len", "8",
                       "--random-output-len", "5"),
            capsys,
        )  # fmt: skip
    assert_clean_failure(code, out, err, "4 of 4 requests failed")
    assert "server error mid-stream: boom: engine died" in out
    assert load_result(tmp_path)["total_output_tokens"] == 0


def test_partial_failures_are_counted_not_dropped(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(fail_every_other=True) as server:
        code, out, err = run_cli(
            serve_argv(server, tokenizer_dir, tmp_path, "--num-prompts", "6", "--random-input-len", "8",
                       "--random-output-len", "4", "--max-concurrency", "1"),
            capsys,
        )  # fmt: skip
        record = server.record
    assert_clean_failure(code, out, err, "3 of 6 requests failed")
    result = load_result(tmp_path)
    assert (result["completed"], result["failed"]) == (3, 3)
    assert result["output_lens"] == [0, 4, 0, 4, 0, 4]
    assert result["total_output_tokens"] == sum(record.completion_tokens) == 12
    assert sum(bool(e) for e in result["errors"]) == 3


def test_failed_warmup_aborts_before_the_run(fake_server, tokenizer_dir, tmp_path, capsys):
    with fake_server(fail_after_tokens=0) as server:
        code, out, err = run_cli(
            serve_argv(server, tokenizer_dir, tmp_path, "--num-prompts", "4", "--num-warmups", "2",
                       "--random-input-len", "8", "--random-output-len", "2"),
            capsys,
        )  # fmt: skip
        assert len(server.record.payloads) == 2
    assert_clean_failure(code, out, err, "2 of 2 warmup requests failed")
    assert "Serving Benchmark Result" not in out


def test_multi_turn_resends_each_conversation_in_order(fake_server, tokenizer_dir, tmp_path, capsys):
    """Each turn's prompt is the previous turn's prompt + its answer + the new message, turns of one
    conversation never overlap, and the chat backend sends the whole conversation as messages."""
    for backend in ("openai", "openai-chat"):
        with fake_server() as server:
            code, out, err = run_cli(
                serve_argv(server, tokenizer_dir, tmp_path, "--backend", backend, "--dataset-name", "multi_turn",
                           "--num-prompts", "6", "--multi-turn-num-turns", "3", "--multi-turn-system-prompt-len",
                           "12", "--multi-turn-user-len", "3", "--multi-turn-output-len", "4"),
                capsys,
            )  # fmt: skip
            record = server.record
        assert code == 0, err
        assert load_result(tmp_path)["completed"] == 6
        if backend == "openai":
            prompts = sorted((p["prompt"] for p in record.payloads), key=lambda p: len(p.split()))
            assert len({" ".join(p.split()[:12]) for p in prompts}) == 1  # one system prompt for all
            assert [len(p.split()) for p in prompts] == [15, 15, 22, 22, 29, 29]  # + 4 answer + 3 message a turn
            for turn in (1, 2):  # each later turn extends one of the previous turn's prompts
                assert all(any(p.startswith(q + " ") or p.startswith(q) for q in prompts[2 * turn - 2:2 * turn])
                           for p in prompts[2 * turn:2 * turn + 2])
        else:
            roles = sorted([m["role"] for m in p["messages"]] for p in record.payloads)
            assert roles[-1] == ["user", "assistant", "user", "assistant", "user"]
            assert [len(r) for r in roles] == [1, 1, 3, 3, 5, 5]
