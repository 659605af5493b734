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
        self.token_ids: list[int] = []

    def set_hash(self, h: int, token_ids: list[int]):
        self.hash = h
        self.token_ids = token_ids

    def reset(self):
        self.ref_count = 1
        self.hash = -1
        self.token_ids = []


def chain_hash(token_ids: list[int], prefix_hash: int = -1) -> int:
    """Hash of a full block: its token ids chained with the previous block's hash."""
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    """Hands out KV-cache blocks with reference counts and shares full blocks between prompts (prefix caching).

    A full block is published in `hash_to_block_id` once its KV has been computed. Freed blocks keep their
    hash and go to the back of `free_block_ids`, so the least recently freed block is reused first and a
    later request with the same prefix can revive a freed block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> int:
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.reset()
        self.used_block_ids.add(block_id)
        return block_id

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of `seq`, leaving at least one token to compute."""
        hits, h = [], -1
        for i in range((len(seq) - 1) // self.block_size):
            token_ids = seq.block(i)
            h = chain_hash(token_ids, h)
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != token_ids:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        hits_in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.num_free_blocks >= seq.num_blocks - hits_in_use

    def allocate(self, seq: Sequence):
        """Give `seq` a block table for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:        # revive a freed block that still holds this prefix
                self.free_block_ids.remove(block_id)
                self.used_block_ids.add(block_id)
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def deallocate(self, seq: Sequence):
        # Reverse order: a sequence's tail blocks are the least likely to be shared, so they are reused first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.used_block_ids.remove(block_id)
                self.free_block_ids.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step of `seq` can get the block it may need."""
        return len(seq.block_table) >= seq.num_blocks or self.num_free_blocks >= 1

    def may_append(self, seq: Sequence):
        """Before a decode step: add a block when the token to compute starts a new one."""
        if len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block())

    def publish_computed_blocks(self, seq: Sequence):
        """After a step: make the blocks that became full and computed findable by later prompts."""
        num_full = seq.num_computed_tokens // self.block_size
        if num_full == 0 or self.blocks[seq.block_table[num_full - 1]].hash != -1:
            return      # the usual decode step: no block filled up (blocks are published in order)
        first_unhashed = next((i for i in range(num_full - 1, -1, -1)
                               if self.blocks[seq.block_table[i]].hash != -1), -1) + 1
        prefix_hash = self.blocks[seq.block_table[first_unhashed - 1]].hash if first_unhashed else -1
        for i in range(first_unhashed, num_full):
            token_ids = seq.block(i)
            prefix_hash = chain_hash(token_ids, prefix_hash)
            block = self.blocks[seq.block_table[i]]
            block.set_hash(prefix_hash, token_ids)
            self.hash_to_block_id[prefix_hash] = block.block_id
