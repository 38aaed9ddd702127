"""Test helpers: a small byte-level tokenizer with Nemotron's special tokens and our chat template."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hybridserve.config import PRESETS_DIR

TEMPLATE_PATH = PRESETS_DIR / "chat_template.jinja"
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 10, "<|im_end|>": 11}
MARKERS = {"<think>": 12, "</think>": 13, "<tool_call>": 14, "</tool_call>": 15}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level: every byte is one token (ids 16..271); markers are single tokens (ids 10..15)."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    named = {i: name for name, i in {**SPECIAL, **MARKERS}.items()}
    vocab = {named.get(i, f"<reserved_{i}>"): i for i in range(16)}
    for i, ch in enumerate(byte_chars):
        vocab[ch] = 16 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<unk>"
    )
    fast.chat_template = TEMPLATE_PATH.read_text()
    return fast


class ServerThread:
    """A real uvicorn server for `app` on a free port, in a background thread (one event loop)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = None
        self.port = None

    def __enter__(self):
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.loop = self.server.servers[0].get_loop()  # the server's event loop (for run_coroutine_threadsafe)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float) -> None:
        """Until /health answers 200 (the engine is loaded and warm)."""
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "engine did not become ready"
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_stream(url: str, body: dict):
    """Send a streaming completion from a background thread; return (thread, chunks) once the first
    chunk has arrived (or the stream ended), so a test can act while the request is in flight."""
    import json
    import threading
    import time

    import httpx

    chunks: list[dict] = []

    def stream():
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            chunks.extend(json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {"))

    t = threading.Thread(target=stream)
    t.start()
    while not chunks and t.is_alive():
        time.sleep(0.02)
    return t, chunks
