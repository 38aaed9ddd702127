"""Structured-output costs: grammar backends on the CPU, and mask overhead per engine decode step.

  python bench/structured.py backends [--tokenizers tiny synthetic-bpe-131k] [--tokens 200]
      llguidance (what hybridserve uses) against xgrammar (`pip install xgrammar`; skipped if absent):
      per schema, compile time and the median CPU time to compute one sequence's next-token mask
      along a random walk (each step takes a uniformly random allowed token, which reaches deep
      into every grammar), and which schema features each backend compiles.
  python bench/structured.py step [--model nemotron-3-nano-30b-a3b] [--batch 64] [--steps 64]
      The engine on `--model` with `--load-format dummy` weights (the tiny model on a CPU machine):
      mean decode-step time at `--batch` sequences without and with a JSON-schema grammar on every
      sequence; overhead = (with - without) / without (target <= 5 % on the GPU), and the CPU time
      the mask fill took per step (it runs while the forward is in flight).

Each prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

FULL_VOCAB = 131072  # the full-size model's vocabulary
SYNTHETIC_BPE = "synthetic-bpe-131k"  # `byte_level_tokenizer(FULL_VOCAB)`

FEATURES = {  # schema feature -> a schema that needs it
    "nested objects": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}, "required": ["b"]}}, "required": ["a"]},
    "array bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "enum / const": {"type": "object", "properties": {"e": {"enum": ["x", "y"]}, "c": {"const": 3}}},
    "integer range": {"type": "integer", "minimum": -5, "maximum": 120},
    "number range": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "null"}, {"type": "string", "maxLength": 3}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "optional + additionalProperties false": {"type": "object", "properties": {"a": {"type": "integer"},
                                              "b": {"type": "string"}}, "required": ["a"],
                                              "additionalProperties": False},
    "string length": {"type": "string", "minLength": 2, "maxLength": 8},
    "string pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string format (date)": {"type": "string", "format": "date"},
    "$defs / $ref": {"$defs": {"N": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/N"}},
    "recursive $ref": {"$defs": {"T": {"type": "object", "properties": {"kids": {"type": "array", "items": {
        "$ref": "#/$defs/T"}}}}}, "$ref": "#/$defs/T"},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"a": {"minimum": 3}}}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
}

WALK_SCHEMAS = {  # the timed ones: typical response_format schemas, small to large
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]},
    "nested+enum": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                  "size": {"enum": ["small", "medium", "large"]}},
                 "required": ["name", "size"], "additionalProperties": False},
        "districts": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "population": {"type": "integer", "minimum": 0, "maximum": 100000}},
            "required": ["name", "population"]}, "minItems": 1, "maxItems": 8}},
        "required": ["city", "districts"], "additionalProperties": False},
    "wide (40 fields)": {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "null"]}
                                                          for i in range(40)},
                         "required": [f"field_{i}" for i in range(0, 40, 2)]},
}


def byte_level_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer of `vocab_size` tokens with the presets' special and tag tokens at
    their ids: the 256 bytes, then made-up pieces shaped like a real 131k vocabulary's (words with
    and without a leading space, digit runs, JSON punctuation, indentation, multi-byte letters).
    The full-size preset's own tokenizer is word-level ("w123"): it cannot spell JSON at all."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    from hybridserve.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, wrap

    alphabet = ByteLevel.alphabet()
    to_unicode = {b: c for b, c in zip(sorted(bytes(range(256))), _gpt2_byte_chars())}
    assert set(to_unicode.values()) == set(alphabet)
    fixed = {**SPECIAL_TOKENS, **TAG_TOKENS}
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7, 7, 6, 6, 6, 5, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1.5, 1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
    punct = ['"', ":", ",", "{", "}", "[", "]", '":', '",', '"}', "},", "],", '{"', '["', ": ", ", ", "\n", "\"",
             ".", "-", "_", "(", ")", "'", "/", "=", "+", "*", "#", "<", ">"]
    pieces = {bytes([b]) for b in range(256)}
    while len(pieces) < vocab_size - len(fixed):
        r = rng.random()
        if r < 0.75:
            word = "".join(rng.choices(letters, weights, k=rng.randint(2, 10)))
            word = word.capitalize() if rng.random() < 0.15 else word
            piece = (" " if rng.random() < 0.6 else "") + word
        elif r < 0.85:
            piece = "".join(rng.choices("0123456789", k=rng.randint(1, 3)))
        elif r < 0.93:
            piece = "".join(rng.choices(punct, k=rng.randint(1, 3)))
        elif r < 0.97:
            piece = "\n" + " " * rng.randint(1, 16)
        else:
            piece = "".join(chr(rng.randint(0x400, 0x9FFF)) for _ in range(rng.randint(1, 2)))
        pieces.add(piece.encode())
    ordered = iter(sorted(pieces, key=lambda p: (len(p), p)))
    vocab = {}
    for i in range(vocab_size):
        vocab[fixed[i] if i in fixed else "".join(to_unicode[b] for b in next(ordered))] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS.values()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return wrap(tok)


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _table(header: list[str], rows: list[list]) -> str:
    cols = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, cols))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in cols]), *map(line, rows)])


class _Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        from hybridserve.structured import grammars
        from hybridserve.structured.compiler import GrammarCompiler

        self.grammars = grammars
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_ids, cache_size=0)
        self.vocab_size = vocab_size
        t0 = time.perf_counter()
        self.compiler._lltokenizer = self.compiler._build_lltokenizer()
        self.tokenizer_s = time.perf_counter() - t0

    def compile(self, schema: dict):
        spec = self.grammars.build_spec(self.grammars.json_schema(schema), "json")
        return self.compiler._compile(spec).matcher()

    def walk(self, matcher, rng: random.Random, max_tokens: int) -> list[float]:
        import torch

        from hybridserve.structured.bitmask import bitmask_width

        mask = torch.empty(bitmask_width(self.vocab_size), dtype=torch.int32)
        times = []
        for _ in range(max_tokens):
            t0 = time.perf_counter()  # one sequence, on this thread (the engine batches on llguidance's pool)
            matcher.llmatcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            times.append(time.perf_counter() - t0)
            token = _pick(mask, self.vocab_size, rng)
            if token is None or matcher.accept(token):
                break
        return times


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar

        self.xgr = xgrammar
        self.vocab_size = vocab_size
        t0 = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.tokenizer_s = time.perf_counter() - t0

    def compile(self, schema: dict):
        return self.xgr.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def walk(self, matcher, rng: random.Random, max_tokens: int) -> list[float]:
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for _ in range(max_tokens):
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t0)
            token = _pick(bitmask[0], self.vocab_size, rng)
            if token is None or not matcher.accept_token(token) or matcher.is_terminated():
                break
        return times


def _pick(words, vocab_size: int, rng: random.Random) -> int | None:
    """A uniformly random allowed token of one bitmask row, or None when none is allowed."""
    import torch

    bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(-1)[:vocab_size].nonzero().flatten().tolist()
    return rng.choice(allowed) if allowed else None


def _backends(tokenizer_names: list[str], max_tokens: int, seed: int) -> dict:
    from hybridserve.config import ModelConfig
    from hybridserve.tokenizer import PRESETS_DIR, load_tokenizer

    results = {"walk": [], "coverage": {}}
    for tname in tokenizer_names:
        if tname == SYNTHETIC_BPE:
            tok, vocab = byte_level_tokenizer(FULL_VOCAB), FULL_VOCAB
        else:
            tok, vocab = load_tokenizer(tname), ModelConfig.from_hf(PRESETS_DIR / tname).vocab_size
        stop = [tok.convert_tokens_to_ids("<|im_end|>")] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        backends = [_Llguidance(tok, vocab, stop)]
        try:
            backends.append(_Xgrammar(tok, vocab, stop))
        except ImportError:
            print("xgrammar is not installed: llguidance only", file=sys.stderr)
        for b in backends:
            print(f"{tname} ({vocab} tokens): {b.name} tokenizer setup {b.tokenizer_s:.2f} s", file=sys.stderr)
            for sname, schema in WALK_SCHEMAS.items():
                t0 = time.perf_counter()
                matcher = b.compile(schema)
                compile_ms = 1e3 * (time.perf_counter() - t0)
                times = b.walk(matcher, random.Random(seed), max_tokens)
                results["walk"].append(dict(tokenizer=tname, vocab=vocab, backend=b.name, schema=sname,
                                            compile_ms=round(compile_ms, 2), tokens=len(times),
                                            mask_us_median=round(1e6 * statistics.median(times), 1),
                                            mask_us_p99=round(1e6 * sorted(times)[int(0.99 * (len(times) - 1))], 1)))
            if tname == tokenizer_names[0]:
                cover = results["coverage"].setdefault(b.name, {})
                for feature, schema in FEATURES.items():
                    try:
                        b.walk(b.compile(schema), random.Random(seed), 50)
                        cover[feature] = "yes"
                    except Exception as e:  # the backend's own refusal, shown short
                        cover[feature] = "no: " + str(e).split("\n")[0][:60]
    header = ["tokenizer", "backend", "schema", "compile ms", "tokens", "mask us/token (median)", "p99 us"]
    print(_table(header, [[r["tokenizer"], r["backend"], r["schema"], r["compile_ms"], r["tokens"],
                           r["mask_us_median"], r["mask_us_p99"]] for r in results["walk"]]))
    names = list(results["coverage"])
    print()
    print(_table(["feature", *names], [[f, *(results["coverage"][n][f] for n in names)] for f in FEATURES]))
    return results


def _step(model: str, batch: int, steps: int, seed: int) -> dict:
    import torch

    from hybridserve import LLM
    from hybridserve.sampling_params import SamplingParams
    from hybridserve.structured import bitmask, grammars

    cuda = torch.cuda.is_available()
    if not cuda:
        model = "tiny"
    extra = {} if cuda else {"device": "cpu"}
    if model != "tiny":  # dummy weights, and a byte-level tokenizer of the model's vocabulary (see above)
        tok_dir = tempfile.mkdtemp(prefix="hybridserve-bpe-")
        byte_level_tokenizer(FULL_VOCAB).save_pretrained(tok_dir)
        extra.update(load_format="dummy", tokenizer=tok_dir)
    llm = LLM(model=model, max_num_seqs=batch, max_model_len=2048, **extra)
    engine = llm.engine
    schema = {"type": "object", "properties": {"story": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["story", "n"]}  # an unbounded string: every sequence stays in the grammar
    structured = grammars.build_spec(grammars.json_schema(schema), "json")
    fill_s: list[float] = []
    real_fill = bitmask.fill_bitmasks

    def timed_fill(*args):
        t0 = time.perf_counter()
        out = real_fill(*args)
        fill_s.append(time.perf_counter() - t0)
        return out

    import hybridserve.engine.engine_core as core_module

    core_module.fill_bitmasks = timed_fill
    rows = {}
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    for label, spec in [("plain", None), ("json schema", structured)] * 2:  # the first round warms up
        params = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=seed, ignore_eos=True, structured=spec)
        for i in range(batch):
            engine.add_request(f"{label}-{i}", [rng.randrange(20, vocab - 10) for _ in range(32)], params)
        times = []
        fill_s.clear()
        while engine.has_unfinished():
            t0 = time.perf_counter()  # no device sync here: with overlapped scheduling the fill hides behind the forward
            engine.step()
            st = engine.stats()
            if st.num_running == batch and st.num_waiting == 0:
                times.append(time.perf_counter() - t0)
        rows[label] = dict(step_ms=1e3 * statistics.median(times[2:]), decode_steps=len(times),
                           fill_ms=1e3 * statistics.median(fill_s) if fill_s else 0.0)
    overhead = rows["json schema"]["step_ms"] / rows["plain"]["step_ms"] - 1
    print(_table(["run", "decode step ms (median)", "mask fill ms (median)", "steps"],
                 [[k, f"{v['step_ms']:.2f}", f"{v['fill_ms']:.3f}", v["decode_steps"]] for k, v in rows.items()]))
    print(f"mask overhead per decode step at batch {batch}: {100 * overhead:.1f} % (target <= 5 %)")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return dict(model=model, device=device, batch=batch, runs=rows, overhead=round(overhead, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backends")
    b.add_argument("--tokenizers", nargs="+", default=["tiny", SYNTHETIC_BPE], help=f"preset names or {SYNTHETIC_BPE}")
    b.add_argument("--tokens", type=int, default=200, help="longest walk per schema")
    s = sub.add_parser("step")
    s.add_argument("--model", default="nemotron-3-nano-30b-a3b")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--steps", type=int, default=64)
    for p in (b, s):
        p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.what == "backends":
        out = _backends(args.tokenizers, args.tokens, args.seed)
    else:
        out = _step(args.model, args.batch, args.steps, args.seed)
    print(json.dumps({"bench": f"structured_{args.what}", **out}))


if __name__ == "__main__":
    main()
