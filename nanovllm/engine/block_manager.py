from collections import deque

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


class Block:
    """One page of the KV cache: `block_size` token slots in every layer."""

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1              # -1: not a full, computed block, so not shareable
        self.token_ids: list[int] = []  # a full block's tokens, to confirm a hash hit


def chain_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    """Hands out KV-cache blocks with reference counts and shares full blocks between prompts (prefix caching): a full
    block is findable in `hash_to_block_id` once a launched step computes its KV (see `publish_blocks`). Freed blocks
    keep their hash and queue at the back of `free_block_ids`: the least recently freed is reused first, and a later
    prompt may revive one."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks(self, seq: Sequence) -> int:
        return -(-len(seq) // self.block_size)

    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0
        self._unpublish(block)
        block.ref_count = 1
        return block_id

    def _unpublish(self, block: Block):
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids = -1, []

    def can_allocate(self, seq: Sequence) -> list[int] | None:
        """The block ids of the longest cached prefix of `seq` (leaving at least one token to compute), to hand
        to `allocate`, or None when the free blocks cannot hold the rest."""
        hits, h = [], -1
        for i in range((len(seq) - 1) // self.block_size):
            token_ids = self._block_tokens(seq, i)
            h = chain_hash(token_ids, h)
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                break
            hits.append(block_id)
        hits_in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return hits if self.num_free_blocks >= self.num_blocks(seq) - hits_in_use else None

    def allocate(self, seq: Sequence, hits: list[int]):
        """Give `seq` a block table for all its tokens, starting with the cached prefix `hits` (from can_allocate)."""
        assert not seq.block_table
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:        # revive a freed block that still holds this prefix
                self.free_block_ids.remove(block_id)
            block.ref_count += 1
        seq.block_table += hits + [self._take_free_block() for _ in range(self.num_blocks(seq) - len(hits))]
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_cached_tokens < 0:       # a preempted sequence's later hits may cover its completion: not counted
            seq.num_cached_tokens = seq.num_computed_tokens

    def deallocate(self, seq: Sequence):
        # Reverse order: a sequence's tail blocks are the least likely to be shared, so they are reused first.
        num_computed_blocks = seq.num_computed_tokens // self.block_size
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            if i >= num_computed_blocks:
                # Published for a step that was scheduled but never launched (it raised): its KV was never written.
                self._unpublish(block)
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids.append(block.block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) >= self.num_blocks(seq) or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence):
        if len(seq.block_table) < self.num_blocks(seq):
            seq.block_table.append(self._take_free_block())

    def publish_blocks(self, seq: Sequence, num_tokens: int):
        """Make the full blocks among the first `num_tokens` tokens of `seq` findable by later prompts: tokens that are
        computed, or that the step being scheduled computes (launched at once, under the engine's step lock, so any step
        that hits such a block runs after its KV is written; for a prompt of that same step, see the scheduler). Only
        booked tokens can be hashed (a decode step's input may still be on the GPU): a block decode fills is published
        when its token is booked."""
        end = min(num_tokens, len(seq.token_ids)) // self.block_size
        first = end     # blocks fill in order: the unpublished ones are the last full ones
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash == -1:
            first -= 1
        prefix_hash = self.blocks[seq.block_table[first - 1]].hash if first else -1
        for i in range(first, end):
            token_ids = self._block_tokens(seq, i)
            prefix_hash = chain_hash(token_ids, prefix_hash)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = prefix_hash, token_ids
            self.hash_to_block_id[prefix_hash] = block.block_id
