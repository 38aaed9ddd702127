"""Projections and their weight formats: where checkpoint tensors meet the math.

A `Linear` (one dense projection, W [out, in]) or `Experts` (the routed experts, stacked
[E, out, in]) stores its weight in one format, chosen per module before the weights are allocated
(by the loader: from the checkpoint's dtypes, or from `--quantization fp8`):
- dense: the model dtype; y = x W^T.
- fp8: W in float8_e4m3fn with a float32 `weight_scale` (W ≈ float(W_fp8) * weight_scale), one per
  tensor `[]` (ModelOpt; experts `[E]`) or one per output channel `[out]` (experts `[E, out]`).
  Activations are quantized to e4m3 as well: with a static `input_scale` `[]` (ModelOpt's calibrated
  one; for experts the maximum over the experts, as vLLM does) or, without one, per token at run
  time. The math is the ops' `fp8_linear` / `fused_moe` (float32 accumulation, output in the
  activation dtype).

The loader hands every checkpoint tensor to its module's `load(kind, tensor, expert)`. A float
weight loaded into an fp8 module is quantized right there, so online quantization holds one
tensor in high precision at a time, never the model. `checkpoint_tensors` is the inverse (what
`save_checkpoint` writes: ModelOpt names for fp8).

Each module also names how tensor parallelism would cut each of its tensors (`Split`), so a TP
loader can slice at load; TP itself does not exist yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridserve.ops.reference.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_fp8


@dataclass(frozen=True)
class WeightFormat:
    """How one module stores its weight (see the module docstring)."""

    fp8: bool = False
    per_channel: bool = False  # fp8: a weight scale per output channel (else one per tensor / expert)
    static_input: bool = False  # fp8: a calibrated input_scale (else activations are scaled per token)


DENSE = WeightFormat()
FP8_PER_TENSOR = WeightFormat(fp8=True, static_input=True)  # ModelOpt FP8 checkpoints
# --quantization fp8: no calibration data, so activations are scaled per token; per-channel weight
# scales cost the kernels nothing and halve the weight error of per-tensor ones (tests/model/test_fp8.py)
FP8_ONLINE = WeightFormat(fp8=True, per_channel=True)


@dataclass(frozen=True)
class Split:
    """How tensor parallelism cuts one tensor: along `dim` (None: every rank holds all of it). A fused
    projection lists its parts' sizes along dim in `segments`; each part is cut evenly, so rank r holds
    its share of every part (the Mamba in_proj: z | x | B | C | dt). `max_parts`: at most this many
    distinct shards (GQA kv heads); more ranks hold copies."""

    dim: int | None
    segments: tuple[int, ...] | None = None
    max_parts: int | None = None

    def shard(self, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """Rank `rank`'s slice of `tensor` (the whole tensor) among `world` ranks."""
        if self.dim is None or world == 1:
            return tensor
        parts = min(world, self.max_parts or world)
        if world % parts:
            raise ValueError(f"{world} ranks cannot share {parts} shards evenly")
        segments = self.segments or (tensor.shape[self.dim],)
        if sum(segments) != tensor.shape[self.dim] or any(s % parts for s in segments):
            raise ValueError(f"segments {segments} of dim {self.dim} (size {tensor.shape[self.dim]}) "
                             f"do not split into {parts} equal shards")
        part = rank * parts // world
        return torch.cat([seg.chunk(parts, self.dim)[part] for seg in tensor.split(list(segments), self.dim)], self.dim)


REPLICATED = Split(None)
COLUMN = Split(0)  # output features split: no communication until the next row-parallel layer
ROW = Split(1)  # input features split: partial sums all-reduced after the matmul


def quantize_weight(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (e4m3 weight, float32 scale [] or [out]) with w ≈ float(q) * scale: the
    amax of the tensor (or of each row) maps to 448."""
    if per_channel:
        return quantize_fp8(w)
    return quantize_fp8(w, (w.float().abs().amax() / FP8_MAX).clamp_min(MIN_SCALE))


def _fp8_parameter(like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(like.shape, dtype=FP8_DTYPE, device=like.device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (no bias), W [out, in] dense or fp8. `quantizable`: `--quantization fp8` makes it fp8
    (the ModelOpt recipe's choice: Mamba, MLP and expert projections; attention and lm_head stay dense)."""

    KINDS = ("weight", "weight_scale", "input_scale")  # checkpoint suffix = state name

    def __init__(self, in_features: int, out_features: int, split: Split, quantizable: bool = True):
        super().__init__()
        self.split, self.quantizable, self.format = split, quantizable, DENSE
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("weight_scale", None)
        self.register_buffer("input_scale", None)

    def set_format(self, fmt: WeightFormat) -> None:
        """Before the weights are allocated (the model is still on the meta device)."""
        self.format = fmt
        if fmt.fp8:
            w = self.weight
            self.weight = _fp8_parameter(w)
            self.weight_scale = torch.empty(w.shape[:1] if fmt.per_channel else (), device=w.device)
            self.input_scale = torch.empty((), device=w.device) if fmt.static_input else None

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        if self.format.fp8:
            return ops.fp8_linear(x, self.weight, self.weight_scale, self.input_scale)
        return F.linear(x, self.weight)

    @torch.no_grad()
    def load(self, kind: str, tensor: torch.Tensor, expert: int | None = None) -> list[str]:
        """Copy one checkpoint tensor in (kind: weight, weight_scale or input_scale); returns the
        checkpoint kinds it filled. Raises ValueError when the tensor does not fit."""
        if expert is not None or kind not in self.KINDS:
            raise ValueError("unexpected tensor (the model has no such parameter)")
        if kind == "weight":
            return _load_weight(self.weight, self.weight_scale, tensor, self.format, "weight", "weight_scale")
        return [_load_scale(kind, getattr(self, kind), tensor)]

    def checkpoint_tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) pairs of this module."""
        for kind in self.KINDS:
            t = getattr(self, kind)
            if t is not None:
                yield f"{prefix}.{kind}", t

    def split_of(self, kind: str) -> Split:
        """TP split of one checkpoint tensor of this module (kind as in `load`)."""
        if kind == "weight" or (kind == "weight_scale" and self.format.per_channel and self.split.dim == 0):
            return self.split
        return REPLICATED


class Experts(nn.Module):
    """The routed experts, stacked: up_proj [E, I, hidden], down_proj [E, hidden, I] (transformers'
    in-memory names). fp8 adds `{up,down}_proj_weight_scale` [E] or [E, out] and, static, the
    `{up,down}_proj_input_scale` []. Checkpoints hold one tensor per expert (kind
    `{j}.up_proj.weight`, `.weight_scale`, `.input_scale`) or the stacked weights (`up_proj`)."""

    PROJS = ("up_proj", "down_proj")
    SUFFIXES = ("weight", "weight_scale", "input_scale")
    SPLITS = {"up_proj": COLUMN, "down_proj": ROW}  # of one expert's [out, in]: the intermediate dim is cut
    quantizable = True

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.format = DENSE
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        for proj in self.PROJS:
            self.register_buffer(f"{proj}_weight_scale", None)
            self.register_buffer(f"{proj}_input_scale", None)

    @property
    def num_experts(self) -> int:
        return self.up_proj.shape[0]

    def set_format(self, fmt: WeightFormat) -> None:
        """Before the weights are allocated (the model is still on the meta device)."""
        self.format = fmt
        if not fmt.fp8:
            return
        for proj in self.PROJS:
            w = getattr(self, proj)
            setattr(self, proj, _fp8_parameter(w))
            setattr(self, f"{proj}_weight_scale", torch.empty(w.shape[:2] if fmt.per_channel else w.shape[:1], device=w.device))
            setattr(self, f"{proj}_input_scale", torch.empty((), device=w.device) if fmt.static_input else None)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, ops) -> torch.Tensor:
        return ops.fused_moe(
            x, self.up_proj, self.down_proj, topk_weights, topk_ids, self.up_proj_weight_scale,
            self.down_proj_weight_scale, self.up_proj_input_scale, self.down_proj_input_scale,
        )

    @torch.no_grad()
    def load(self, kind: str, tensor: torch.Tensor, expert: int | None = None) -> list[str]:
        """Copy one checkpoint tensor in: expert j's (expert=j, kind `{up,down}_proj.{weight,weight_scale,
        input_scale}`) or the stacked weight of all experts (expert=None, kind `up_proj` / `down_proj`).
        The static input scale is the maximum over the experts' ones. Returns the checkpoint kinds
        filled (`{j}.up_proj.weight`, ...); raises ValueError when the tensor does not fit."""
        if expert is None:
            if kind not in self.PROJS:
                raise ValueError("unexpected tensor (the model has no such parameter)")
            target = getattr(self, kind)
            if list(tensor.shape) != list(target.shape):
                raise ValueError(f"shape {list(tensor.shape)}, the model expects {list(target.shape)}")
            # one expert at a time: quantizing keeps only one expert's float copy
            return [k for j in range(self.num_experts) for k in self.load(f"{kind}.weight", tensor[j], j)]
        proj, _, suffix = kind.partition(".")
        if proj not in self.PROJS or suffix not in self.SUFFIXES:
            raise ValueError("unexpected tensor (the model has no such parameter)")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"unexpected tensor (expert {expert} of {self.num_experts})")
        name = f"{expert}.{kind}"
        weight, scale, input_scale = (getattr(self, s) for s in (proj, f"{proj}_weight_scale", f"{proj}_input_scale"))
        if suffix == "weight":
            return _load_weight(weight[expert], None if scale is None else scale[expert], tensor, self.format,
                                name, f"{expert}.{proj}.weight_scale")
        if suffix == "weight_scale":
            return [_load_scale(name, None if scale is None else scale[expert], tensor)]
        if input_scale is None:
            raise ValueError("unexpected tensor (an input scale of a weight that is not fp8 with static scales)")
        one = torch.zeros_like(input_scale)
        _load_scale(name, one, tensor)
        input_scale.copy_(torch.maximum(input_scale, one))
        return [name]

    def checkpoint_tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, tensor) pairs, one set per expert (ModelOpt names for fp8)."""
        for proj in self.PROJS:
            weight, scale, input_scale = (getattr(self, s) for s in (proj, f"{proj}_weight_scale", f"{proj}_input_scale"))
            for j in range(self.num_experts):
                yield f"{prefix}.{j}.{proj}.weight", weight[j]
                if scale is not None:
                    yield f"{prefix}.{j}.{proj}.weight_scale", scale[j]
                if input_scale is not None:
                    yield f"{prefix}.{j}.{proj}.input_scale", input_scale

    def split_of(self, kind: str) -> Split:
        """TP split of one checkpoint tensor (kind `{j}.{proj}.{suffix}`, one expert's tensor)."""
        _, proj, suffix = kind.split(".")
        split = self.SPLITS[proj]
        if suffix == "weight" or (suffix == "weight_scale" and self.format.per_channel and split.dim == 0):
            return split
        return REPLICATED


def _load_weight(target: torch.Tensor, scale_target: torch.Tensor | None, tensor: torch.Tensor,
                 fmt: WeightFormat, name: str, scale_name: str) -> list[str]:
    """Copy a weight into `target` (a weight or one expert's slice): e4m3 bytes as they are, a float
    weight cast to the model dtype, or quantized into target and scale_target when the module is fp8
    and the tensor is not. Returns the checkpoint kinds filled (name, and scale_name if quantized)."""
    if list(tensor.shape) != list(target.shape):
        raise ValueError(f"shape {list(tensor.shape)}, the model expects {list(target.shape)}")
    if tensor.dtype == FP8_DTYPE and not fmt.fp8:
        raise ValueError("a float8_e4m3 weight for a module that is not fp8")
    if not (tensor.is_floating_point() or tensor.dtype == FP8_DTYPE):
        raise ValueError(f"unsupported dtype {tensor.dtype} (expected a float or float8_e4m3 weight)")
    if fmt.fp8 and tensor.dtype != FP8_DTYPE:
        q, s = quantize_weight(tensor.to(target.device), fmt.per_channel)
        target.copy_(q)
        scale_target.copy_(s)
        return [name, scale_name]
    target.copy_(tensor)
    return [name]


def _load_scale(name: str, target: torch.Tensor | None, tensor: torch.Tensor) -> str:
    """A float32 scale: [] (also [1]) per tensor, or [out] (also [out, 1]) per channel, as the format says."""
    if target is None:
        raise ValueError("unexpected tensor (a scale of a weight that is not fp8)")
    if tensor.numel() != max(target.numel(), 1) or tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported quantization ({tensor.dtype} {list(tensor.shape)}; the weight's format "
                         f"expects {target.numel() if target.dim() else 'one'} float scale{'s' if target.dim() else ''})")
    target.copy_(tensor.reshape(target.shape))
    return name


WEIGHT_MODULES = (Linear, Experts)
