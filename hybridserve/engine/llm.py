"""LLM: offline batch generation with the engine core in this process (no sockets, no server).

    llm = LLM(model="tiny", device="cpu")
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .finish_reason

Prompts are strings (tokenized here, no chat template) or token-id lists; all are queued at once
and the engine batches them continuously. Outputs come back in prompt order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hybridserve.config import EngineConfig, ModelConfig
from hybridserve.engine.engine_core import EngineCore
from hybridserve.engine.output_processor import OutputProcessor
from hybridserve.engine.outputs import RequestOutput
from hybridserve.sampling_params import SamplingParams

Prompt = str | list[int]


def end_of_turn_token_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's `<|im_end|>` id, if it has one: a stop token besides the model's eos."""
    if tokenizer is None:
        return ()
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return () if tid is None or tid == tokenizer.unk_token_id else (int(tid),)


class LLM:
    def __init__(self, model: str = "tiny", *, model_instance=None, **engine_config_fields) -> None:
        """model: checkpoint directory or preset name; engine_config_fields: any EngineConfig field
        (device, max_num_seqs, max_num_batched_tokens, cpu_cache_bytes, ...). model_instance: an
        already built model (tests)."""
        from hybridserve.tokenizer import load_tokenizer

        self.config = EngineConfig(model=model, **engine_config_fields)
        self.model_config = ModelConfig.from_hf(self.config.model)
        self.tokenizer = load_tokenizer(self.config.tokenizer or self.config.model)
        self.engine = EngineCore(
            self.config, self.model_config, extra_stop_token_ids=end_of_turn_token_ids(self.tokenizer),
            model=model_instance,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished RequestOutput per prompt, in order.
        Invalid parameters or a prompt that can never fit raise ValueError before anything runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        requests = []
        for prompt, params in zip(prompts, params_list):
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
            self.engine.check_request(token_ids, params)
            requests.append((f"llm-{next(self._ids)}", token_ids, params, prompt if isinstance(prompt, str) else None))
        for request_id, token_ids, params, text in requests:
            self.engine.add_request(request_id, token_ids, params)
            self.output_processor.add_request(request_id, token_ids, params, text)
        return self._run([r[0] for r in requests], use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="generate", unit="req")
        while self.engine.has_unfinished():
            for engine_output in self.engine.step():
                out, stopped = self.output_processor.process(engine_output)
                if stopped:
                    self.engine.abort(engine_output.request_id, stopped)
                if out is not None and out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[r] for r in request_ids]
