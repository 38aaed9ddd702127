"""Constrained decoding (structured outputs, guaranteed tool calls) with llguidance.

API side: `grammars` and `tool_grammar` turn a request's constraint into one llguidance grammar
string, validated before anything is queued, carried to the engine as `SamplingParams.structured`
(a `StructuredSpec`). Engine side: `compiler` builds matchers off the engine loop (a worker
thread, cached by grammar), `matcher` keeps one per sequence, and `bitmask` fills the step's token
masks on the CPU and applies them to the logits on the device.
"""
