"""One streamed request to an OpenAI-compatible server, timed the way `vllm bench serve` times it.

Timers: `start_time` just before the POST; TTFT at the first SSE message that has `choices`
(even with empty text); every later `choices` message adds one gap to `itl`; latency ends at the
last `choices` message (the trailing usage-only message does not count). Token counts come from
the usage message. An `error` frame mid-stream, a non-200 status or a stream without any
`choices` message marks the request failed; the error text is kept for the report.
"""

from __future__ import annotations

import codecs
import json
import os
import time
from dataclasses import dataclass, field

import aiohttp

from hybridserve.bench.datasets import SampleRequest


@dataclass
class RequestOutput:
    """What one request measured (seconds, `time.perf_counter` clock)."""

    success: bool = False
    error: str = ""
    generated_text: str = ""
    prompt_len: int = 0
    output_tokens: int | None = None  # from the usage message; None if the server sent none
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    client_queue_time: float = 0.0


class SSEParser:
    """Splits a byte stream into SSE `data:` payloads; skips `:` comment lines."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._decoder.decode(chunk).replace("\r\n", "\n")
        events = []
        while "\n\n" in self._buffer:
            event, self._buffer = self._buffer.split("\n\n", 1)
            data = [line[5:].lstrip() for line in event.split("\n") if line.startswith("data:")]
            if data:
                events.append("\n".join(data))
        return events


def build_payload(backend: str, model: str, request: SampleRequest, ignore_eos: bool, extra_body: dict) -> dict:
    """The JSON body vLLM's client sends for this backend."""
    if backend == "openai-chat":
        payload = {
            "model": model,
            "messages": request.messages or [{"role": "user", "content": request.prompt}],
            "max_completion_tokens": request.expected_output_len,
        }
    else:
        payload = {
            "model": model,
            "prompt": request.prompt,
            "repetition_penalty": 1.0,
            "max_tokens": request.expected_output_len,
            "logprobs": None,
        }
    payload |= {"stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload | extra_body


def request_headers(request_id: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Content type and OPENAI_API_KEY's bearer token, then `extra` (--header), then the request id."""
    headers = {"Content-Type": "application/json"}
    if api_key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    headers |= extra or {}
    if request_id:
        headers["x-request-id"] = request_id
    return headers


def error_text(body: str) -> str:
    """The message of an OpenAI-style error body, else the body itself (shortened)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return body.strip()[:500]


def _chunk_text(backend: str, choice: dict) -> str:
    if backend == "openai-chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    backend: str,
    model: str,
    request: SampleRequest,
    ignore_eos: bool = False,
    extra_body: dict | None = None,
    headers: dict[str, str] | None = None,
) -> RequestOutput:
    """POST one streaming request and time it; never raises, failures land in `output.error`."""
    payload = build_payload(backend, model, request, ignore_eos, extra_body or {})
    output = RequestOutput(prompt_len=request.prompt_len)
    text_parts: list[str] = []
    start = last = time.perf_counter()
    output.start_time = start
    got_choices = False
    try:
        async with session.post(url, json=payload, headers=request_headers(request.request_id, headers)) as resp:
            if resp.status != 200:
                output.error = f"HTTP {resp.status}: {error_text(await resp.text())}"
                return output
            parser = SSEParser()
            done = False
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    done = done or data == "[DONE]"
                    if done:
                        break
                    message = json.loads(data)
                    if not isinstance(message, dict):
                        raise ValueError(f"SSE message is not a JSON object: {data[:100]}")
                    if "error" in message or message.get("object") == "error":
                        output.error = f"server error mid-stream: {error_text(data)}"
                        return output
                    if choices := message.get("choices"):
                        if got_choices:
                            output.itl.append(now - last)
                        else:
                            output.ttft = now - start
                            got_choices = True
                        last = now
                        text_parts.append(_chunk_text(backend, choices[0]))
                    elif usage := message.get("usage"):
                        output.output_tokens = usage.get("completion_tokens")
                        if usage.get("prompt_tokens") is not None:
                            output.prompt_len = usage["prompt_tokens"]
                if done:
                    break
    except aiohttp.ClientConnectorError as e:
        output.error = f"cannot connect to {url}: {e.os_error or e}"
        return output
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, ValueError) as e:
        output.error = f"{type(e).__name__}: {e}"
        return output
    output.generated_text = "".join(text_parts)
    output.latency = last - start
    if got_choices:
        output.success = True
    else:
        output.error = "the stream ended without any message carrying choices"
    return output
