"""The sampler's fast path on CUDA (rows with a temperature and nothing else): one Triton pass over the logits.

A draw from softmax(logits / T) is the argmax of logits / T + Gumbel noise (the Gumbel-max trick; the same
exponential race as the torch path, argmax p / E with E ~ Exp(1), in log space), so no softmax, sort or second
pass is needed: each row's program reads its logits once and keeps a running argmax. T = 0 rows take the plain
argmax. Ties go to the smallest index, as torch.argmax does, so greedy rows equal the torch path exactly.
"""
import torch
import triton
import triton.language as tl

SAMPLE_BLOCK = 2048


# `seed` changes every call: unspecialised, so that one compilation serves every call.
@triton.jit(do_not_specialize=["seed"])
def gumbel_argmax_kernel(logits_ptr, temperatures_ptr, out_ptr, seed, vocab_size, row_stride,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperatures_ptr + row)
    inv_t = 1.0 / tl.maximum(temperature, 1e-5)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        cols = start + lanes
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        # E = -log(u) ~ Exp(1) per (row, token), clamped like the torch path; -log(E) is Gumbel noise.
        u = tl.rand(seed, row * vocab_size + cols)
        noise = -tl.log(tl.maximum(-tl.log(u), 1e-10))
        score = tl.where(temperature == 0, x, x * inv_t + noise)
        better = score > best       # strict: within a lane the first index wins a tie
        best = tl.where(better, score, best)
        best_index = tl.where(better, cols, best_index)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_index, vocab_size), axis=0).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """One token id per row of `logits` ([rows, vocab], last dimension contiguous): argmax at temperature 0, else
    a draw from softmax(logits / temperature). The noise is seeded from torch's CPU generator, so
    torch.manual_seed makes a run repeatable."""
    assert logits.stride(-1) == 1
    rows, vocab_size = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    seed = int(torch.randint(2**31 - 1, ()))
    gumbel_argmax_kernel[(rows,)](logits, temperatures, out, seed, vocab_size, logits.stride(0), BLOCK=SAMPLE_BLOCK)
    return out
