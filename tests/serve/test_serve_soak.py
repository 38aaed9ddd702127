"""Bounded soak against the real engine (tiny preset): mixed streaming and non-streaming chat and
completions requests with n in {1, 2, 3}, random stops and sampling parameters, and clients that hang
up at random points. Afterwards: no server error seen, every block and slot free, nothing tracked.

HYBRIDSERVE_SOAK_S sets the duration (default 60 s; run it for 600 s before a release). The figures
(requests, statuses, disconnects, RSS growth) are printed as one JSON line for docs/reliability.md.
"""

import asyncio
import json
import logging
import os
import random
import time

import httpx
import psutil

from tests.serve.test_serve_fuzz import _server_errors
from tests.serve.test_serve_limits import _engine_is_clean

SOAK_S = float(os.environ.get("HYBRIDSERVE_SOAK_S", "60"))
CONCURRENCY = 8
EOS_BIAS = {"2": 6.0}  # pushes the tiny model's EOS: choices end on their first tokens, siblings run on
STOPS = ["a", "e", " ", "\n", "the", "ab", "<|im_end|>"]


def _body(rng: random.Random) -> tuple[str, dict]:
    params: dict = {"n": rng.choice([1, 2, 3]), "max_tokens": rng.randint(1, 24),
                    "temperature": rng.choice([0.0, 0.7, 1.0, 1.5]), "stream": rng.random() < 0.5}
    if rng.random() < 0.5:
        params["seed"] = rng.randrange(2**63)
    if rng.random() < 0.4:
        params["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    if rng.random() < 0.3:
        params["logit_bias"] = EOS_BIAS
    if rng.random() < 0.3:
        params["top_k"], params["top_p"] = rng.randint(1, 512), rng.uniform(0.1, 1.0)
    if rng.random() < 0.2:
        params["logprobs"] = rng.randint(0, 5) if rng.random() < 0.5 else None
    if params["stream"] and rng.random() < 0.3:
        params["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        logprobs = params.pop("logprobs", None)
        if logprobs:
            params["logprobs"], params["top_logprobs"] = True, logprobs
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": rng.choice(["hi", "count", "x y z"])}],
                                        **params}
    if params.get("logprobs") is None:
        params.pop("logprobs", None)
    prompt = rng.choice(["hi", "once upon", [1, 2, 3, 4], ["a", "b"]])
    return "/v1/completions", {"prompt": prompt, **params}


async def _client(base: str, rng: random.Random, deadline: float, tally: dict) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        while time.monotonic() < deadline:
            path, body = _body(rng)
            hang_up = rng.random() < 0.2
            tally["requests"] += 1
            try:
                if body["stream"]:
                    async with c.stream("POST", path, json=body) as r:
                        lines = []
                        async for line in r.aiter_lines():
                            lines.append(line)
                            if hang_up and len(lines) >= rng.randint(1, 6):
                                tally["disconnects"] += 1
                                break
                        text = "\n".join(lines)
                else:
                    task = asyncio.ensure_future(c.post(path, json=body))
                    if hang_up:
                        await asyncio.sleep(rng.uniform(0, 0.05))
                        task.cancel()  # closes the connection while the server may still be generating
                        tally["disconnects"] += 1
                    r = await task
                    text = r.text
            except asyncio.CancelledError:
                if not hang_up:
                    raise
                continue
            tally[str(r.status_code)] = tally.get(str(r.status_code), 0) + 1
            probe = httpx.Response(r.status_code, headers=r.headers, text=text)
            if _server_errors(probe) or (r.status_code != 200 and not hang_up):
                tally["failures"].append((path, body, r.status_code, text[:500]))


class _ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _all_free(server) -> bool:
    s = server.ctx.engine.stats()
    return (s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_blocks
            and s.num_free_slots == s.num_slots and server.ctx.tracker.in_flight == 0)


def _settle(server) -> None:
    """Wait for the engine's last stats to show every block and slot free (they arrive with each step)."""
    deadline = time.monotonic() + 30
    while not _all_free(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _all_free(server), server.ctx.engine.stats()
    _engine_is_clean(server)


def test_n_greater_than_one_with_a_choice_ending_first_keeps_the_engine_alive(real_server):
    """Issue 10 item 1's reproduction: choice 0 finishes on its first token while a sibling runs."""
    for seed in range(8, 20):
        r = httpx.post(real_server.url + "/v1/completions", timeout=60, json={
            "prompt": "hi", "n": 2, "max_tokens": 4, "temperature": 1.0, "seed": seed, "logit_bias": EOS_BIAS})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2
    assert httpx.get(real_server.url + "/health").status_code == 200
    _settle(real_server)


def test_soak_mixed_traffic_leaves_nothing_behind(real_server):
    _settle(real_server)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tally: dict = {"requests": 0, "disconnects": 0, "failures": []}
    errors = _ErrorLog()
    logging.getLogger("hybridserve").addHandler(errors)
    deadline = time.monotonic() + SOAK_S

    async def run():
        rng = random.Random(int(os.environ.get("HYBRIDSERVE_SOAK_SEED", "10")))
        await asyncio.gather(*(_client(real_server.url, random.Random(rng.random()), deadline, tally)
                               for _ in range(CONCURRENCY)))

    try:
        asyncio.run(run())
    finally:
        logging.getLogger("hybridserve").removeHandler(errors)
    assert httpx.get(real_server.url + "/health").status_code == 200
    _settle(real_server)
    failures = tally.pop("failures")
    print(json.dumps({"soak_s": SOAK_S, **tally, "failures": len(failures),
                      "rss_growth_mib": round((process.memory_info().rss - rss_before) / 2**20, 1)}))
    assert not failures, failures[:5]
    assert not errors.records, errors.records[:5]  # no unhandled error, no engine failure, logged
    assert tally["requests"] >= CONCURRENCY and tally.get("200", 0) > 0
