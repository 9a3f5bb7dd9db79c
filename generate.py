"""Sampling with a static KV cache and continuous batching: n samples per prompt for Pass@k (Appendix C.2).

    outs = generate(model, prompts, max_new_tokens=512, temperature=0.2, top_p=0.95, n=10, tokenizer=tok)

Each sample depends only on (seed, prompt tokens, sample index), never on what it is batched with: results do not
depend on batch_size or order. Greedy at temperature 0. The decoder steps are model.Transformer.prefill/decode.
"""
import hashlib
import sys
import time
from dataclasses import dataclass

import torch


def _row_seed(seed, prompt, j) -> int:
    """Seed of sample j of a prompt: a function of (seed, prompt tokens, j) only, so a row draws the same numbers
    whatever it is batched with, and different prompts draw different numbers."""
    h = hashlib.sha256(f"{seed}|{j}|{','.join(map(str, prompt))}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def sample_next(logits, temperature, top_p, gens, k=64):
    """Next token per row from logits (B, V): greedy at temperature 0, else nucleus sampling with one uniform draw
    per row from that row's own generator (so a row's sample does not depend on the rest of the batch).

    The nucleus is the shortest run of tokens, most likely first (ties: lower id first), whose mass reaches top_p.
    Sorting the whole vocabulary for every row is slow, so it is first looked for among the k most likely tokens;
    a row whose nucleus is not provably inside them falls back to the full sort. Both paths pick the same token."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)        # (B, V)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(logits.device)
    tokens = torch.empty(len(probs), dtype=torch.long, device=logits.device)
    fast = torch.zeros(len(probs), dtype=torch.bool, device=logits.device)
    if 0 < top_p < 1.0 and k < probs.shape[-1]:
        p, idx = _top_k_sorted(probs, k)                                # (B, k)
        cum = p.cumsum(-1)
        last = (cum - p < top_p).sum(-1, keepdim=True) - 1              # the nucleus's last token, among the k
        # Inside for sure when the top k reach top_p and the nucleus's last token is more likely than the k-th: every
        # token outside the k is at most as likely as the k-th, so none of them can precede it in the full sort.
        fast = (cum[:, -1] >= top_p) & (p.gather(-1, last)[:, 0] > p[:, -1])
        if fast.any():
            tokens[fast] = _nucleus_pick(p[fast], idx[fast], top_p, u[fast])
    if not fast.all():
        slow = ~fast
        p, idx = probs[slow].sort(dim=-1, descending=True, stable=True)
        tokens[slow] = _nucleus_pick(p, idx, top_p, u[slow])
    return tokens


def _top_k_sorted(probs, k):
    """The k largest probabilities per row (B, k) and their token ids, ordered as a stable descending sort of the
    whole row would order them (ties: lower id first)."""
    idx = probs.topk(k, dim=-1).indices.sort(dim=-1).values            # ids ascending
    p, order = probs.gather(-1, idx).sort(dim=-1, descending=True, stable=True)
    return p, idx.gather(-1, order)


def _nucleus_pick(p, idx, top_p, u):
    """Sorted probabilities p (B, K) (descending) and their ids: keep the smallest prefix with mass >= top_p and
    pick the token where u (B,) in [0, 1) falls in its cumulative mass."""
    cum = p.cumsum(-1)
    if top_p < 1.0:
        p = p.masked_fill(cum - p >= top_p, 0.0)
        cum = p.cumsum(-1)
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None]).clamp(max=cum.shape[-1] - 1)
    return idx.gather(-1, pick).squeeze(-1)


class CompiledStep:
    """model.decode_step compiled by torch.compile (inductor), generate(compile=True)'s decoder step, as gpt-fast
    compiles its decode step. Its shapes: the slot count A (tokens, pos, bias dim 0) and the attended length S (bias
    dim 3) change from step to step, the caches' rows and length from run to run; all are marked dynamic, so one
    compilation serves a run, and later runs on the same model reuse it (the weights' shapes are fixed). A single
    slot runs as two (the second a free cache row, written at position 0 and its logits dropped): torch specializes
    a dimension of size 1, which would compile again. fullgraph: a graph break is an error, not a silent eager part.
    Counts its compilations (graphs dynamo built during its calls) and their time (the calls that compiled)."""

    def __init__(self, model):
        from torch._dynamo.utils import counters                   # imported with torch.compile, not with torch
        self.fn = torch.compile(model.decode_step, dynamic=False, fullgraph=True)
        self.graphs = counters["stats"]                             # ["unique_graphs"]: graphs dynamo has built
        self.compiles, self.compile_s, self.steps = 0, 0.0, 0

    def __call__(self, tokens, pos, inv, bias, kv):
        """model.decode_step's arguments, for slots 0..A-1; the caches must have a free row A when A = 1."""
        A = len(tokens)
        if A == 1:
            tokens, pos, bias = (torch.cat([t, torch.zeros_like(t)]) for t in (tokens, pos, bias))
        for t in (tokens, pos, bias):
            torch._dynamo.maybe_mark_dynamic(t, 0)                  # A
        torch._dynamo.maybe_mark_dynamic(bias, 3)                   # S
        for t in (t for pair in kv for t in pair):                  # a run's rows and length: another run's differ
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        graphs, t = self.graphs["unique_graphs"], time.perf_counter()
        out = self.fn(tokens, pos, inv, bias, kv)
        new = self.graphs["unique_graphs"] - graphs
        if new:
            self.compiles += new
            self.compile_s += time.perf_counter() - t
        self.steps += 1
        return out[:A]

    def report(self) -> str:
        return (f"compiled decode step: {self.compiles} compilation(s) in {self.compile_s:.1f} s over {self.steps} "
                f"steps (torch recompiles a function at most {torch._dynamo.config.cache_size_limit} times)")


@dataclass
class _Sample:
    """One sample in flight: its place in generate's output, its prompt length, its generator, its new tokens."""
    out: int
    prompt_len: int
    gen: torch.Generator
    tokens: list

    @property
    def pos(self) -> int:
        """Position of its newest token, the next decoder input (= how many tokens its cache row holds)."""
        return self.prompt_len + len(self.tokens) - 1


class _Slots:
    """The sampler's batch: `size` slots, each a row of one static KV cache per layer. The step decodes slots
    0..A-1, so a finished sample's slot is refilled by the next pending one, or, when none is left, the last slot's
    sample moves into it (compact)."""

    def __init__(self, model, size, max_len, spare=False):
        # spare: one more cache row than slots, never a slot's, for CompiledStep: slots 0..A-1 are then never the
        # whole cache (a compiled step would be specialized on that), and a single slot can run as two
        self.caches = model.new_caches(size + spare, max_len)
        self.size = size
        self.rows = []                                              # slot -> _Sample, or None for a free slot

    def free(self) -> list:
        return [s for s, r in enumerate(self.rows) if r is None] + list(range(len(self.rows), self.size))

    def put(self, slot, sample, prompt_caches, prompt_row):
        """Start `sample` in `slot` from its prompt's prefilled KV (row prompt_row of prompt_caches)."""
        for cache, src in zip(self.caches, prompt_caches):
            cache.copy_row(slot, prompt_row, sample.prompt_len, src)
        self.rows += [None] * (slot + 1 - len(self.rows))
        self.rows[slot] = sample

    def compact(self):
        """Move samples from the last slots into free ones until slots 0..A-1 are all taken."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        while None in self.rows:
            hole, sample = self.rows.index(None), self.rows.pop()
            for cache in self.caches:
                cache.copy_row(hole, len(self.rows), sample.pos)
            self.rows[hole] = sample
            while self.rows and self.rows[-1] is None:
                self.rows.pop()


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, n=1, eos_ids=None, stop_strings=None,
             tokenizer=None, seed=0, batch_size=64, on_prompt_done=None, stop_when=None, compile=False) -> list:
    """Sample n continuations of each prompt (lists of token ids). Returns len(prompts) * n lists of new tokens,
    prompt-major, each ending at (and including) EOS, the token that completed a stop string, or the token after
    which stop_when(new tokens so far) first returned True. EOS ids: by default every one the checkpoint names
    (model.config.eos_token_ids) and the tokenizer's; eos_ids=() disables them.
    on_prompt_done(i, samples), when given, receives prompt i's n samples as soon as the last of them ends (so a
    caller can save its work per prompt while the batch goes on).

    Continuous batching: batch_size slots each decode one token per step, and when a sample ends the next pending
    one takes its slot, so the batch stays full until the work runs out. Each distinct prompt is prefilled once
    (with the other prompts starting then, right-padded) and its KV copied into a slot for each of its n samples.
    `seed` may be an int or one int per prompt; sample j of a prompt draws from its own generator (_row_seed), so
    the results do not depend on batch_size or on the other prompts.
    compile=True runs each decoding step through a torch.compile'd model.decode_step (CompiledStep; the same greedy
    tokens, logits equal to rounding) and prints its compilations and their time to stderr; the prefill and the
    sampling stay eager. A CompiledStep instead of True is used as it is (its counts go on from call to call)."""
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt")
    if eos_ids is None:          # every EOS id of the checkpoint (config + generation_config) and of its tokenizer
        eos_ids = set(model.config.eos_token_ids) | (tokenizer.eos_ids if tokenizer is not None else set())
    eos_ids = set(eos_ids)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    out = [[] for _ in range(len(prompts) * n)]
    if not prompts or max_new_tokens <= 0:
        return out
    device = model.lm_head.weight.device
    # Every token is at least one byte, so the last len(stop in bytes) + 1 tokens hold any stop string that the
    # newest token completed: decode that window, not the whole continuation, at each step.
    window = 1 + max((len(s.encode()) for s in stop_strings or ()), default=0)

    left = [n] * len(prompts)                                       # samples of each prompt still running

    def finished(sample) -> bool:
        t = sample.tokens
        done = (t[-1] in eos_ids or len(t) == max_new_tokens
                or bool(stop_strings) and any(s in tokenizer.decode(t[-window:], skip_special_tokens=False)
                                              for s in stop_strings)
                or stop_when is not None and bool(stop_when(t)))
        if done:
            i = sample.out // n
            left[i] -= 1
            if left[i] == 0 and on_prompt_done is not None:
                on_prompt_done(i, out[i * n:(i + 1) * n])
        return done

    pending = [(i, j) for i in range(len(prompts)) for j in range(n)][::-1]   # pop() takes the next one
    slots = _Slots(model, max(1, batch_size), max(len(p) for p in prompts) + max_new_tokens, spare=bool(compile))
    step = compile if isinstance(compile, CompiledStep) else CompiledStep(model) if compile else None
    prefilled = {}                                                  # prompt -> (last logits (V,), caches, row)
    while pending or slots.rows:
        # Refill: the next pending samples take the free slots; their new prompts are prefilled together.
        free = slots.free()
        starting = [pending.pop() for _ in range(min(len(free), len(pending)))]
        new = sorted({i for i, _ in starting} - prefilled.keys())
        if new:
            logits, caches = model.prefill([prompts[i] for i in new])
            prefilled.update({i: (logits[r], caches, r) for r, i in enumerate(new)})
        if starting:
            samples = [_Sample(i * n + j, len(prompts[i]), torch.Generator().manual_seed(
                _row_seed(seeds[i], prompts[i], j)), []) for i, j in starting]
            first = sample_next(torch.stack([prefilled[i][0] for i, _ in starting]), temperature, top_p,
                                [s.gen for s in samples]).tolist()
            for (i, j), sample, t in zip(starting, samples, first):
                sample.tokens.append(t)
                out[sample.out] = sample.tokens
                if not finished(sample):
                    slots.put(free.pop(0), sample, prefilled[i][1], prefilled[i][2])
                if j == n - 1:                                      # all its samples have started
                    del prefilled[i]
        if pending and slots.free():                                # some ended at their first token: refill
            continue
        slots.compact()
        if not slots.rows:
            continue
        # One decoding step for slots 0..A-1.
        rows = slots.rows
        tokens = torch.tensor([s.tokens[-1] for s in rows], device=device)
        pos = torch.tensor([s.pos for s in rows], device=device)
        logits = model.decode(tokens, pos, slots.caches, step)
        for slot, (sample, t) in enumerate(zip(rows, sample_next(logits, temperature, top_p,
                                                                  [s.gen for s in rows]).tolist())):
            sample.tokens.append(t)
            if finished(sample):
                rows[slot] = None
    if step is not None:
        print(step.report(), file=sys.stderr, flush=True)
    return out
