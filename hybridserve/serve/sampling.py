"""Request fields -> SamplingParams, with the context-length check and the server's defaults.

Policy (documented in docs/serving.md): a request whose prompt plus requested output exceeds
`max_model_len` is rejected with vLLM's wording; without a requested maximum the output is capped at
`min(default_max_tokens, max_model_len - prompt)`. Unset temperature / top_p / top_k come from the
checkpoint's `generation_config.json` when it has them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridserve.sampling_params import SamplingParams, SamplingParamsError
from hybridserve.serve.errors import bad_request
from hybridserve.serve.protocol import _SamplingFields


def load_generation_defaults(model_path: str | None) -> dict[str, Any]:
    """temperature / top_p / top_k from the checkpoint's generation_config.json, if any."""
    if not model_path:
        return {}
    path = Path(model_path) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: raw[k] for k in ("temperature", "top_p", "top_k") if isinstance(raw.get(k), (int, float))}


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, default_max_tokens: int,
                       prompt_param: str = "messages", max_tokens_param: str = "max_tokens") -> int:
    """The output cap; a prompt that alone fills the context is blamed on the prompt, not on max_tokens."""
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{prompt_len} input tokens, which leaves no room for output. Please reduce the length of the "
            "input prompt.", prompt_param)
    if requested is None:
        return min(default_max_tokens, room)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {requested} "
            f"output tokens and your prompt contains at least {prompt_len} input tokens, for a total of at least "
            f"{prompt_len + requested} tokens. Please reduce the length of the input prompt or the number of "
            f"requested output tokens.", max_tokens_param)
    return requested


def build_sampling_params(req: _SamplingFields, *, max_tokens: int, logprobs: int | None,
                          defaults: dict[str, Any], vocab_size: int, **extra: Any) -> SamplingParams:
    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    try:
        params = SamplingParams(
            n=req.n,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            min_p=req.min_p or 0.0,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos,
            stop=list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            include_stop_str_in_output=req.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            **extra,
        )
        params.validate_vocab(vocab_size)
    except SamplingParamsError as e:
        raise bad_request(str(e), e.param) from None
    return params
