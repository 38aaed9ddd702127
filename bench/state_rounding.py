"""Accuracy of a 16-bit Mamba SSM state against the float32 state, on a briefly trained tiny model.

The tiny preset is trained for a few hundred Adam steps on a synthetic corpus whose next token
depends on a hidden per-sequence topic, so the model has to carry the topic in its state over the
whole sequence. Then, per state format (float32; bfloat16 and float16, each rounded to nearest or
stochastically), over `--prompts` prompts at once:
- teacher-forced: the float32 run's greedy generation of `--tokens` tokens is fed back and the
  logits at every position are compared with the float32 run's (relative L2 error, top-1 agreement),
  and the SSM state at the end (relative error);
- free-running: greedy decoding on its own, token agreement with the float32 generation and the
  first position where it differs.
On CPU the model runs the reference ops, on CUDA the Triton kernels (`--device`).

Usage: python bench/state_rounding.py [--tokens 1024] [--prompts 4] [--train-steps 300] [--device cpu]
       [--cache-dir DIR] [--json-out PATH]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridserve.config import ModelConfig
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.loader import load_model, save_checkpoint
from hybridserve.model.nemotron_h import NemotronHForCausalLM
from hybridserve.ops import get_ops

FORMATS = {  # name -> (state dtype, stochastic rounding)
    "float32": (torch.float32, False),
    "bfloat16 nearest": (torch.bfloat16, False),
    "bfloat16 stochastic": (torch.bfloat16, True),
    "float16 nearest": (torch.float16, False),
    "float16 stochastic": (torch.float16, True),
}
ROUNDING_SEED = 7
BLOCK = 16


# ------------------------------------------------------------------------------------ the corpus


class TopicCorpus:
    """Sequences of a hidden topic's Markov chain: each topic has its own few likely successors of every
    token, so the next token depends on the previous one and on a topic seen only through the context."""

    def __init__(self, vocab: int, topics: int = 4, successors: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.first = vocab, 3  # ids 0-2 are pad / bos / eos
        n = vocab - self.first
        self.next_ids = torch.randint(0, n, (topics, n, successors), generator=gen) + self.first
        self.probs = torch.tensor([0.7, 0.2, 0.1][:successors])

    def sample(self, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
        topics = torch.randint(0, self.next_ids.shape[0], (count,), generator=gen)
        tok = torch.randint(self.first, self.vocab, (count,), generator=gen)
        seqs = [tok]
        for _ in range(length - 1):
            pick = torch.multinomial(self.probs.expand(count, -1), 1, generator=gen)[:, 0]
            tok = self.next_ids[topics, tok - self.first, pick]
            seqs.append(tok)
        return torch.stack(seqs, 1)  # [count, length]


# ----------------------------------------------------------------------------------- training


def _prefill_batch(model, seqs: list[list[int]], device) -> tuple[ForwardBatch, HybridCache]:
    n = len(seqs)
    pages = max(len(s) for s in seqs) // BLOCK + 1
    cache = HybridCache.allocate(model.config, n, n * pages, BLOCK, model.dtype, device=device)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(n)]
    return ForwardBatch.build(seqs, [0] * n, list(range(n)), tables, BLOCK, device, logits="all"), cache


def train(corpus: TopicCorpus, steps: int, seq_len: int = 128, batch: int = 8, lr: float = 3e-3,
          seed: int = 0) -> tuple[NemotronHForCausalLM, float]:
    """The tiny preset trained on `corpus` (float32, CPU). Returns (model, last loss)."""
    model = load_model(ModelConfig.from_hf("tiny"), load_format="dummy", dtype=torch.float32, device="cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    loss = float("nan")
    for _ in range(steps):
        data = corpus.sample(batch, seq_len + 1, gen)
        fb, cache = _prefill_batch(model, data[:, :-1].tolist(), "cpu")
        logits = model(fb, cache)
        step_loss = torch.nn.functional.cross_entropy(logits, data[:, 1:].reshape(-1))
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        loss = step_loss.item()
    for p in params:
        p.requires_grad_(False)
    return model.eval(), loss


def trained_model(corpus: TopicCorpus, steps: int, cache_dir: str | None) -> tuple[NemotronHForCausalLM, str]:
    """`train`'s model, or the one saved in cache_dir/<steps> by an earlier run (then saved there)."""
    path = Path(cache_dir) / f"steps{steps}" if cache_dir else None
    if path is not None and (path / "config.json").exists():
        return load_model(ModelConfig.from_hf(str(path)), dtype=torch.float32), f"loaded from {path}"
    t0 = time.time()
    model, loss = train(corpus, steps)
    if path is not None:
        save_checkpoint(model, path)
    return model, f"trained {steps} steps in {time.time() - t0:.0f} s, last loss {loss:.3f}"


# --------------------------------------------------------------------------------- generation


@dataclass
class Run:
    tokens: torch.Tensor  # [B, L] generated (or fed) tokens
    logits: torch.Tensor  # [B, L, V] the logits that predicted them
    state: torch.Tensor  # the final SSM state [L_mamba, B, H, P, N] as float32


@torch.no_grad()
def generate(model: NemotronHForCausalLM, prompts: list[list[int]], num_tokens: int, state_dtype: torch.dtype,
             stochastic: bool, forced: torch.Tensor | None = None) -> Run:
    """Greedy decoding of every prompt at once (one sequence per slot); with `forced` [B, num_tokens]
    those tokens are fed instead of the picks (teacher forcing)."""
    device, n = model.device, len(prompts)
    pages = (max(len(p) for p in prompts) + num_tokens) // BLOCK + 1
    cache = HybridCache.allocate(model.config, n, n * pages, BLOCK, model.dtype, state_dtype, device,
                                 rounding_seed=ROUNDING_SEED if stochastic else None)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(n)]
    batch = ForwardBatch.build(prompts, [0] * n, list(range(n)), tables, BLOCK, device)
    done = [len(p) for p in prompts]
    tokens, logits = [], []
    for i in range(num_tokens):
        out = model(batch, cache)  # [B, V]
        pick = out.argmax(-1) if forced is None else forced[:, i].to(device)
        tokens.append(pick.cpu())
        logits.append(out.cpu())
        batch = ForwardBatch.build([[t] for t in pick.tolist()], done, list(range(n)), tables, BLOCK, device)
        done = [d + 1 for d in done]
    return Run(torch.stack(tokens, 1), torch.stack(logits, 1), cache.ssm_state.float().cpu())


def compare(run: Run, ref: Run, free: Run) -> dict:
    """Teacher-forced `run` and free-running `free` against the float32 reference."""
    err = (run.logits - ref.logits).norm(dim=-1) / ref.logits.norm(dim=-1)  # [B, L]
    quarter = err.shape[1] // 4
    same = free.tokens == ref.tokens
    first = [int(row.logical_not().nonzero()[0]) if not row.all() else row.numel() for row in same]
    return dict(
        logit_rel_err_mean=err.mean().item(),
        logit_rel_err_first_quarter=err[:, :quarter].mean().item(),
        logit_rel_err_last_quarter=err[:, -quarter:].mean().item(),
        logit_rel_err_max=err.max().item(),
        top1_agreement=(run.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean().item(),
        state_rel_err=((run.state - ref.state).norm() / ref.state.norm()).item(),
        free_token_agreement=same.float().mean().item(),
        free_first_divergence_mean=sum(first) / len(first),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None, help="keep the trained model here for later runs")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    corpus = TopicCorpus(ModelConfig.from_hf("tiny").vocab_size)
    model, how = trained_model(corpus, args.train_steps, args.cache_dir)
    print(f"model: {how} (uniform loss {math.log(model.config.vocab_size):.3f})", flush=True)
    model = model.to(args.device)
    model.ops = get_ops(args.device)
    prompts = corpus.sample(args.prompts, args.prompt_len, torch.Generator().manual_seed(1)).tolist()
    ref = generate(model, prompts, args.tokens, torch.float32, False)
    rows = {}
    print(f"{'state':22s} {'logit err':>10s} {'1st 1/4':>9s} {'last 1/4':>9s} {'max':>8s} {'top-1':>7s} "
          f"{'state err':>10s} {'free agree':>10s} {'1st diff':>8s}")
    for name, (dtype, sr) in FORMATS.items():
        forced = generate(model, prompts, args.tokens, dtype, sr, forced=ref.tokens)
        free = generate(model, prompts, args.tokens, dtype, sr)
        r = rows[name] = compare(forced, ref, free)
        print(f"{name:22s} {r['logit_rel_err_mean']:10.2e} {r['logit_rel_err_first_quarter']:9.2e} "
              f"{r['logit_rel_err_last_quarter']:9.2e} {r['logit_rel_err_max']:8.2e} {r['top1_agreement']:7.2%} "
              f"{r['state_rel_err']:10.2e} {r['free_token_agreement']:10.2%} {r['free_first_divergence_mean']:8.0f}",
              flush=True)
    result = dict(bench="state_rounding", device=args.device, tokens=args.tokens, prompts=args.prompts,
                  train_steps=args.train_steps, model=how, rows=rows,
                  seconds=round(time.time() - t0, 1))
    line = json.dumps(result)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
