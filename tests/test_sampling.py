"""The Sampler on crafted logits: thousands of draws in one batch (a row repeated), with fixed seeds.

Each distribution check compares counts to the expected probabilities with a chi-square statistic against
its 0.1% critical value; support checks are exact. Runs on CPU, and on CUDA too when there is one (the
fast path is a Triton kernel there, also checked on CPU under Triton's interpreter, and the seeded noise is integer
arithmetic on the device).
"""
import math

import pytest
import torch

from nanovllm.layers.sampler import Sampler, SamplingTensors, seed_key, seeded_exponential
from tests.triton_interpreter import run_check

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
DRAWS = 20000


@pytest.fixture(params=DEVICES)
def device(request):
    torch.manual_seed(0)
    return request.param


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.1% (z = 3.09), by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_follows(tokens: torch.Tensor, probs: list[float]):
    """The draws `tokens` have exactly the support of `probs` and follow it (chi-square at 0.1%)."""
    counts = torch.bincount(tokens.cpu(), minlength=len(probs)).double()
    expected = torch.tensor(probs, dtype=torch.float64) / sum(probs) * len(tokens)
    support = expected > 0
    drawn, allowed = counts.nonzero().flatten().tolist(), support.nonzero().flatten().tolist()
    assert drawn == allowed, f"drew tokens {drawn}, expected exactly {allowed}"
    stat = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert stat < chi2_critical(int(support.sum()) - 1), (stat, counts.tolist(), expected.tolist())


def rows(logits: list[float], n: int, device: str) -> torch.Tensor:
    return torch.tensor(logits, device=device).log_softmax(-1).repeat(n, 1) if n else None


def const(value, n: int, device: str, dtype=torch.float32) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype, device=device)


def sample(logits, temperature, device, **extras):
    n = logits.size(0)
    out, logprobs = Sampler()(logits, const(temperature, n, device), SamplingTensors(**extras) if extras else None)
    return out, logprobs


def filters(n, device, vocab, top_k=None, top_p=1.0, min_p=0.0):
    """SamplingTensors fields for n rows with the same filters (None fields stay off)."""
    fields = {}
    if top_k is not None or top_p < 1:
        fields.update(top_ks=const(top_k or vocab, n, device, torch.int64), top_ps=const(top_p, n, device))
    if min_p > 0:
        fields["min_ps"] = const(min_p, n, device)
    return fields


PROBS = [0.02, 0.08, 0.3, 0.05, 0.25, 0.1, 0.15, 0.05]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("fast_path", [True, False])
def test_samples_follow_softmax_over_temperature(device, temperature, fast_path):
    logits = rows([math.log(p) for p in PROBS], DRAWS, device)
    expected = torch.tensor(PROBS, dtype=torch.float64).pow(1 / temperature).tolist()
    # The slow path is forced by asking for logprobs, which changes nothing about the draw.
    tokens, _ = sample(logits, temperature, device, **({} if fast_path else {"num_logprobs": 0}))
    assert_follows(tokens, expected)


def test_greedy_is_argmax_even_with_filters(device):
    logits = torch.randn(64, 1000, device=device)
    n, vocab = logits.shape
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits, 0.0, device)[0], expected)
    with_filters = sample(logits, 0.0, device, **filters(n, device, vocab, top_k=5, top_p=0.3, min_p=0.5),
                          num_logprobs=2, seed_rows=torch.arange(n, device=device),
                          seed_keys=torch.ones(n, 2, dtype=torch.int64, device=device))[0]
    assert torch.equal(with_filters, expected)


def test_top_k_keeps_the_k_best(device):
    logits = rows([math.log(p) for p in PROBS], DRAWS, device)
    tokens, _ = sample(logits, 1.0, device, **filters(DRAWS, device, len(PROBS), top_k=3))
    assert_follows(tokens, [p if p >= 0.15 else 0 for p in PROBS])       # 0.3, 0.25, 0.15


def test_top_p_keeps_the_nucleus_with_the_boundary_token(device):
    logits = rows([math.log(p) for p in [0.1, 0.2, 0.3, 0.4]], DRAWS, device)
    tokens, _ = sample(logits, 1.0, device, **filters(DRAWS, device, 4, top_p=0.6))
    assert_follows(tokens, [0, 0, 0.3, 0.4])


def test_top_p_after_top_k(device):
    # top_k=3 renormalizes 0.3, 0.25, 0.15 to 0.43, 0.36, 0.21; top_p=0.7 then needs the first two.
    logits = rows([math.log(p) for p in PROBS], DRAWS, device)
    tokens, _ = sample(logits, 1.0, device, **filters(DRAWS, device, len(PROBS), top_k=3, top_p=0.7))
    assert_follows(tokens, [0, 0, 0.3, 0, 0.25, 0, 0, 0])


def test_min_p_drops_exactly_below_threshold(device):
    # min_p=0.4 of the top 0.3 is 0.12: keep 0.3, 0.25, 0.15.
    logits = rows([math.log(p) for p in PROBS], DRAWS, device)
    tokens, _ = sample(logits, 1.0, device, **filters(DRAWS, device, len(PROBS), min_p=0.4))
    assert_follows(tokens, [p if p > 0.12 else 0 for p in PROBS])


def test_mixed_batch_each_row_uses_its_own_parameters(device):
    n = DRAWS // 2
    logits = rows([math.log(p) for p in PROBS], 4 * n, device)
    vocab = len(PROBS)
    temperatures = torch.cat([const(t, n, device) for t in (1.0, 1.0, 0.5, 0.0)])
    extras = SamplingTensors(top_ks=torch.cat([const(k, n, device, torch.int64) for k in (2, vocab, vocab, vocab)]),
                             top_ps=torch.cat([const(p, n, device) for p in (1.0, 1.0, 0.5, 1.0)]),
                             min_ps=torch.cat([const(p, n, device) for p in (0.0, 0.5, 0.0, 0.0)]))
    tokens, _ = Sampler()(logits, temperatures, extras)
    top_k, min_p, top_p_cold, greedy = tokens.split(n)
    assert_follows(top_k, [0, 0, 0.3, 0, 0.25, 0, 0, 0])
    assert_follows(min_p, [0, 0, 0.3, 0, 0.25, 0, 0.15, 0])
    cold = [p ** 2 for p in PROBS]      # temperature 0.5 squares, then top_p=0.5 of that keeps 0.3² and 0.25²
    assert_follows(top_p_cold, [cold[i] if i in (2, 4) else 0 for i in range(vocab)])
    assert (greedy == 2).all()


def test_banned_tokens_are_never_drawn(device):
    logits = rows([math.log(p) for p in PROBS], DRAWS, device)
    every_row = torch.arange(DRAWS, device=device)
    tokens, logprobs = sample(logits, 1.0, device, banned_rows=every_row.repeat(2),
                              banned_ids=torch.tensor([2, 4], device=device).repeat_interleave(DRAWS),
                              num_logprobs=8)
    assert_follows(tokens, [0 if i in (2, 4) else p for i, p in enumerate(PROBS)])
    assert torch.isinf(logprobs[1][:, -2:]).all()


def seeded_batch(logits_row, seeds_positions, device):
    """Draw one token per (seed, position) from the same logits row; all rows seeded."""
    n = len(seeds_positions)
    keys = torch.tensor([seed_key(s, p) for s, p in seeds_positions], device=device)
    tokens, _ = sample(logits_row.repeat(n, 1), 1.0, device, seed_rows=torch.arange(n, device=device),
                       seed_keys=keys)
    return tokens


def test_seeded_draws_follow_the_distribution(device):
    # Many seeds and positions: the counter-based noise must be as good as the global RNG's.
    logits = torch.tensor([math.log(p) for p in PROBS], device=device)
    tokens = seeded_batch(logits, [(s, p) for s in range(DRAWS // 8) for p in range(8)], device)
    assert_follows(tokens, PROBS)


def test_seeded_noise_is_exponential_and_uncorrelated(device):
    keys = torch.tensor([seed_key(s, p) for s in range(8) for p in range(8)], device=device)
    noise = seeded_exponential(keys, 4096).double().cpu()
    values = noise.flatten().sort().values
    n = values.numel()
    # Kolmogorov-Smirnov distance to Exp(1), against its 0.1% critical value.
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - (1 - torch.exp(-values))).abs().max().item()
    assert ks < 1.95 / math.sqrt(n), ks
    assert values.unique().numel() > 0.95 * n          # fine-grained: no coarse quantization of u
    assert values[-1] > 10                             # the tail is there
    rows = noise - 1
    corr = (rows[:-1] * rows[1:]).mean(-1) / (rows[:-1].std(-1) * rows[1:].std(-1))
    assert corr.abs().max() < 5 / math.sqrt(4096), corr.abs().max()


def test_seeded_draw_depends_only_on_seed_and_position(device):
    torch.manual_seed(1)
    vocab = 500
    logits = torch.randn(vocab, device=device) * 3
    keys = [(7, 0), (7, 1), (12345, 0), (-3, 40), (2**70, 5)]
    alone = torch.cat([seeded_batch(logits, [k], device) for k in keys])
    together = seeded_batch(logits, keys, device)
    assert torch.equal(alone, together)
    # In a batch with other rows (unseeded, filtered, greedy) and in another order, the draws stay the same.
    n_other = 6
    batch = torch.cat([torch.randn(n_other, vocab, device=device), logits.repeat(len(keys), 1)])
    temperatures = torch.cat([const(1.0, 3, device), const(0.0, 3, device), const(1.0, len(keys), device)])
    order = list(reversed(range(len(keys))))
    extras = SamplingTensors(
        top_ks=torch.tensor([5] + [vocab] * (n_other + len(keys) - 1), device=device),
        top_ps=torch.tensor([0.9] + [1.0] * (n_other + len(keys) - 1), device=device),
        seed_rows=torch.arange(n_other, n_other + len(keys), device=device),
        seed_keys=torch.tensor([seed_key(*keys[i]) for i in order], device=device))
    mixed, _ = Sampler()(batch, temperatures, extras)
    assert torch.equal(mixed[n_other:], alone[order])
    # Different positions of one seed are different draws (not all the same token).
    assert len(set(seeded_batch(logits, [(7, p) for p in range(50)], device).tolist())) > 10


def test_unseeded_draws_vary():
    logits = torch.zeros(1, 1000)
    draws = {Sampler()(logits, torch.ones(1))[0].item() for _ in range(20)}
    assert len(draws) > 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_draws_equal_on_cpu_and_cuda():
    torch.manual_seed(2)
    logits = torch.randn(151936) * 2
    cases = [(s, p) for s in range(16) for p in range(4)]
    assert torch.equal(seeded_batch(logits, cases, "cpu"), seeded_batch(logits.cuda(), cases, "cuda").cpu())


def test_logprobs_are_those_of_the_sampled_distribution(device):
    torch.manual_seed(3)
    logits = torch.randn(4, 50, device=device)
    temperatures = torch.tensor([0.0, 0.7, 1.0, 1.3], device=device)
    vocab = logits.size(1)
    extras = SamplingTensors(top_ks=torch.tensor([vocab, vocab, 3, vocab], device=device),
                             top_ps=torch.tensor([1.0, 1.0, 1.0, 0.5], device=device), num_logprobs=5)
    tokens, (sampled, top, top_ids) = Sampler()(logits, temperatures, extras)
    expected = torch.stack([
        logits[0].log_softmax(-1),                                           # greedy: plain log_softmax
        (logits[1] / 0.7).log_softmax(-1),
        logits[2].masked_fill(logits[2] < logits[2].topk(3).values[-1], float("-inf")).log_softmax(-1),
        nucleus_log_softmax(logits[3] / 1.3, 0.5),
    ])
    torch.testing.assert_close(top, expected.topk(5, dim=-1).values)
    torch.testing.assert_close(sampled, expected.gather(1, tokens.unsqueeze(1)).squeeze(1))
    torch.testing.assert_close(expected.gather(1, top_ids), top)
    assert tokens[0] == logits[0].argmax()
    assert torch.isfinite(sampled).all()        # a sampled token is never one that was filtered out


def nucleus_log_softmax(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Reference top-p, one token at a time: keep the most probable tokens until their mass reaches p."""
    probs = logits.softmax(-1)
    keep, mass = [], 0.0
    for i in probs.argsort(descending=True).tolist():
        keep.append(i)
        mass += probs[i].item()
        if mass >= p:
            break
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[keep] = False
    return logits.masked_fill(mask, float("-inf")).log_softmax(-1)


def test_vanishing_temperature_is_argmax_with_finite_logprobs():
    """Issue 22 item 5: T = 1e-40 with filters and logprobs gave token 0 and NaN; any T below 1e-5 is the argmax,
    in the Sampler itself (the fast path and the full one), not only through SamplingParams."""
    logits = torch.randn(8, 300) * 4
    temperatures = torch.full((8,), 1e-40)
    assert torch.equal(Sampler()(logits, temperatures)[0], logits.argmax(-1))
    extras = SamplingTensors(top_ks=torch.full((8,), 5), top_ps=torch.full((8,), 0.9), min_ps=torch.full((8,), 0.2),
                             num_logprobs=2)
    tokens, (sampled, top, _) = Sampler()(logits, temperatures, extras)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.isfinite(sampled).all() and not top.isnan().any()     # -inf: dropped by these rows' filters


# ---- the CUDA fast path's kernel, under Triton's interpreter without a GPU ------------------------------------

def check_gumbel_kernel(device: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """Greedy rows with ties (the kernel's argmax, torch's; at T = 0 and at T = 1e-40, below SAMPLING_EPS), and rows
    sampled at T = 1 from log(PROBS) and at T = 0.5 from log(PROBS) / 2 (so both should follow PROBS), a last -inf
    token in each, each row cut into several chunks of several blocks; and rows of -inf only, which (as
    torch.argmax) answer index 0."""
    from nanovllm.kernels import sampling
    torch.manual_seed(0)
    sampling.SAMPLE_BLOCK, sampling.SAMPLE_CHUNK = 4, 8     # two chunks per row, the first of two blocks (restored below)
    try:
        greedy = (torch.randn(64, 9, device=device) * 2).round()     # many ties
        logits = torch.tensor([math.log(p) for p in PROBS] + [float("-inf")], device=device).repeat(DRAWS_KERNEL, 1)
        masked = torch.full((2, 9), float("-inf"), device=device)
        batch = torch.cat([greedy, logits, logits / 2, masked])
        temps = torch.cat([const(0.0, 32, device), const(1e-40, 32, device),
                           const(1.0, DRAWS_KERNEL, device), const(0.5, DRAWS_KERNEL, device),
                           torch.tensor([0.0, 1.0], device=device)])
        out = sampling.gumbel_sample(batch.to(torch.bfloat16), temps).cpu()
        assert out[-2:].tolist() == [0, 0], out[-2:]
    finally:
        sampling.SAMPLE_BLOCK, sampling.SAMPLE_CHUNK = 2048, 8192
    return (out[:64].tolist(), greedy.to(torch.bfloat16).float().argmax(-1).cpu().tolist(),
            out[64:64 + DRAWS_KERNEL].tolist(), out[64 + DRAWS_KERNEL:-2].tolist())


DRAWS_KERNEL = 600      # the interpreter runs programs one by one: enough for the chi-square, not more


def test_fast_path_kernel_is_argmax_and_draws_from_softmax():
    got_greedy, want_greedy, at_1, at_half = run_check(check_gumbel_kernel, "cuda" if torch.cuda.is_available()
                                                       else "cpu")
    assert got_greedy == want_greedy
    assert_follows(torch.tensor(at_1), PROBS + [0.0])
    assert_follows(torch.tensor(at_half), PROBS + [0.0])
