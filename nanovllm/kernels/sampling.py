"""The sampler's fast path on CUDA (rows with a temperature and nothing else): one Triton pass over the logits.

A draw from softmax(logits / T) is the argmax of logits / T + Gumbel noise (the Gumbel-max trick: the torch path's
exponential race, argmax p / E with E ~ Exp(1), in log space), so no softmax or sort is needed. Each row is cut into
chunks, one program each (one program per row made a batch-1 step ~60 us slower on the H100: a single SM walking 152k
logits). T = 0 rows take the plain argmax, ties to the smallest index as in torch.argmax, so greedy rows equal the
torch path exactly. The seed is drawn on the device and read through a pointer, so a CUDA graph that captures the
sampler draws fresh noise at every replay."""
import torch
import triton
import triton.language as tl

SAMPLE_BLOCK = 2048     # logits per loop iteration of a program
SAMPLE_CHUNK = 8192     # logits per program: a row is cut into chunks, so that one row still fills many SMs
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def gumbel_argmax_kernel(logits_ptr, temperatures_ptr, chunk_best_ptr, chunk_index_ptr, seed_ptr, vocab_size,
                         row_stride, num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, chunks): the best score in one chunk of a row, and its index (the first of equal scores).
    Temperatures may be of any float type (the CUDA graphs' inputs hold float64)."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    seed = tl.load(seed_ptr)
    temperature = tl.load(temperatures_ptr + row).to(tl.float32)
    inv_t = 1.0 / tl.maximum(temperature, 1e-5)
    lanes, quads = tl.arange(0, BLOCK), tl.arange(0, BLOCK // 4)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = chunk * CHUNK + lanes      # a chunk of -inf only (masked tokens) answers its first index
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab_size), BLOCK):
        cols = start + lanes
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row.to(tl.int64) * row_stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
        # One uniform draw per (row, token). The random numbers are most of the kernel's work: one Philox call
        # gives four, so a call per four tokens (tl.rand would make one per token and keep one of its four).
        u0, u1, u2, u3 = tl.rand4x(seed, row * tl.cdiv(vocab_size, 4) + start // 4 + quads)
        u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [BLOCK])
        # E = -ln(u) ~ Exp(1), clamped like the torch path; -ln(E) is Gumbel noise. In base 2 throughout: the score
        # (x / T - ln E) times log2(e) is x / T * log2(e) - log2(-log2(u)) plus a constant, the same argmax, and
        # log2 is one hardware instruction.
        noise = -tl.log2(tl.maximum(-tl.log2(u), 1e-10))
        score = tl.where(temperature < 1e-5, x, x * (inv_t * LOG2E) + noise)     # T = 0: below SAMPLING_EPS
        better = score > best       # strict: within a lane the first index wins a tie
        best = tl.where(better, score, best)
        best_index = tl.where(better, cols, best_index)
    top = tl.max(best, axis=0)
    tl.store(chunk_best_ptr + row * num_chunks + chunk, top)
    tl.store(chunk_index_ptr + row * num_chunks + chunk, tl.min(tl.where(best == top, best_index, vocab_size), axis=0))


@triton.jit
def argmax_of_chunks_kernel(chunk_best_ptr, chunk_index_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr):
    """One program per row: the chunks' best, ties to the smallest index (chunks cover increasing indices)."""
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS_PAD)
    valid = chunks < num_chunks
    best = tl.load(chunk_best_ptr + row * num_chunks + chunks, mask=valid, other=float("-inf"))
    index = tl.load(chunk_index_ptr + row * num_chunks + chunks, mask=valid, other=2**31 - 1)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, index, 2**31 - 1), axis=0).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of `logits` ([rows, vocab], last dimension contiguous) into `out` (int64 [rows]; new if
    None), seeded from torch's generator of the logits' device (torch.manual_seed repeats a run); no host sync."""
    assert logits.stride(-1) == 1
    rows, vocab_size = logits.shape
    num_chunks = triton.cdiv(vocab_size, SAMPLE_CHUNK)
    chunk_best = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    chunk_index = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    seed = torch.randint(2**31 - 1, (1,), dtype=torch.int32, device=logits.device)
    gumbel_argmax_kernel[(rows, num_chunks)](logits, temperatures, chunk_best, chunk_index, seed, vocab_size,
                                             logits.stride(0), num_chunks, CHUNK=SAMPLE_CHUNK, BLOCK=SAMPLE_BLOCK)
    argmax_of_chunks_kernel[(rows,)](chunk_best, chunk_index, out, num_chunks,
                                     CHUNKS_PAD=triton.next_power_of_2(num_chunks))
    return out
