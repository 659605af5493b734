from dataclasses import dataclass
from itertools import chain

import numpy as np

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRows:
    """What only the sampling rank (0) reads: each row's parameters and how many tokens it has generated (a token
    still on the GPU counts), for seeds and min_tokens; and its sequence, whose tokens penalties count (read when
    the step is launched, before any later token is booked; never sent to other ranks)."""
    params: list[SamplingParams]
    output_lens: list[int]
    seqs: list[Sequence] | None

    def __getstate__(self):
        return None, {"params": self.params, "output_lens": self.output_lens, "seqs": None}   # (dict, slots)


@dataclass(slots=True)
class StepBatch:
    """One step as every rank runs it, built once by rank 0 from the scheduled sequences and sent to the other ranks
    as it is (without `sampling`). Prefill packs the scheduled tokens of all sequences (sequence i owns tokens
    cu_seqlens_q[i]:cu_seqlens_q[i + 1]; decoding sequences come first, one token each); decode has one row per
    sequence. Integer arrays are int64."""
    is_prefill: bool
    input_ids: np.ndarray       # [tokens]; a token still on the GPU holds 0, see sample_rows
    positions: np.ndarray       # [tokens]
    slot_mapping: np.ndarray    # [tokens]: the cache slot each token's K/V is written to
    cu_seqlens_q: np.ndarray    # [seqs + 1]
    context_lens: np.ndarray    # [seqs]: cached + scheduled tokens, what each sequence attends to
    block_tables: np.ndarray    # [seqs, most blocks], -1 padded
    sample_rows: np.ndarray     # [tokens]: r where the token is the previous step's sampled id number r, else -1
    sampling: SamplingRows | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def as_token_rows(self) -> "StepBatch":
        """This prefill as a decode batch of one row a token, each attending to its sequence's keys up to its own
        position (the step's earlier tokens included: every row's K/V is stored before any row attends), and
        sampling as its sequence does: so that a short prefill can replay a decode CUDA graph."""
        seq_of_token = np.repeat(np.arange(self.num_seqs), np.diff(self.cu_seqlens_q))
        sampling = self.sampling and SamplingRows([self.sampling.params[i] for i in seq_of_token],
                                                  [self.sampling.output_lens[i] for i in seq_of_token], None)
        return StepBatch(False, self.input_ids, self.positions, self.slot_mapping, np.arange(len(seq_of_token) + 1),
                         self.positions + 1, self.block_tables[seq_of_token], self.sample_rows, sampling)

    @classmethod
    def build(cls, seqs: list[Sequence], is_prefill: bool, block_size: int,
              previous_step: list[Sequence] = ()) -> "StepBatch":
        """The batch of `seqs` as scheduled. `previous_step`: the sequences of the step launched before, whose
        sampled ids (still on the GPU) are the inputs of decode rows the host has not booked yet."""
        n = len(seqs)
        width = max(len(s.block_table) for s in seqs)
        block_tables = np.array([s.block_table + [-1] * (width - len(s.block_table)) for s in seqs], np.int64)
        # A decoding sequence's one token (its last) may not be booked yet: the previous step sampled it on the GPU.
        pending = [len(s.token_ids) < len(s) for s in seqs]
        if is_prefill:
            query_lens = np.fromiter((s.num_scheduled_tokens for s in seqs), np.int64, n)
            starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
            context_lens = starts + query_lens
            tokens = chain.from_iterable([0] if p else s.scheduled_token_ids for s, p in zip(seqs, pending))
            input_ids = np.fromiter(tokens, np.int64, int(query_lens.sum()))
            positions = np.concatenate([np.arange(a, b) for a, b in zip(starts, context_lens)])
            seq_of_token = np.repeat(np.arange(n), query_lens)
            cu_seqlens_q = np.concatenate([[0], np.cumsum(query_lens)])
        else:   # one token a row: the last booked one, or the previous step's sample still on the GPU
            input_ids = np.array([0 if p else s.last_token for s, p in zip(seqs, pending)], np.int64)
            context_lens = np.fromiter(map(len, seqs), np.int64, n)
            positions, seq_of_token, cu_seqlens_q = context_lens - 1, np.arange(n), np.arange(n + 1)
        sample_rows = np.full(len(input_ids), -1, np.int64)
        if any(pending):
            rows = {s.seq_id: i for i, s in enumerate(previous_step)}
            sample_rows[cu_seqlens_q[1:][pending] - 1] = [rows[s.seq_id] for s, p in zip(seqs, pending) if p]
        slot_mapping = (block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size)
        sampling = SamplingRows([s.sampling_params for s in seqs], [len(s) - s.num_prompt_tokens for s in seqs], seqs)
        return cls(is_prefill, input_ids, positions, slot_mapping, cu_seqlens_q, context_lens, block_tables,
                   sample_rows, sampling)
