"""Chat templates sent in requests (only with --trust-request-chat-template), rendered out of harm's way.

The server's own template is the operator's code; a request's template is the client's. Jinja's
sandbox keeps a template away from Python internals but, as Jinja's documentation says, not from
using unbounded time or memory (`{{ 'x' * 10**9 }}`, doubling a string in a loop). So a request
template renders in a short-lived child process, forked from a forkserver that already has the
renderer imported (a few milliseconds a render): the child may grow its address space by at most
`MEMORY_BYTES`, is killed `TIMEOUT_S` after it starts rendering (starting the forkserver, once, is
not the template's time; both limits can be set per call), and its output must be at most
`max_chars` characters.
The rendering itself is transformers' `render_jinja_template` — what `apply_chat_template` runs, in
Jinja's ImmutableSandboxedEnvironment — so a template behaves exactly as it would as the model's.
This module imports nothing heavy: the forkserver preloads only the renderer.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Any

TIMEOUT_S = 5.0
MEMORY_BYTES = 1 << 30
_START_TIMEOUT_S = 60.0  # the first render starts the forkserver, which imports the renderer
_RENDERER = "transformers.utils.chat_template_utils"
_READY = "ready"


class TemplateLimitError(ValueError):
    """The template failed, or went past a limit; the message says which (it is the client's error)."""


def render_request_template(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            add_generation_prompt: bool, continue_final_message: bool,
                            variables: dict[str, Any], max_chars: int, *, timeout_s: float = TIMEOUT_S,
                            memory_bytes: int = MEMORY_BYTES) -> str:
    """The prompt text `source` renders to, or TemplateLimitError. Blocking: call it off the event loop."""
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_render_in_child, daemon=True, name="hybridserve-request-template",
                        args=(sender, source, messages, tools, add_generation_prompt, continue_final_message,
                              variables, max_chars, memory_bytes))
    child.start()
    sender.close()
    try:
        if not receiver.poll(_START_TIMEOUT_S):
            raise RuntimeError("the chat template renderer did not start")
        message = receiver.recv()
        if message == _READY:
            if not receiver.poll(timeout_s):
                raise TemplateLimitError(f"the chat template did not finish rendering within {timeout_s:g} s")
            message = receiver.recv()
        ok, value = message
    except EOFError:
        raise TemplateLimitError("the chat template's renderer stopped without a result "
                                 f"(more than {memory_bytes >> 20} MiB of memory?)") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if not ok:
        raise TemplateLimitError(value)
    return value


@functools.cache
def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([_RENDERER])
    return ctx


def _render_in_child(conn: Any, source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     add_generation_prompt: bool, continue_final_message: bool, variables: dict[str, Any],
                     max_chars: int, memory_bytes: int) -> None:
    import importlib
    import resource

    try:
        limit = _address_space() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        renderer = importlib.import_module(_RENDERER)
        conn.send(_READY)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as apply_chat_template does
        rendered, _ = renderer.render_jinja_template(
            conversations=[chat], tools=tools, chat_template=source, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **variables)
        text = rendered[0]
        if len(text) > max_chars:
            conn.send((False, f"the chat template rendered {len(text)} characters; at most {max_chars} are allowed"))
        else:
            conn.send((True, text))
    except MemoryError:
        conn.send((False, f"the chat template needed more than {memory_bytes >> 20} MiB of memory"))
    except Exception as e:  # the template's own error, told to the client
        conn.send((False, f"chat template could not render these messages: {type(e).__name__}: {str(e)[:500]}"))
    finally:
        conn.close()


def _address_space() -> int:
    """This process's virtual memory size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
