from collections import deque
from itertools import repeat
from time import perf_counter

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides who runs in each step, books the tokens that come back, and when a request ends (`_finish_reason`).

    Each step (as vLLM's) decodes every running sequence, then admits waiting ones (new or preempted) in FCFS order
    with the token budget left, while blocks and `max_num_seqs` allow, chunking a prompt longer than that budget.
    When a decode cannot get a block, the most recently admitted sequence is preempted (its blocks are freed and it
    is recomputed later: cheap while its prefix is still cached); a step that preempts admits nobody unless no decode
    is left."""

    def __init__(self, config: Config, num_kvcache_blocks: int, max_model_len: int, eos_token_ids: tuple[int, ...]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len      # the runner's: below the configured one when its cache holds fewer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_kvcache_blocks, config.kvcache_block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence):
        """Queue a request, and right behind it its other samples (`held_samples`, n > 1): admitted after it, in
        its step or a later one, they find its prompt's full blocks in the prefix cache (published when its
        prefill is scheduled) and compute only the last partial block."""
        if len(seq.held_samples) != seq.sampling_params.n - 1:
            raise ValueError(f"n={seq.sampling_params.n}: queue Sequence.fork()'s first sample, which holds the others")
        self.waiting.extend([seq, *seq.held_samples])
        seq.held_samples = []

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Pick this step's sequences (each gets `num_scheduled_tokens`), decodes first. Returns (seqs, is_prefill):
        a step that admits a prompt is a prefill batch, its decodes one-token rows of it."""
        num_preemptions = self.num_preemptions
        decodes = self._schedule_decode()
        # A step that had to preempt for its decodes frees blocks rather than claiming more.
        prompts = [] if self.num_preemptions > num_preemptions and decodes else self._schedule_prefill(
            self.max_num_batched_tokens - len(decodes))
        return decodes + prompts, bool(prompts)

    def _schedule_prefill(self, budget: int) -> list[Sequence]:
        scheduled: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if len(seq.token_ids) < len(seq):
                break       # preempted while its last token was on the GPU: admitted again once that is booked
            if not seq.block_table:
                if (cached_blocks := self.block_manager.can_allocate(seq)) is None:
                    break
                self.block_manager.allocate(seq, cached_blocks)
            seq.num_scheduled_tokens = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            # The blocks this chunk fills are shared from now on: a later prompt of this same step may hit them (one
            # system prompt for a whole batch is computed once), as every layer stores the step's K/V before it
            # attends. A block the chunk leaves part-filled waits for the chunk that fills it.
            self.block_manager.publish_blocks(seq, seq.num_computed_tokens + seq.num_scheduled_tokens)
            scheduled.append(seq)
            if seq.num_scheduled_tokens < seq.num_uncomputed_tokens:
                break       # a chunk: the rest of this prompt stays at the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        kept: list[Sequence] = []       # the running ones not preempted, in order
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            if len(seq) - seq.num_prompt_tokens >= seq.sampling_params.max_tokens or len(seq) >= self.max_model_len:
                kept.append(seq)    # its last token by length is on the GPU: it finishes when that is booked
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
                kept.append(seq)
        self.running.extendleft(reversed(kept))
        return scheduled

    def preempt(self, seq: Sequence):
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        # Behind a prompt whose chunks are under way: it holds blocks, and ahead of it this sequence could wait for
        # blocks that only that prompt's finishing (and, later, ending) would free, while the prompt waits for it.
        self.waiting.insert(1 if self.waiting and self.waiting[0].block_table else 0, seq)

    def finish(self, seq: Sequence, reason: str):
        """End a request wherever it is, for `reason` ("stop", "length" or "abort"), and free its blocks."""
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.block_manager.deallocate(seq)
        seq.num_tokens = len(seq.token_ids)     # booked tokens only: what a step launched after it sampled is dropped
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.finished_time = reason, perf_counter()

    def reserve_output_tokens(self, seqs: list[Sequence]) -> list[int]:
        """Book a step the runner has launched: its tokens count as computed (their KV is written before any later
        step reads it) and each sequence it completes gets its next token reserved. Returns, per row, the index
        that row's sampled token will take in its sequence (-1 for a chunk mid-prompt: its sample means nothing)."""
        token_indices = []
        for seq in seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
            completed = seq.num_computed_tokens == len(seq)
            token_indices.append(len(seq) if completed else -1)
            if completed:
                seq.num_tokens += 1     # the place of the token this step samples, booked later by append_token
        return token_indices

    def postprocess(self, seqs: list[Sequence], token_indices: list[int], token_ids: list[int],
                    logprobs: list[dict[int, float] | None] | None = None) -> list[Sequence]:
        """Book one step's sampled tokens (`token_indices` from `reserve_output_tokens`). A sequence that finished or
        was aborted since the launch drops its token. Returns the sequences that got one (finished ones too)."""
        advanced = []
        for seq, index, token_id, token_logprobs in zip(seqs, token_indices, token_ids, logprobs or repeat(None)):
            if seq.is_finished:
                continue
            self.block_manager.publish_blocks(seq, seq.num_computed_tokens)    # the blocks decode filled
            if index < 0:
                continue
            assert index == seq.num_prompt_tokens + seq.num_completion_tokens, "tokens booked out of order"
            seq.append_token(token_id)
            if seq.first_token_time is None:
                seq.first_token_time = perf_counter()
            if token_logprobs is not None:
                seq.logprobs.append(token_logprobs)
            advanced.append(seq)
            if (reason := self._finish_reason(seq)) is not None:
                self.finish(seq, reason)
        return advanced

    def _finish_reason(self, seq: Sequence) -> str | None:
        """Whether the token just appended ends `seq`: a stop token, a stop string in the text, or the length."""
        sp, token_id = seq.sampling_params, seq.last_token
        reason = None
        if token_id in sp.stop_token_ids or (token_id in self.eos_token_ids and not sp.ignore_eos):
            reason = "stop"     # the sampler masks these until min_tokens
        elif seq.num_completion_tokens >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        detokenizer = seq.detokenizer
        if detokenizer is not None and (detokenizer.every_step or reason is not None):
            token_ids = seq.completion_token_ids
            if reason == "stop" and not sp.include_stop_str_in_output:
                token_ids = token_ids[:-1]      # it ended on a stop token: leave that token's text out, as vLLM
            if detokenizer.update(token_ids, final=reason is not None,
                                  check_stop=seq.num_completion_tokens >= sp.min_tokens) is not None:
                reason = "stop"     # also over "length": the stop string came first
        return reason
