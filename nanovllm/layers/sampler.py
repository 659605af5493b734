from dataclasses import dataclass

import torch
import xxhash
from torch import nn

from nanovllm.sampling_params import SAMPLING_EPS, SamplingParams
from nanovllm.utils.tensors import to_device

_MASK32 = 0xFFFFFFFF


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling inputs beyond the temperature. A field is None when no row of the batch uses it; rows that
    do not, greedy ones included, carry its neutral value (top_k = vocabulary size, top_p = 1, min_p = 0)."""
    top_ks: torch.Tensor | None = None          # int64 [rows]; set (with top_ps) when some row needs the sort
    top_ps: torch.Tensor | None = None          # float32 [rows]
    min_ps: torch.Tensor | None = None          # float32 [rows]
    seed_rows: torch.Tensor | None = None       # int64 [seeded]: rows whose noise comes from their seed
    seed_keys: torch.Tensor | None = None       # int64 [seeded, 2]: seed_key(seed, position) of each seeded row
    banned_rows: torch.Tensor | None = None     # int64 [pairs]: (row, token) pairs whose logit is set to -inf,
    banned_ids: torch.Tensor | None = None      # int64 [pairs]   the stop tokens of rows still under min_tokens
    penalty_rows: torch.Tensor | None = None    # int64 [penalized]: rows with a penalty, and their
    penalties: torch.Tensor | None = None       # float32 [penalized, 3]  presence, frequency, repetition penalties
    token_counts: torch.Tensor | None = None    # float32 [2, penalized, vocab]: each token's count in the completion
                                                # so far, and in the prompt (only where a repetition penalty needs it)
    num_logprobs: int = -1                      # the largest top-n asked for; -1: no row wants logprobs


def prepare_sampling(params: list[SamplingParams], output_lens: list[int], eos_token_ids: frozenset[int],
                     vocab_size: int, device: torch.device, seqs: list = (), last_tokens: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, SamplingTensors | None]:
    """A batch's sampling inputs, one row per request: the temperatures, and SamplingTensors only when some row
    needs more. `output_lens[i]` is how many tokens row i has generated (for seeds and min_tokens). Penalties also
    read `seqs` (the rows' sequences) and `last_tokens`: each row's last input id on the device, its last token,
    which with overlap scheduling the host may not have seen yet."""
    temperatures = to_device([p.temperature for p in params], torch.float32, device)
    if not any(p.needs_sampler_extras for p in params):
        return temperatures, None
    # Filters and seeds only matter where a row samples; greedy rows get the neutral values.
    top_ks = [min(p.top_k, vocab_size) if p.top_k > 0 and p.temperature > 0 else vocab_size for p in params]
    top_ps = [p.top_p if p.temperature > 0 else 1.0 for p in params]
    min_ps = [p.min_p if p.temperature > 0 else 0.0 for p in params]
    seeded = [i for i, p in enumerate(params) if p.seed is not None and p.temperature > 0]
    # Until min_tokens, a row's stop tokens (and eos, unless ignored) cannot be drawn.
    banned = [(i, t) for i, (p, n) in enumerate(zip(params, output_lens)) if n < p.min_tokens
              for t in set(p.stop_token_ids).union(() if p.ignore_eos else eos_token_ids)]
    extras = SamplingTensors(num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1))
    if any(k < vocab_size for k in top_ks) or any(p < 1 for p in top_ps):
        extras.top_ks = to_device(top_ks, torch.int64, device)
        extras.top_ps = to_device(top_ps, torch.float32, device)
    if any(min_ps):
        extras.min_ps = to_device(min_ps, torch.float32, device)
    if seeded:
        extras.seed_rows = to_device(seeded, torch.int64, device)
        extras.seed_keys = to_device([seed_key(params[i].seed, output_lens[i]) for i in seeded], torch.int64, device)
    if banned:
        extras.banned_rows, extras.banned_ids = to_device(banned, torch.int64, device).T
    if penalized := [i for i, p in enumerate(params) if p.has_penalties]:
        extras.penalty_rows = to_device(penalized, torch.int64, device)
        extras.penalties = to_device([[params[i].presence_penalty, params[i].frequency_penalty,
                                       params[i].repetition_penalty] for i in penalized], torch.float32, device)
        rows = [(seqs[i], output_lens[i], params[i].repetition_penalty != 1) for i in penalized]
        extras.token_counts = token_counts(rows, vocab_size, device, last_tokens[extras.penalty_rows])
    return temperatures, extras


def token_counts(rows: list[tuple], vocab_size: int, device: torch.device, last_tokens: torch.Tensor) -> torch.Tensor:
    """float32 [2, rows, vocab]: how often each token is in a row's completion so far, and in its prompt. `rows`:
    (sequence, tokens generated, whether its prompt counts: a repetition penalty); a row's last generated token is
    counted from `last_tokens` (prepare_sampling's). One scatter on the device, rebuilt each step as vLLM does:
    host work in the penalized rows' tokens only."""
    index = [[], []]
    for j, (seq, num_generated, with_prompt) in enumerate(rows):
        start = seq.num_prompt_tokens
        completion = seq.token_ids[start:start + num_generated - 1]     # (none for a prompt: num_generated 0)
        index[0] += [j] * len(completion)
        index[1] += completion
        if with_prompt:
            index[0] += [len(rows) + j] * start
            index[1] += seq.token_ids[:start]
    index = to_device(index, torch.int64, device)
    if generated := [j for j, (_, num_generated, _) in enumerate(rows) if num_generated]:
        generated = to_device(generated, torch.int64, device)
        index = torch.cat([index, torch.stack([generated, last_tokens[generated]])], dim=1)
    counts = torch.zeros(2 * len(rows), vocab_size, device=device)
    counts.index_put_(tuple(index), torch.ones(index.size(1), device=device), accumulate=True)
    return counts.view(2, len(rows), vocab_size)


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, penalties: torch.Tensor, counts: torch.Tensor
                    ) -> torch.Tensor:
    """vLLM's penalties on `rows` of the logits (a new tensor): the repetition penalty as transformers defines it,
    over the prompt and the completion; then the frequency and presence penalties as OpenAI's, over the completion."""
    presence, frequency, repetition = (p.unsqueeze(1) for p in penalties.unbind(1))
    completion, prompt = counts
    x = logits[rows]
    scale = torch.where((completion + prompt) > 0, repetition, 1.0)
    x = torch.where(x > 0, x / scale, x * scale)
    x = x - frequency * completion - presence * (completion > 0)
    return logits.index_copy(0, rows, x)


def seed_key(seed: int, position: int) -> tuple[int, int]:
    """Two 32-bit keys for the draw of a seeded request at one output position (host side, per sequence)."""
    h = xxhash.xxh64_intdigest((seed % 2**64).to_bytes(8, "little") + position.to_bytes(8, "little"))
    return h & _MASK32, h >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """The low 32 bits of x * c for x < 2**32, in halves so that no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer: a bijection on 32-bit values; each input bit flips each output bit half the time."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def seeded_exponential(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab_size] that is a pure function of each row's keys: counter-based, computed
    on the device with integer ops, so a seeded draw does not depend on the batch or on the global RNG."""
    counter = torch.arange(vocab_size, device=keys.device)
    bits = _mix32(_mix32(counter ^ keys[:, :1]) ^ keys[:, 1:])
    # 23 bits + 0.5 are exact in float32, so u lies in (0, 1) strictly and -log(u) is finite and positive.
    u = ((bits >> 9).float() + 0.5) * 2.0 ** -23
    return -torch.log(u)


def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k, then top-p over what top-k kept, drop; one sort for the whole batch."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.size(-1), device=logits.device)
    sorted_logits.masked_fill_(ranks >= top_ks.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # A token is kept while the mass strictly before it is below p, so the token that crosses p stays.
    # Rows with top_p = 1 keep everything, whatever the rounding of the cumulative sum.
    mass_before = probs.cumsum(dim=-1) - probs
    top_ps = top_ps.unsqueeze(1)
    sorted_logits.masked_fill_((mass_before >= top_ps) & (top_ps < 1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler(nn.Module):
    """Picks one token per row of a batch with mixed per-request parameters (as SamplingParams defines them) in one
    batched pass; a batch with no `SamplingTensors` takes one Triton pass on CUDA. Logprobs are those of the
    distribution sampled from (the penalized logits' for a greedy row): vLLM's "processed" logprobs."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, extras: SamplingTensors | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Returns (token ids [rows], logprobs): logprobs is None unless extras ask for them, else
        (the sampled tokens' logprobs [rows], the top-n logprobs [rows, n], their token ids [rows, n])."""
        if extras is None:
            if logits.is_cuda:  # imported here: Triton is installed only on Linux, and only CUDA needs it
                from nanovllm.kernels.sampling import gumbel_sample
                return gumbel_sample(logits, temperatures), None
            extras = SamplingTensors()      # elsewhere: the path below, every filter off
        logits = logits.float()
        if extras.banned_rows is not None:
            logits = logits.clone()     # leave the caller's logits as they were
            logits[extras.banned_rows, extras.banned_ids] = float("-inf")
        if extras.penalty_rows is not None:
            logits = apply_penalties(logits, extras.penalty_rows, extras.penalties, extras.token_counts)
        greedy = temperatures < SAMPLING_EPS
        # Greedy rows are divided by 1 (and carry neutral filters), so their logprobs are those of the logits.
        logits = logits / torch.where(greedy, 1.0, temperatures).unsqueeze(1)
        if extras.min_ps is not None:
            # p >= min_p * p_max  <=>  logit >= max logit + log(min_p); min_p = 0 gives -inf and keeps all.
            threshold = logits.amax(dim=-1, keepdim=True) + extras.min_ps.log().unsqueeze(1)
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if extras.top_ks is not None:
            logits = _top_k_top_p(logits, extras.top_ks, extras.top_ps)
        # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race), with no sort and no host sync.
        noise = torch.empty_like(logits).exponential_(1).clamp_min_(1e-10)
        if extras.seed_rows is not None:
            noise[extras.seed_rows] = seeded_exponential(extras.seed_keys, logits.size(-1))
        sampled = logits.softmax(dim=-1).div_(noise).argmax(dim=-1)
        token_ids = torch.where(greedy, logits.argmax(dim=-1), sampled)
        if extras.num_logprobs < 0:
            return token_ids, None
        logprobs = logits.log_softmax(dim=-1)
        top_logprobs, top_ids = logprobs.topk(extras.num_logprobs, dim=-1)
        return token_ids, (logprobs.gather(-1, token_ids.unsqueeze(1)).squeeze(1), top_logprobs, top_ids)


def logprob_dicts(token_ids: list[int], logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  nums: list[int | None]) -> list[dict[int, float] | None]:
    """Per row, {token_id: logprob} for the sampled token and the row's top-n (None where not asked for)."""
    sampled, top_logprobs, top_ids = (t.tolist() for t in logprobs)
    return [None if n is None else {token_id: lp, **dict(zip(ids[:n], top_lp[:n]))}
            for token_id, lp, top_lp, ids, n in zip(token_ids, sampled, top_logprobs, top_ids, nums)]
