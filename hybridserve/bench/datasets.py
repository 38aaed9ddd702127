"""Benchmark prompts: random (exact token lengths), prefix repetition, multi-turn replays, ShareGPT
JSON and custom JSONL.

The random dataset follows `vllm bench serve`: lengths drawn uniformly around the nominal value,
prompt ids a run of consecutive non-special vocabulary ids, then decoded to text and re-encoded
until the token count is exact (the text is what gets sent).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

RANDOM_PROMPT_TRIES = 20
SYNTHETIC = ("random", "prefix_repetition", "multi_turn")  # random token prompts (EOS is ignored, as vLLM does)


@dataclass
class SampleRequest:
    """One prompt to send: the text, its length in the client's tokenizer and the token budget."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    request_id: str = ""
    # multi_turn: the conversation and turn this message belongs to; `prompt` is only the new user
    # message, the driver prepends the conversation so far (previous prompts and answers)
    conversation: int | None = None
    turn: int = 0
    messages: list[dict] | None = None  # chat backend: the whole conversation to send (set by the driver)


class DatasetError(ValueError):
    """Bad dataset options or a dataset file that cannot be used."""


TOKENIZER_MODES = ("auto", "hf", "slow")


def load_tokenizer(name_or_path: str, mode: str = "auto", trust_remote_code: bool = False):
    """A tokenizer directory, hybridserve preset or Hugging Face hub id -> a tokenizer.

    Hub ids are resolved like the server resolves them (the local cache, `HF_HUB_OFFLINE`); a
    directory with `tokenizer.json` and the presets use `hybridserve.tokenizer.load_tokenizer`,
    anything else (and `mode="slow"`) `transformers.AutoTokenizer`.
    """
    from transformers import AutoTokenizer

    from hybridserve.hub import resolve
    from hybridserve.tokenizer import load_tokenizer as load_hybridserve_tokenizer

    if mode not in TOKENIZER_MODES:
        raise DatasetError(f"--tokenizer-mode {mode}: not supported (choose from {', '.join(TOKENIZER_MODES)})")
    path = resolve(name_or_path, weights=False)
    if mode != "slow":
        try:
            return load_hybridserve_tokenizer(path)
        except FileNotFoundError:
            pass  # a directory without tokenizer.json: transformers knows more formats
    return AutoTokenizer.from_pretrained(path, use_fast=mode != "slow", trust_remote_code=trust_remote_code)


def allowed_token_ids(tokenizer) -> np.ndarray:
    """Vocabulary ids without the special ones (they would decode to markup)."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64)


def decode_to_target_len(
    tokenizer,
    token_ids: list[int],
    target_len: int,
    rng: np.random.Generator,
    allowed: np.ndarray,
    max_retry: int = 10,
) -> tuple[str, list[int], int]:
    """Decode ids to text, re-encode, and truncate or pad until the text is `target_len` tokens.

    Some runs of ids re-tokenize differently once decoded (merges across token boundaries), so
    the text is fixed up: too long -> truncate the ids, too short -> append random allowed ids.
    Returns (text, its token ids, leftover mismatch after `max_retry` rounds; 0 when exact).
    """
    for attempt in range(max_retry + 1):
        text = tokenizer.decode(token_ids)
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        mismatch = len(token_ids) - target_len
        if mismatch == 0 or attempt == max_retry:
            return text, token_ids, mismatch
        if mismatch > 0:
            token_ids = token_ids[:target_len]
        else:
            extra = allowed[rng.integers(0, len(allowed), size=-mismatch)]
            token_ids = token_ids + extra.tolist()
    raise AssertionError("unreachable")


def sample_random(
    tokenizer,
    num_prompts: int,
    input_len: int = 1024,
    output_len: int = 128,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Synthetic prompts of exact token lengths (vLLM's `random` dataset).

    Where vLLM keeps a prompt whose fix-up did not settle (and logs the mismatch), this tries
    another run of consecutive ids, so byte-level BPE tokenizers get exact lengths too.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise DatasetError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    real_input_len = max(0, input_len - int(tokenizer.num_special_tokens_to_add()))
    in_low = math.floor(real_input_len * (1 - range_ratio))
    in_high = math.ceil(real_input_len * (1 + range_ratio))
    out_low = max(1, math.floor(output_len * (1 - range_ratio)))
    out_high = max(1, math.ceil(output_len * (1 + range_ratio)))
    if prefix_len + in_low < 1:
        raise DatasetError(
            f"--random-input-len {input_len} is too small: the shortest prompt would have "
            f"{prefix_len + in_low} tokens"
        )
    input_lens = rng.integers(in_low, in_high + 1, size=num_prompts)
    output_lens = rng.integers(out_low, out_high + 1, size=num_prompts)
    offsets = rng.integers(0, tokenizer.vocab_size, size=num_prompts)

    allowed = allowed_token_ids(tokenizer)
    prefix = allowed[rng.integers(0, len(allowed), size=prefix_len)].tolist() if prefix_len else []
    requests, total_mismatch = [], 0
    for i in range(num_prompts):
        offset = int(offsets[i])
        for _ in range(RANDOM_PROMPT_TRIES):
            body = allowed[(offset + i + np.arange(input_lens[i])) % len(allowed)].tolist()
            text, ids, mismatch = decode_to_target_len(
                tokenizer, prefix + body, prefix_len + int(input_lens[i]), rng, allowed
            )
            if mismatch == 0:
                break
            offset = int(rng.integers(0, len(allowed)))  # this run of ids would not settle: another
        total_mismatch += mismatch
        requests.append(SampleRequest(text, len(ids), int(output_lens[i])))
    if total_mismatch:
        print(
            f"WARNING: after decode/re-encode the prompts have {abs(total_mismatch)} "
            f"{'more' if total_mismatch > 0 else 'fewer'} tokens in total than requested."
        )
    return requests


def random_text(tokenizer, length: int, rng: np.random.Generator, allowed: np.ndarray) -> str:
    """Text of about `length` tokens of random non-special ids (exact where re-encoding settles)."""
    ids = allowed[rng.integers(0, len(allowed), size=length)].tolist()
    return decode_to_target_len(tokenizer, ids, length, rng, allowed)[0]


def sample_prefix_repetition(
    tokenizer,
    num_prompts: int,
    prefix_len: int = 256,
    suffix_len: int = 256,
    num_prefixes: int = 10,
    output_len: int = 128,
    seed: int = 0,
) -> list[SampleRequest]:
    """vLLM's `prefix_repetition` dataset: `num_prefixes` shared random prefixes, each prompt one of
    them followed by a random suffix of its own, in shuffled order."""
    if min(prefix_len, num_prefixes) < 1 or suffix_len < 0:
        raise DatasetError("--prefix-repetition-prefix-len and --prefix-repetition-num-prefixes must be >= 1, "
                           "--prefix-repetition-suffix-len >= 0")
    rng = np.random.default_rng(seed)
    allowed = allowed_token_ids(tokenizer)
    prefixes = [random_text(tokenizer, prefix_len, rng, allowed) for _ in range(num_prefixes)]
    requests = []
    for i in range(num_prompts):
        suffix = " " + random_text(tokenizer, suffix_len, rng, allowed) if suffix_len else ""
        prompt = prefixes[i % num_prefixes] + suffix
        requests.append(SampleRequest(prompt, _count(tokenizer, prompt), output_len))
    random.Random(seed).shuffle(requests)
    return requests


def sample_multi_turn(
    tokenizer,
    num_prompts: int,
    num_turns: int = 8,
    system_prompt_len: int = 2048,
    user_len: int = 64,
    output_len: int = 128,
    seed: int = 0,
) -> list[SampleRequest]:
    """Multi-turn replays: num_prompts // num_turns conversations of `num_turns` turns, each opening
    with the same system prompt of `system_prompt_len` tokens, then a random user message of
    `user_len` tokens per turn. The driver sends a conversation's turns in order, each resending the
    whole conversation so far with the previous answers (as a chat client does)."""
    if num_turns < 1 or num_prompts < num_turns:
        raise DatasetError(f"--multi-turn-num-turns must be in [1, --num-prompts], got {num_turns}")
    if system_prompt_len < 0 or user_len < 1:
        raise DatasetError("--multi-turn-system-prompt-len must be >= 0 and --multi-turn-user-len >= 1")
    rng = np.random.default_rng(seed)
    allowed = allowed_token_ids(tokenizer)
    system = random_text(tokenizer, system_prompt_len, rng, allowed) if system_prompt_len else ""
    requests = []
    for c in range(num_prompts // num_turns):
        for t in range(num_turns):
            message = random_text(tokenizer, user_len, rng, allowed)
            prompt = f"{system} {message}" if t == 0 and system else message
            requests.append(SampleRequest(prompt, _count(tokenizer, prompt), output_len, conversation=c, turn=t))
    return requests


def _is_valid_sharegpt_pair(prompt_len: int, output_len: int, fixed_output: bool) -> bool:
    """vLLM's filter: drop tiny turns and anything past 1024 prompt / 2048 total tokens."""
    too_short = prompt_len < 4 or (not fixed_output and output_len < 4)
    return not too_short and prompt_len <= 1024 and prompt_len + output_len <= 2048


def sample_sharegpt(
    tokenizer, path: str, num_prompts: int, output_len: int | None = None, seed: int = 0
) -> list[SampleRequest]:
    """First human turn as prompt; the reply's token count as budget unless `output_len` is set."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read ShareGPT file {path}: {e}") from e
    entries = [e for e in entries if len(e.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(entries)
    requests: list[SampleRequest] = []
    for entry in entries:
        if len(requests) == num_prompts:
            break
        prompt = entry["conversations"][0]["value"]
        reply = entry["conversations"][1]["value"]
        prompt_len = _count(tokenizer, prompt)
        budget = output_len if output_len is not None else len(tokenizer.encode(reply))
        if tokenizer is None or _is_valid_sharegpt_pair(prompt_len, budget, output_len is not None):
            requests.append(SampleRequest(prompt, prompt_len, budget))
    if not requests:
        raise DatasetError(f"no usable conversations in {path}")
    return _cycle_to(requests, num_prompts)


def sample_custom(
    tokenizer,
    path: str,
    num_prompts: int,
    output_len: int = 256,
    skip_chat_template: bool = False,
    seed: int = 0,
) -> list[SampleRequest]:
    """A JSONL file of {"prompt": ...} lines; the chat template is applied if the tokenizer has one."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read custom JSONL file {path}: {e}") from e
    if not rows or any("prompt" not in row for row in rows):
        raise DatasetError(f"{path}: every line must be a JSON object with a 'prompt' field")
    random.Random(seed).shuffle(rows)
    use_template = not skip_chat_template and getattr(tokenizer, "chat_template", None)
    requests = []
    for row in rows[:num_prompts]:
        prompt = row["prompt"]
        if use_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        requests.append(SampleRequest(prompt, _count(tokenizer, prompt), output_len))
    return _cycle_to(requests, num_prompts)


def _cycle_to(requests: list[SampleRequest], num_prompts: int) -> list[SampleRequest]:
    """Repeat the prompts in order when the file has fewer than asked for."""
    return [requests[i % len(requests)] for i in range(num_prompts)]


def _check_without_tokenizer(args) -> None:
    """--skip-tokenizer-init: only datasets that need no client-side token counts."""
    why = {"random": "builds prompts of exact token lengths", "prefix_repetition": "builds random prompts",
           "multi_turn": "builds random prompts",
           "sharegpt": "counts the replies' tokens for the budgets (give --sharegpt-output-len)",
           "custom": "applies the chat template (give --custom-skip-chat-template)"}[args.dataset_name]
    if (args.dataset_name in SYNTHETIC or (args.dataset_name == "sharegpt" and args.sharegpt_output_len is None)
            or (args.dataset_name == "custom" and not args.custom_skip_chat_template)):
        raise DatasetError(f"--skip-tokenizer-init: the {args.dataset_name} dataset {why} with a tokenizer")


def _count(tokenizer, text: str) -> int:
    """Prompt tokens by the client's tokenizer; 0 without one (the server's usage replaces it)."""
    return len(tokenizer.encode(text)) if tokenizer is not None else 0


def sample_requests(args, tokenizer) -> list[SampleRequest]:
    """Build the dataset the command line asks for; ids are `<prefix><index>`."""
    if args.num_prompts < 1:
        raise DatasetError("--num-prompts must be at least 1")
    if tokenizer is None:
        _check_without_tokenizer(args)
    if args.dataset_name == "random":
        if args.dataset_path:
            raise DatasetError("--dataset-path cannot be used with --dataset-name random")
        requests = sample_random(
            tokenizer,
            args.num_prompts,
            input_len=args.random_input_len,
            output_len=args.random_output_len,
            range_ratio=args.random_range_ratio,
            prefix_len=args.random_prefix_len,
            seed=args.seed,
        )
    elif args.dataset_name == "prefix_repetition":
        requests = sample_prefix_repetition(
            tokenizer, args.num_prompts, args.prefix_repetition_prefix_len, args.prefix_repetition_suffix_len,
            args.prefix_repetition_num_prefixes, args.prefix_repetition_output_len, args.seed,
        )
    elif args.dataset_name == "multi_turn":
        requests = sample_multi_turn(
            tokenizer, args.num_prompts, args.multi_turn_num_turns, args.multi_turn_system_prompt_len,
            args.multi_turn_user_len, args.multi_turn_output_len, args.seed,
        )
    elif not args.dataset_path:
        raise DatasetError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    elif args.dataset_name == "sharegpt":
        requests = sample_sharegpt(
            tokenizer, args.dataset_path, args.num_prompts, args.sharegpt_output_len, args.seed
        )
    else:
        requests = sample_custom(
            tokenizer,
            args.dataset_path,
            args.num_prompts,
            args.custom_output_len,
            args.custom_skip_chat_template,
            args.seed,
        )
    return [replace(r, request_id=f"{args.request_id_prefix}{i}") for i, r in enumerate(requests)]
