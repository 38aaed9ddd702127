"""Model weights in and out: Hugging Face safetensors checkpoints, dummy weights, FP8 (ModelOpt).

`load_model` is what the engine calls. It decides every projection's weight format (from the
checkpoint's tensors, or `quantization`), allocates the model once on its device in those formats,
and hands the checkpoint to it tensor by tensor, each to its module's `load` (the real model is
63 GB in bf16: no second copy ever exists). Every tensor must be filled exactly by the files, or
loading stops with a `CheckpointError` naming the tensor — nothing half-loads silently.

On-disk names are the HF ones (`backbone.layers.{i}.mixer...`, `backbone.norm_f`, `lm_head`;
transformers' in-memory `model.` prefix is accepted too). Routed experts are stored one tensor per
expert (`experts.{j}.up_proj.weight`) and stacked into `experts.up_proj [E, I, hidden]`;
already-stacked `experts.up_proj` is accepted. `mtp.*` tensors are ignored.

FP8 (ModelOpt, model spec §3.3): a projection is fp8 iff its `.weight` is float8_e4m3 with a
`.weight_scale` next to it (one float per tensor, or one per output channel), decided per module
from the file; its `.input_scale` (if any) is the static activation scale. The weights stay fp8 in
memory and run through the fp8 ops. KV-cache scales (`k_proj.k_scale`, `v_proj.v_scale`) are
loaded when present (an fp8 KV cache uses them; 1.0 otherwise).

`quantization="fp8"` quantizes the quantizable projections of a BF16 (or dummy) model as they are
loaded (model/linear.py); with a ModelOpt FP8 checkpoint the file's formats stand.

`save_checkpoint` writes the same format (tests, trained tiny models, fp8 models as ModelOpt files).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from hybridserve.config import LOAD_FORMATS, QUANTIZATIONS, ModelConfig
from hybridserve.model.linear import FP8_ONLINE, WEIGHT_MODULES, WeightFormat
from hybridserve.model.nemotron_h import LOADING_MODULES, NemotronHForCausalLM

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
QUANT_CONFIG_FILE = "hf_quant_config.json"
FLOAT_DTYPES = {"BF16", "F16", "F32"}
_EXPERT = re.compile(r"^(?P<path>.*\.experts)\.(?P<j>\d+)\.(?P<kind>(up|down)_proj\.(weight|weight_scale|input_scale))$")
_STACKED = re.compile(r"^(?P<path>.*\.experts)\.(?P<kind>up_proj|down_proj)$")
# KV-cache scales: ModelOpt's `mixer.k_proj.k_scale`, also seen as `mixer.k_scale`
_KV_SCALE = re.compile(r"^(?P<path>.*\.mixer)\.(?:[kv]_proj\.)?(?P<kind>[kv])_scale$")
_MTP = re.compile(r"^((backbone|model)\.)?mtp\.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the tensor and the problem."""


def load_model(
    config: ModelConfig,
    load_format: str = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    quantization: str | None = None,
) -> NemotronHForCausalLM:
    """The model with its weights: from `config.path`'s safetensors files, or random ("dummy", and
    presets, which have no files). dtype defaults to the config's torch_dtype (fp8 projections keep
    that dtype for activations). quantization: None, "fp8" (quantize BF16 projections at load) or
    "modelopt" (the checkpoint must be ModelOpt FP8). On the meta device dummy weights stay
    unallocated (shapes only)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, not {load_format!r}")
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, not {quantization!r}")
    dtype = dtype or getattr(torch, config.torch_dtype)
    if load_format == "auto" and not config.has_weights and config.preset is None:
        raise CheckpointError(f"{config.path}: no *.safetensors files (use load_format='dummy' for random weights)")
    from_files = load_format == "auto" and config.has_weights
    with ExitStack() as stack:
        files = None
        if from_files:
            _check_quantization(Path(config.path))
            files = stack.enter_context(_Files(_tensor_files(Path(config.path))))
        skeleton = NemotronHForCausalLM(config, dtype, "meta")  # names and shapes, nothing allocated
        formats = _weight_formats(skeleton, files, quantization)
        check_weights_fit(config, dtype, formats, device)
        model = NemotronHForCausalLM(config, dtype, device, formats)
        if load_format == "dummy-uniform":
            model.init_uniform(seed)
        elif files is None:
            if torch.device(device).type != "meta":
                model.init_random(seed)
        else:
            _load_tensors(model, files)
    _log_weights(model)
    return model.eval()


def check_weights_fit(config: ModelConfig, dtype: torch.dtype, formats: dict[str, WeightFormat],
                      device: torch.device | str) -> None:
    """Refuse, before anything is allocated, weights larger than the GPU's free memory (the
    full-size model needs ~59 GiB in bf16): a clear error instead of an out-of-memory mid-load."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    shapes = NemotronHForCausalLM(config, dtype, "meta", formats)  # the real module tree, no memory
    need = sum(t.numel() * t.element_size() for t in [*shapes.parameters(), *shapes.buffers()])
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise MemoryError(f"the model's weights need {need / 2**30:.1f} GiB but {device} has {free / 2**30:.1f} GiB "
                          f"free of {total / 2**30:.1f} GiB: free the GPU, or use a card with more memory")


def _weight_formats(skeleton: NemotronHForCausalLM, files: _Files | None,
                    quantization: str | None) -> dict[str, WeightFormat]:
    """Module name -> format of the projections that are not dense."""
    formats = {} if files is None else _checkpoint_formats(skeleton, files)
    if quantization == "modelopt" and not formats:
        raise CheckpointError("quantization 'modelopt': the checkpoint has no ModelOpt FP8 weights "
                              "(quantization 'fp8' quantizes a BF16 checkpoint at load)")
    if quantization == "fp8" and not formats:  # a ModelOpt FP8 checkpoint keeps its own formats
        formats = {name: FP8_ONLINE for name, m in skeleton.named_modules()
                   if isinstance(m, WEIGHT_MODULES) and m.quantizable}
    return formats


def _checkpoint_formats(skeleton: NemotronHForCausalLM, files: _Files) -> dict[str, WeightFormat]:
    """The fp8 projections of a checkpoint: every float8_e4m3 `.weight` with its `.weight_scale`
    (shape [] / [1]: per tensor, [out] / [out, 1]: per channel) and, if present, `.input_scale`."""
    modules = dict(skeleton.named_modules())
    formats: dict[str, WeightFormat] = {}
    for name in files.names:
        if files.dtype(name) != "F8_E4M3" or _MTP.match(name):
            continue
        path, kind, expert = _route(name)
        module = modules.get(path)
        scale_name = name[: -len("weight")] + "weight_scale"
        if not isinstance(module, WEIGHT_MODULES) or not kind.endswith("weight") or scale_name not in files.names:
            raise CheckpointError(f"{name}: float8_e4m3 tensor without a {scale_name} (unsupported quantization)")
        out = files.shape(name)[0]
        scale_shape = files.shape(scale_name)
        if scale_shape not in ([], [1], [out], [out, 1]):
            raise CheckpointError(f"{scale_name}: unsupported quantization (scale of shape {scale_shape}; "
                                  f"expected one per tensor or one per output channel, {out})")
        fmt = WeightFormat(fp8=True, per_channel=scale_shape in ([out], [out, 1]) and out > 1,
                           static_input=name[: -len("weight")] + "input_scale" in files.names)
        if formats.setdefault(path, fmt) != fmt:
            raise CheckpointError(f"{name}: unsupported quantization (its format {fmt} differs from the "
                                  f"rest of {path}: {formats[path]})")
    return formats


def _route(name: str) -> tuple[str, str, int | None]:
    """Checkpoint name -> (module path, kind within that module, expert row or None)."""
    if name.startswith("model."):
        name = "backbone." + name[len("model.") :]
    m = _EXPERT.match(name)
    if m:
        return m["path"], m["kind"], int(m["j"])
    m = _STACKED.match(name) or _KV_SCALE.match(name)
    if m and m.re is _KV_SCALE:
        return m["path"], f"{m['kind']}_proj.{m['kind']}_scale", None
    if m:
        return m["path"], m["kind"], None
    path, _, kind = name.rpartition(".")
    return path, kind, None


@torch.no_grad()
def _load_tensors(model: NemotronHForCausalLM, files: _Files) -> None:
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: set[str] = set()  # checkpoint names filled
    for name in tqdm(files.names, desc="loading weights", unit="tensor", mininterval=1.0):
        if _MTP.match(name):
            continue
        if name.endswith(".weight_scale_2"):
            raise CheckpointError(f"{name}: unsupported quantization (NVFP4 two-level scales)")
        dtype = files.dtype(name)
        if dtype not in FLOAT_DTYPES and dtype != "F8_E4M3":
            raise CheckpointError(f"{name}: unsupported dtype {dtype} (expected BF16, F16, F32 or F8_E4M3)")
        path, kind, expert = _route(name)
        module = modules.get(path)
        try:
            if isinstance(module, LOADING_MODULES):
                filled = {f"{path}.{k}" for k in module.load(kind, files.tensor(name), expert)}
            else:
                filled = {_load_parameter(params, name, files)}
        except ValueError as e:
            raise CheckpointError(f"{name}: {e}") from None
        if filled & loaded:
            raise CheckpointError(f"{name}: {sorted(filled & loaded)[0]} is given twice in the checkpoint")
        loaded |= filled
    expected = [name for name, _ in model.checkpoint_tensors()]
    if model.config.tie_word_embeddings and "lm_head.weight" not in loaded and "backbone.embeddings.weight" in loaded:
        # configs with tie_word_embeddings may omit lm_head.weight: it is the embedding table
        loaded |= {f"lm_head.{k}" for k in model.lm_head.load("weight", model.backbone.embeddings.weight)}
    missing = [name for name in expected if name not in loaded]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")


def _load_parameter(params: dict[str, torch.nn.Parameter], name: str, files: _Files) -> str:
    """A tensor that is one plain parameter (norms, conv, router, embeddings, SSM parameters)."""
    key = "backbone." + name[len("model.") :] if name.startswith("model.") else name
    param = params.get(key)
    if param is None:
        raise ValueError("unexpected tensor (the model has no such parameter)")
    if files.shape(name) != list(param.shape):
        raise ValueError(f"shape {files.shape(name)}, the model expects {list(param.shape)}")
    if files.dtype(name) not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {files.dtype(name)} for a parameter that is not an fp8 projection")
    param.copy_(files.tensor(name))
    return key


def _log_weights(model: NemotronHForCausalLM) -> None:
    """One line: weight memory on the device and how many projections are fp8."""
    nbytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    formats = model.weight_formats().values()
    fp8 = sum(f.fp8 for f in formats)
    kind = "" if not fp8 else (" per-channel" if any(f.per_channel for f in formats) else " per-tensor")
    acts = "" if not fp8 else (", static activation scales" if any(f.static_input for f in formats)
                               else ", per-token activation scales")
    logger.info("weights: %.2f GiB on %s (%d of %d projections fp8%s%s, the rest %s)", nbytes / 2**30, model.device,
                fp8, len(formats), kind, acts, str(model.dtype).replace("torch.", ""))


class _Files:
    """Open safetensors files, by tensor name; each file is opened once, on first use."""

    def __init__(self, where: dict[str, Path]):
        self.where, self.names = where, where.keys()
        self._stack, self._open = ExitStack(), {}

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, name: str):
        path = self.where[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def dtype(self, name: str) -> str:
        return self._file(name).get_slice(name).get_dtype()

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Every tensor name -> the file holding it (from the shard index, else from each file's header)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        where = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(where.values())):
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {file.name} does not exist")
        return where
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"{name}: in both {where[name].name} and {file.name}")
                where[name] = file
    return where


def _check_quantization(directory: Path) -> None:
    """Refuse quantization schemes other than ModelOpt FP8 (the tensors decide the rest)."""
    algo = None
    hf_quant = directory / QUANT_CONFIG_FILE
    if hf_quant.is_file():
        algo = json.loads(hf_quant.read_text()).get("quantization", {}).get("quant_algo")
    elif (directory / "config.json").is_file():
        qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
        algo = qc.get("quant_algo") or qc.get("quant_method")
        if algo == "modelopt":
            algo = "FP8"
    if algo is not None and str(algo).upper() != "FP8":
        raise CheckpointError(
            f"{directory}: unsupported quantization {algo!r} (supported: none, or FP8 as ModelOpt writes it)"
        )


def save_checkpoint(
    model: NemotronHForCausalLM,
    directory: str | Path,
    tokenizer=None,
    shard_size: int | None = None,
) -> None:
    """Write `model` as a Hugging Face checkpoint: safetensors with per-expert HF names (sharded with
    an index when `shard_size` bytes are exceeded), config.json, and the tokenizer's files if given.
    fp8 projections are written as ModelOpt does (e4m3 weights, scales, input and KV-cache scales)
    with an `hf_quant_config.json` naming the projections that stay dense."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in model.checkpoint_tensors():
        nbytes = t.numel() * t.element_size()
        if shard_size is not None and shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        # clone: expert rows are views of one stacked tensor, and safetensors refuses shared storage
        tensors = {name: t.detach().to("cpu").clone().contiguous() for name, t in shard}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config_dict(model.config, model.dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    formats = model.weight_formats()
    if any(f.fp8 for f in formats.values()):
        kv_scales = any(name.endswith((".k_scale", ".v_scale")) for name in weight_map)
        quant = {"producer": {"name": "hybridserve"},
                 "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if kv_scales else None,
                                  "exclude_modules": sorted(name for name, f in formats.items() if not f.fp8)}}
        (directory / QUANT_CONFIG_FILE).write_text(json.dumps(quant, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json content for `config`: the source config.json's keys (when there is one), with
    every value we know written over them; quantization dropped (save_checkpoint describes it in
    hf_quant_config.json)."""
    raw = {}
    if config.path is not None and (Path(config.path) / "config.json").is_file():
        raw = json.loads((Path(config.path) / "config.json").read_text())
    for key in ("quantization_config", "layers_block_type", "dtype"):
        raw.pop(key, None)
    skip = {"layer_types", "quantization", "path", "preset", "eos_token_id"}
    raw.update({f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip})
    eos = list(config.eos_token_id)
    raw.update(
        architectures=["NemotronHForCausalLM"],
        model_type="nemotron_h",
        hybrid_override_pattern=config.layer_types,
        num_hidden_layers=config.num_layers,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        torch_dtype=str(dtype).replace("torch.", ""),
    )
    return raw
