"""`/health` latency while one big prompt is tokenized: does preprocessing stay off the event loop?

Usage: python bench/health_latency.py [--mib 10] [--tokenizer tiny]
Starts the API server (no engine core: `/tokenize` needs only the tokenizer) with a context large
enough that the prompt passes the character limit, posts one prompt of `--mib` MiB, and polls
`/health` every 10 ms until it is answered. It runs twice: with templating and tokenization in the
preprocessing threads (the server as it is), and with them on the event loop (how it was before),
so the two rows show what the threads buy. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import uvicorn

from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServerContext, ServeSettings
from hybridserve.tokenizer import load_tokenizer


class TokenizerOnlyEngine:
    """What /tokenize reads from an engine client: a tokenizer and a context length."""

    def __init__(self, tokenizer: Any, max_model_len: int):
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.model_config = SimpleNamespace(vocab_size=len(tokenizer), path=None)
        self.is_ready, self.errored = True, False

    def stats(self) -> None:
        return None


async def _on_the_loop(self: ServerContext, fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def measure(tokenizer: Any, text: str, offload: bool) -> dict[str, Any]:
    engine = TokenizerOnlyEngine(tokenizer, max_model_len=len(text))
    app = build_app(ServeSettings(["bench"], max_request_body_bytes=4 * len(text) + (1 << 20)), engine=engine)
    if not offload:
        ServerContext.offload, saved = _on_the_loop, ServerContext.offload  # type: ignore[method-assign]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            await c.get("/health")
            t0 = time.perf_counter()
            big = asyncio.ensure_future(c.post("/tokenize", json={"prompt": text}))
            latencies = []
            while not big.done():
                s0 = time.perf_counter()
                assert (await c.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - s0)
                await asyncio.sleep(0.01)
            response = await big
            return {"status": response.status_code, "request_s": time.perf_counter() - t0,
                    "health_polls": len(latencies), "health_median_ms": 1e3 * statistics.median(latencies),
                    "health_max_ms": 1e3 * max(latencies)}

    try:
        return asyncio.run(run())
    finally:
        server.should_exit = True
        thread.join(30)
        if not offload:
            ServerContext.offload = saved  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=float, default=10.0)
    ap.add_argument("--tokenizer", default="tiny", help="a preset name or tokenizer directory")
    args = ap.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    words = "the quick brown fox jumps over the lazy dog, then rests; "
    text = (words * int(args.mib * (1 << 20) / len(words) + 1))[: int(args.mib * (1 << 20))]
    rows = {name: measure(tokenizer, text, offload) for name, offload in
            (("threads", True), ("event loop", False))}
    print(f"{args.mib:g} MiB prompt to /tokenize, tokenizer {args.tokenizer}")
    print(f"{'preprocessing':<14}{'status':>7}{'request s':>11}{'polls':>7}{'/health median ms':>19}{'max ms':>9}")
    for name, r in rows.items():
        print(f"{name:<14}{r['status']:>7}{r['request_s']:>11.2f}{r['health_polls']:>7}"
              f"{r['health_median_ms']:>19.1f}{r['health_max_ms']:>9.1f}")
    print(json.dumps({"bench": "health_latency", "mib": args.mib, "tokenizer": args.tokenizer,
                      **{f"{k.replace(' ', '_')}": {m: round(v, 4) for m, v in r.items()} for k, r in rows.items()}}))


if __name__ == "__main__":
    main()
