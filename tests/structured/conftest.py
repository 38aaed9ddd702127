"""Shared by the structured-output tests: the tiny tokenizer, a compiler over it, a varied schema
suite, and `walk`: random decoding under a grammar with no model (each step picks uniformly among
the tokens the mask allows), a harsher test than any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridserve.structured.bitmask import fill_bitmasks
from hybridserve.structured.compiler import GrammarCompiler
from hybridserve.structured.spec import StructuredSpec
from hybridserve.tokenizer import load_tokenizer

STOP_IDS = (2, 11)  # </s>, <|im_end|>

# nested objects, bounded arrays, enums, integer ranges, anyOf, optional fields, additionalProperties
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "age", "address"], "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
                                "maxItems": 3},
                       "scores": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                                  "maxItems": 4}},
        "required": ["tags", "scores"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"type": "boolean"},
                                           {"type": "null"}, {"enum": ["n/a"]}]},
                       "note": {"type": "string", "maxLength": 5}},
        "required": ["value"], "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000},
                       "flag": {"type": "boolean"}, "level": {"enum": ["low", "mid", "high"]},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["id"], "additionalProperties": False,
    },
    "defs_and_refs": {  # what pydantic emits for nested models
        "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 4},
                                                            "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                           "required": ["sku", "qty"], "additionalProperties": False}},
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1, "maxItems": 2},
                       "status": {"const": "ok"}},
        "required": ["items", "status"], "additionalProperties": False,
    },
}


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def compiler(tokenizer):
    c = GrammarCompiler(tokenizer, len(tokenizer), STOP_IDS)
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def walk(compiler, tokenizer):
    def run(spec: StructuredSpec, seed: int, max_tokens: int = 400, forced: dict[int, int] | None = None,
            force=None) -> tuple[list[int], bool]:
        """Random tokens the grammar allows until it is complete; (tokens, complete). forced:
        {step: token} replaces the pick at those steps; force(tokens) -> token or None, likewise
        where the grammar allows it (as the thinking budget does)."""
        matcher = compiler.submit(spec).result().matcher()
        rng = np.random.default_rng(seed)
        tokens = []
        for step in range(max_tokens):
            masks = fill_bitmasks([matcher], torch.device("cpu")).masks
            bits = np.unpackbits(masks[0].numpy().view(np.uint8), bitorder="little")[: len(tokenizer)]
            allowed = np.flatnonzero(bits)
            assert len(allowed), "the grammar allows no token"
            wanted = (forced or {}).get(step) or (force and force(tokens))
            if wanted is not None and not bits[wanted] and forced is None:
                wanted = None  # as the engine does: a forced token waits until the grammar allows it
            token = wanted if wanted is not None else int(rng.choice(allowed))
            tokens.append(token)
            if token in STOP_IDS:
                return tokens, matcher.is_complete
            if matcher.accept(token):
                assert not matcher.failed
                return tokens, True
        return tokens, False

    return run


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in STOP_IDS])
