"""A small fake OpenAI-compatible streaming server for the benchmark tests.

It streams one SSE chunk per token, honours max_tokens / max_completion_tokens / ignore_eos
(without ignore_eos it "meets EOS" after `eos_after` tokens), sends the usage chunk, serves
/v1/models, /health, /tokenize and /detokenize, records what it generated, and can be told to fail
(error frame mid-stream, every other request, or no /v1/models). Runs in a thread (`FakeServer`)
or as a process (`python fake_server.py --port P --tokenizer DIR`) for the sweep tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from tokenizers import Tokenizer


@dataclass
class FakeOptions:
    model: str = "fake-model"
    token_delay_s: float = 0.001
    eos_after: int = 3  # tokens generated before "EOS" when ignore_eos is off
    fail_after_tokens: int | None = None  # send an error frame after this many tokens
    fail_every_other: bool = False  # requests 0, 2, 4, ... get the error frame after 1 token
    list_models: bool = True  # False: /v1/models answers 404 (a server that cannot say)
    has_tokenize: bool = True
    tokenize_extra: int = 0  # /tokenize reports this many extra (BOS-like) tokens
    max_num_seqs: int | None = None  # server-side cap on requests generating at once


@dataclass
class FakeRecord:
    """What the server saw and produced, for the tests to compare with the client's report."""

    payloads: list[dict] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)  # the x-request-id headers
    headers: list[dict[str, str]] = field(default_factory=list)  # every generation request's headers
    routes: list[str] = field(default_factory=list)  # the path of every generation request
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)  # successful streams only
    inflight: int = 0
    max_inflight: int = 0


def build_app(tokenizer: Tokenizer, options: FakeOptions, record: FakeRecord) -> web.Application:
    vocab = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    words = [w for w in vocab if w.startswith("w")] or vocab
    slots = asyncio.Semaphore(options.max_num_seqs) if options.max_num_seqs else None

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(_request: web.Request) -> web.Response:
        if not options.list_models:
            return web.json_response({"error": {"message": "Not Found"}}, status=404)
        entry = {"id": options.model, "object": "model", "root": options.model, "max_num_seqs": options.max_num_seqs}
        return web.json_response({"object": "list", "data": [entry]})

    async def tokenize(request: web.Request) -> web.Response:
        if not options.has_tokenize:
            return web.json_response({"error": {"message": "Not Found"}}, status=404)
        body = await request.json()
        ids = [0] * options.tokenize_extra + tokenizer.encode(body["prompt"], add_special_tokens=False).ids
        return web.json_response({"tokens": ids, "count": len(ids)})

    async def detokenize(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"prompt": tokenizer.decode(body["tokens"], skip_special_tokens=True)})

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("chat/completions")
        if body.get("model") != options.model:
            message = f"The model `{body.get('model')}` does not exist."
            return web.json_response({"error": {"message": message, "type": "NotFoundError", "code": 404}}, status=404)
        index = len(record.payloads)
        record.payloads.append(body)
        record.request_ids.append(request.headers.get("x-request-id", ""))
        record.headers.append(dict(request.headers))
        record.routes.append(request.path)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        budget = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        n_tokens = budget if body.get("ignore_eos") else min(budget, options.eos_after)
        fail_at = options.fail_after_tokens
        if options.fail_every_other and index % 2 == 0:
            fail_at = 1
        prompt_tokens = count(prompt)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(obj) -> None:
            await response.write(f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode())

        async with slots or _no_limit():
            record.inflight += 1
            record.max_inflight = max(record.max_inflight, record.inflight)
            try:
                await response.write(b": keep-alive comment\n\n")
                for i in range(n_tokens):
                    if fail_at is not None and i == fail_at:
                        await send({"error": {"message": "boom: engine died", "type": "InternalServerError", "code": 500}})
                        await send("[DONE]")
                        return response
                    await asyncio.sleep(options.token_delay_s)
                    word = " " + words[(index * 7 + i) % len(words)]
                    finish = None if i < n_tokens - 1 else ("length" if n_tokens == budget else "stop")
                    choice = {"index": 0, "finish_reason": finish}
                    choice |= {"delta": {"role": "assistant", "content": word} if i == 0 else {"content": word}} if chat else {"text": word, "logprobs": None}
                    await send({"id": f"r{index}", "object": "chunk", "created": int(time.time()), "model": options.model, "choices": [choice]})
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens, "total_tokens": prompt_tokens + n_tokens}
                if (body.get("stream_options") or {}).get("include_usage"):
                    await send({"id": f"r{index}", "object": "chunk", "model": options.model, "choices": [], "usage": usage})
                await send("[DONE]")
                record.prompt_tokens.append(prompt_tokens)
                record.completion_tokens.append(n_tokens)
            finally:
                record.inflight -= 1
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


class _no_limit:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class FakeServer:
    """The fake server on 127.0.0.1 with a free port, in a background thread with its own loop."""

    def __init__(self, tokenizer_dir: Path, **options) -> None:
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.options = FakeOptions(**options)
        self.record = FakeRecord()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.base_url = ""

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self.base_url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> str:
        self._runner = web.AppRunner(build_app(self.tokenizer, self.options, self.record))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--token-delay", type=float, default=0.001)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    options = FakeOptions(token_delay_s=args.token_delay, max_num_seqs=args.max_num_seqs)
    web.run_app(build_app(tokenizer, options, FakeRecord()), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
