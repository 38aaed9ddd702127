"""`hybridserve generate`: offline generation from the command line, with a progress bar.

    hybridserve generate tiny --prompt "Hello" --max-tokens 32 --device cpu
    hybridserve generate /ckpt --prompts-file prompts.txt --temperature 0.6 --output out.jsonl

Engine flags are made from EngineConfig's fields (`--max-num-seqs`, `--device`, ...) as for `serve`,
and MODEL may be a hub id (`--revision`, `--download-dir`). Prints
each completion (or writes JSON lines with --output). Registered by `hybridserve/cli.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from hybridserve.compat_flags import add_compat_flags, compat_effects
from hybridserve.config import EngineConfig
from hybridserve.config_flags import add_config_flags, config_from_args
from hybridserve.hub import HubOptions, resolve


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="offline batch generation", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory, Hugging Face hub id, or preset name")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--output", help="write JSON lines here instead of printing")
    add_config_flags(p.add_argument_group("model source"), HubOptions)
    add_config_flags(p.add_argument_group("engine"), EngineConfig)
    add_compat_flags(p, serve=False)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from hybridserve.engine.llm import LLM
    from hybridserve.sampling_params import SamplingParams

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("hybridserve generate: give --prompt or --prompts-file", file=sys.stderr)
        return 2
    try:
        for effect in compat_effects(args):
            print(f"hybridserve generate: vLLM compatibility flag {effect}", file=sys.stderr)
        hub = config_from_args(HubOptions, args)
        model = resolve(args.model, hub, weights=args.load_format == "auto")
        tokenizer = resolve(args.tokenizer, hub, weights=False) if args.tokenizer else None
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            n=args.n, seed=args.sampling_seed, ignore_eos=args.ignore_eos, stop=args.stop,
        )
        config = config_from_args(EngineConfig, args, model=model, tokenizer=tokenizer)
        llm = LLM(model, **{k: v for k, v in dataclasses.asdict(config).items() if k != "model"})
        outputs = llm.generate(prompts, params, use_tqdm=True)
    except ValueError as e:
        print(f"hybridserve generate: {e}", file=sys.stderr)
        return 2
    sink = open(args.output, "w") if args.output else None
    try:
        for prompt, out in zip(prompts, outputs):
            for choice in out.outputs:
                record = {"prompt": prompt, "index": choice.index, "text": choice.text,
                          "token_ids": choice.token_ids, "finish_reason": choice.finish_reason}
                if sink:
                    sink.write(json.dumps(record) + "\n")
                else:
                    print(f"--- {prompt!r} [{choice.index}] ({choice.finish_reason})\n{choice.text}")
    finally:
        if sink:
            sink.close()
    return 0
