"""`hybridserve bench serve`: drive an OpenAI-compatible server and report vLLM-comparable numbers.

Flow: ask the server what it serves (`/v1/models`), load the tokenizer, build the prompts (and
check their length against the server's `/tokenize`), send warmups, then send every request
following the arrival process under the client-side concurrency cap, and report. Anything that
makes the numbers meaningless (unreachable server, unknown model, failed warmup) raises
`BenchError`; `main` turns it into one clear line and a non-zero exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from hybridserve.bench.datasets import SYNTHETIC, DatasetError, SampleRequest, load_tokenizer, sample_requests
from hybridserve.bench.metrics import GOODPUT_METRICS, calculate_metrics
from hybridserve.bench.report import DETAIL_FIELDS, format_report, result_fields, result_filename
from hybridserve.bench.request import error_text, send_request

SESSION_TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


class BenchError(RuntimeError):
    """A run that cannot produce meaningful numbers; the message says why and what to check."""


def server_urls(args) -> tuple[str, str]:
    """(base URL, full API URL) from --base-url or --host/--port, and --endpoint."""
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
    return base, base + endpoint


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for pair in pairs or []:
        name, _, value = pair.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            raise BenchError(f"--goodput expects KEY:MILLISECONDS pairs, got {pair!r}") from None
        if name not in GOODPUT_METRICS or slos[name] < 0:
            raise BenchError(f"--goodput: {pair!r}: the key must be one of {GOODPUT_METRICS}, the value >= 0")
    return slos


def parse_percentiles(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise BenchError(f"--metric-percentiles expects numbers like 50,90,99, got {text!r}") from None
    if any(not 0 <= p <= 100 for p in values):
        raise BenchError(f"--metric-percentiles must lie in [0, 100], got {text!r}")
    return values


def parse_percentile_metrics(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in PERCENTILE_METRICS]
    if unknown:
        raise BenchError(f"--percentile-metrics: unknown {unknown}; choose from {PERCENTILE_METRICS}")
    return names


def arrival_offsets(num: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send time of each request, seconds after the start.

    Gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)) (burstiness 1 = Poisson), then
    rescaled so the last request goes out at exactly num/rate; rate inf sends all at t=0.
    """
    if math.isinf(rate):
        return np.zeros(num)
    if math.isinf(burstiness):
        gaps = np.full(num, 1.0 / rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    offsets = np.cumsum(gaps)
    return offsets * (num / rate) / offsets[-1] if offsets[-1] > 0 else offsets


async def fetch_models(session: aiohttp.ClientSession, base_url: str) -> list[dict] | None:
    """The server's `/v1/models` entries; None if it does not answer that route."""
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return None
            return (await resp.json()).get("data") or []
    except aiohttp.ClientConnectorError as e:
        raise BenchError(f"cannot reach the server at {base_url}: {e.os_error or e}. Is it running?") from None
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise BenchError(f"GET {url} failed: {type(e).__name__}: {e}") from None


def choose_model(requested: str | None, models: list[dict] | None, base_url: str) -> tuple[str, dict | None]:
    """The model name to send and the server's entry for it; unknown names fail early."""
    served = [m.get("id") for m in models or []]
    if requested is None:
        if not served:
            raise BenchError(f"--model not given and {base_url}/v1/models lists no model")
        return served[0], models[0]
    if models is not None and requested not in served:
        raise BenchError(f"model {requested!r} is not served at {base_url}; it serves: {', '.join(served) or 'nothing'}")
    entry = next((m for m in models or [] if m.get("id") == requested), None)
    return requested, entry


async def align_to_server_tokenizer(
    session: aiohttp.ClientSession, base_url: str, model: str, requests: list[SampleRequest]
) -> list[SampleRequest]:
    """Check the first prompt's length with the server's `/tokenize`; re-truncate all on mismatch."""

    async def post(route: str, body: dict) -> dict:
        async with session.post(f"{base_url}/{route}", json={"model": model, **body}) as resp:
            if resp.status != 200:
                raise BenchError(f"/{route}: HTTP {resp.status}: {error_text(await resp.text())}")
            return await resp.json()

    try:
        first = (await post("tokenize", {"prompt": requests[0].prompt, "add_special_tokens": False}))["tokens"]
    except (BenchError, aiohttp.ClientError, KeyError, ValueError) as e:
        print(f"WARNING: could not check prompt lengths with the server's /tokenize ({e}); carrying on.")
        return requests
    if len(first) == requests[0].prompt_len:
        return requests
    print(
        f"WARNING: tokenizer mismatch: the server counts {len(first)} tokens in the first prompt, "
        f"the client {requests[0].prompt_len}; re-aligning prompts with /tokenize + /detokenize."
    )

    async def realign(request: SampleRequest) -> SampleRequest:
        tokens = (await post("tokenize", {"prompt": request.prompt, "add_special_tokens": False}))["tokens"]
        if len(tokens) <= request.prompt_len:
            return request
        text = (await post("detokenize", {"tokens": tokens[: request.prompt_len]}))["prompt"]
        return replace(request, prompt=text)

    return list(await asyncio.gather(*(realign(r) for r in requests)))


def sampling_fields(args) -> dict:
    """Sampling options given on the command line plus --extra-body (None = server default)."""
    names = ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
    fields = {name: getattr(args, name) for name in names}
    if args.backend != "openai-chat":
        fields["logprobs"] = args.logprobs  # completions only, as vLLM's client sends it
    return {k: v for k, v in fields.items() if v is not None} | (args.extra_body or {})


def parse_headers(items: list[str] | None) -> dict[str, str]:
    """--header KEY=VALUE ... -> {KEY: VALUE}."""
    headers = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise BenchError(f"--header expects KEY=VALUE, got {item!r}")
        headers[key.strip()] = value.strip()
    return headers


async def wait_for_server(session: aiohttp.ClientSession, base_url: str, deadline: float) -> list[dict] | None:
    """`/v1/models` once the server answers (--ready-check-timeout-sec: it may still be starting)."""
    while True:
        try:
            return await fetch_models(session, base_url)
        except BenchError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def ready_check(args, api_url: str, model: str, request: SampleRequest, ignore_eos: bool, deadline: float,
                      extra_body: dict, headers: dict[str, str]) -> None:
    """One test request (the first prompt), retried until it succeeds or the deadline passes."""
    print(f"Waiting for a test request to succeed (up to {args.ready_check_timeout_sec} s)...")
    async with aiohttp.ClientSession(timeout=SESSION_TIMEOUT) as session:
        while True:
            test = replace(request, request_id=f"{request.request_id}-ready")
            output = await send_request(session, api_url, args.backend, model, test, ignore_eos, extra_body, headers)
            if output.success:
                print("The server answered the test request.")
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the test request did not succeed within --ready-check-timeout-sec "
                                 f"{args.ready_check_timeout_sec}: {output.error}")
            await asyncio.sleep(1.0)


async def run_requests(args, api_url: str, model: str, requests: list[SampleRequest], ignore_eos: bool,
                       before_timed_run: Callable[[], Awaitable[Any]] | None = None):
    """Warmups, then `before_timed_run()` (e.g. a read of the server's counters), then the timed run.
    Returns (outputs in request order, duration in seconds, what `before_timed_run` returned)."""
    limit = args.max_concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=60)
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    extra_body, headers = sampling_fields(args), parse_headers(args.header)

    async with aiohttp.ClientSession(connector=connector, timeout=SESSION_TIMEOUT, trust_env=True) as session:

        async def limited(request: SampleRequest, arrival: float, progress: tqdm | None):
            async with semaphore:
                output = await send_request(session, api_url, args.backend, model, request, ignore_eos, extra_body,
                                            headers)
            output.client_queue_time = output.start_time - arrival
            if progress is not None:
                progress.update(1)
            return output

        if args.num_warmups > 0:
            print(f"Warming up with {args.num_warmups} requests...")
            first = requests[0]
            warmups = await asyncio.gather(
                *(
                    limited(replace(first, request_id=f"{first.request_id}-warmup-{i}"), time.perf_counter(), None)
                    for i in range(args.num_warmups)
                )
            )
            if failed := [w for w in warmups if not w.success]:
                raise BenchError(f"{len(failed)} of {len(warmups)} warmup requests failed: {failed[0].error}")
            print("Warmup run completed.")
        before = await before_timed_run() if before_timed_run is not None else None

        async def converse(turns: list[SampleRequest], arrival: float, progress: tqdm | None):
            """A conversation's turns in order, each resending the conversation so far (one turn
            for every dataset but multi_turn); the arrival process spaces conversations."""
            history, messages, outputs = "", [], []
            for turn in turns:
                messages.append({"role": "user", "content": turn.prompt})
                sent = replace(turn, prompt=f"{history} {turn.prompt}" if history else turn.prompt,
                               messages=list(messages))
                output = await limited(sent, arrival, progress)
                history = sent.prompt + output.generated_text
                messages.append({"role": "assistant", "content": output.generated_text})
                outputs.append(output)
                arrival = time.perf_counter()
            return outputs

        conversations: list[list[SampleRequest]] = []
        for request in requests:
            if request.turn == 0 or not conversations:
                conversations.append([])
            conversations[-1].append(request)
        rng = np.random.default_rng(args.seed)
        offsets = arrival_offsets(len(conversations), args.request_rate, args.burstiness, rng)
        print(f"Traffic request rate: {args.request_rate}")
        process = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Burstiness factor: {args.burstiness} ({process})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        progress = tqdm(total=len(requests), disable=args.disable_tqdm)
        start = time.perf_counter()
        tasks = []
        for turns, offset in zip(conversations, offsets):
            if (wait := start + offset - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(converse(turns, time.perf_counter(), progress)))
        outputs = [output for turns in await asyncio.gather(*tasks) for output in turns]
        duration = time.perf_counter() - start
        progress.close()
    return outputs, duration, before


# the server's /metrics series a run reads (vLLM's names), each summed over its labels
SERVER_SERIES = (
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
    "vllm:request_queue_time_seconds_sum", "vllm:request_queue_time_seconds_count",
    "vllm:iteration_tokens_total_sum", "vllm:iteration_tokens_total_count",
)


async def server_counters(base_url: str, headers: dict[str, str]) -> dict[str, float] | None:
    """The `SERVER_SERIES` the server exports at /metrics (absent ones left out); None without any."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), headers=headers) as session:
            async with session.get(f"{base_url}/metrics") as resp:
                text = await resp.text() if resp.status == 200 else ""
    except aiohttp.ClientError:
        return None
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in SERVER_SERIES:
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
    return totals or None


def server_side(before: dict[str, float] | None, after: dict[str, float] | None, duration: float) -> dict:
    """What the server's counters say about the run (their change over it; None where absent): the
    prefix cache hit rate (prompt tokens), the mean time to first token from the server's arrival
    and its part spent queued in the engine, and the engine steps (the run's duration per step, which
    is a step's mean length while the engine is busy throughout, and their mean tokens). The client's
    TTFT less the server's is HTTP and the API front end; the server's is engine steps."""
    def delta(name: str) -> float | None:
        return after[name] - before.get(name, 0.0) if before is not None and after and name in after else None

    def ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
        return scale * num / den if num is not None and den else None

    steps = delta("vllm:iteration_tokens_total_count")
    return {
        "prefix_cache_hit_rate": ratio(delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")),
        "server_mean_ttft_ms": ratio(delta("vllm:time_to_first_token_seconds_sum"),
                                     delta("vllm:time_to_first_token_seconds_count"), 1000),
        "server_mean_queue_time_ms": ratio(delta("vllm:request_queue_time_seconds_sum"),
                                           delta("vllm:request_queue_time_seconds_count"), 1000),
        "engine_steps": int(steps) if steps is not None else None,
        "engine_ms_per_step": ratio(duration, steps, 1000),
        "engine_mean_tokens_per_step": ratio(delta("vllm:iteration_tokens_total_sum"), steps),
    }


def format_server_side(side: dict) -> str:
    """The report's lines for `server_side` (only what the server exported)."""
    lines = []
    if side["prefix_cache_hit_rate"] is not None:
        lines.append(f"Prefix cache hit rate (server, prompt tokens): {100 * side['prefix_cache_hit_rate']:.1f}%")
    if side["server_mean_ttft_ms"] is not None:
        queue = side["server_mean_queue_time_ms"]
        lines.append(f"Server mean TTFT (from its arrival): {side['server_mean_ttft_ms']:.2f} ms"
                     + (f", of it queued in the engine: {queue:.2f} ms" if queue is not None else ""))
    if side["engine_steps"]:
        lines.append(f"Engine steps: {side['engine_steps']} (one per {side['engine_ms_per_step']:.2f} ms of the run, "
                     f"{side['engine_mean_tokens_per_step']:.1f} tokens each)")
    return "\n".join(lines)


def validate(args) -> None:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be at least 1")
    if args.request_rate <= 0:
        raise BenchError("--request-rate must be > 0 (inf sends everything at once)")
    if args.burstiness <= 0:
        raise BenchError("--burstiness must be > 0")
    if args.num_warmups < 0:
        raise BenchError("--num-warmups must be >= 0")
    if args.ready_check_timeout_sec < 0:
        raise BenchError("--ready-check-timeout-sec must be >= 0 (0 skips the check)")


async def run_benchmark(args) -> dict:
    """One benchmark run; prints progress and the report, returns the result JSON dict."""
    validate(args)
    goodput_slos = parse_goodput(args.goodput)
    percentiles = parse_percentiles(args.metric_percentiles)
    selected_metrics = parse_percentile_metrics(args.percentile_metrics)
    base_url, api_url = server_urls(args)
    headers = parse_headers(args.header)
    deadline = time.monotonic() + args.ready_check_timeout_sec

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), headers=headers) as session:
        model_id, server_model = choose_model(args.model, await wait_for_server(session, base_url, deadline), base_url)
        model = args.served_model_name or model_id
        tokenizer_id = args.tokenizer or model_id
        tokenizer = None
        if not args.skip_tokenizer_init:
            try:
                tokenizer = load_tokenizer(tokenizer_id, args.tokenizer_mode, args.trust_remote_code)
            except Exception as e:  # any loader failure: say which tokenizer and why
                raise BenchError(f"cannot load tokenizer {tokenizer_id!r}: {type(e).__name__}: {e}") from None
        try:
            requests = sample_requests(args, tokenizer)
        except DatasetError as e:
            raise BenchError(str(e)) from None
        if args.dataset_name == "random":
            requests = await align_to_server_tokenizer(session, base_url, model, requests)

    ignore_eos = args.ignore_eos
    if args.dataset_name in SYNTHETIC and not ignore_eos:
        print(f"Note: the {args.dataset_name} dataset ignores EOS (as vLLM's random one does) so outputs reach "
              "their requested length.")
        ignore_eos = True
    if args.temperature is None:
        print("Note: no --temperature given; the server's default sampling applies (as in vLLM).")

    if args.ready_check_timeout_sec > 0:
        await ready_check(args, api_url, model, requests[0], ignore_eos, deadline, sampling_fields(args), headers)
    outputs, duration, counters_before = await run_requests(
        args, api_url, model, requests, ignore_eos, before_timed_run=lambda: server_counters(base_url, headers))
    side = server_side(counters_before, await server_counters(base_url, headers), duration)
    metrics = calculate_metrics(
        outputs,
        duration,
        percentiles,
        goodput_slos,
        count_tokens=(lambda text: len(tokenizer.encode(text, add_special_tokens=False))) if tokenizer else None,
        max_concurrency=args.max_concurrency,
        request_rate=args.request_rate,
    )
    print(format_report(metrics, duration, selected_metrics, args.max_concurrency, args.request_rate, bool(goodput_slos)))
    if server_lines := format_server_side(side):
        print(server_lines)
    errors = [o.error for o in outputs if not o.success]
    if errors:
        print(f"Failed requests: {len(errors)} of {len(outputs)}. First errors (up to 10):")
        for i, error in enumerate(errors[:10]):
            print(f"  Error {i}: {error}")

    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    setup = {
        "date": date,
        "endpoint_type": args.backend,
        "backend": args.backend,
        "label": args.label,
        "model_id": model_id,
        "tokenizer_id": tokenizer_id,
        "num_prompts": args.num_prompts,
        **dict(item.split("=", 1) for item in args.metadata or [] if "=" in item),
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
    }
    provenance = {
        "command": getattr(args, "command_line", None) or shlex.join(sys.argv),
        "base_url": base_url,
        "server_model": server_model,
        "first_errors": errors[:10],
    }
    measured = result_fields(outputs, metrics, duration, selected_metrics, bool(goodput_slos))
    result = setup | measured | side | provenance
    if not args.save_detailed:
        result = {k: v for k, v in result.items() if k not in DETAIL_FIELDS}
    if args.save_result or args.append_result:
        name = args.result_filename or result_filename(
            args.label or args.backend, args.request_rate, args.max_concurrency, model_id, date
        )
        path = Path(args.result_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if args.append_result else "w") as f:
            if args.append_result and f.tell():
                f.write("\n")  # one JSON document per line, as vLLM appends
            f.write(json.dumps(result))
        print(f"Result {'appended' if args.append_result else 'saved'} to {path}")
    return result


def run_exit_code(result: dict) -> int:
    """0 only when every request succeeded."""
    return 0 if result["failed"] == 0 and result["completed"] > 0 else 1


def main(args) -> int:
    """CLI entry of `bench serve`: the run's exit code; errors as one line on stderr."""
    try:
        result = asyncio.run(run_benchmark(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    code = run_exit_code(result)
    if code:
        print(f"error: {result['failed']} of {result['failed'] + result['completed']} requests failed "
              "(see the errors above); these numbers are not a valid measurement.", file=sys.stderr)
    return code
