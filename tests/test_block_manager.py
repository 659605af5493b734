"""BlockManager invariants under random allocate / append / free sequences."""
import random
from collections import Counter

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence

BLOCK = 4


def check_invariants(bm: BlockManager, live: list[Sequence]):
    refs = Counter(b for seq in live for b in seq.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id]
    free = list(bm.free_block_ids)
    assert len(free) == len(set(free)), "a block is free twice"
    assert all(bm.blocks[b].ref_count == 0 for b in free)
    assert sum(block.ref_count > 0 for block in bm.blocks) + len(free) == len(bm.blocks), "a block is lost"
    for h, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == h
    for seq in live:
        assert len(seq.block_table) == bm.num_blocks(seq)


def compute(bm: BlockManager, seq: Sequence):
    """What a step does: everything scheduled is computed, then full blocks are published."""
    seq.num_scheduled_tokens = len(seq) - seq.num_computed_tokens
    seq.num_computed_tokens = len(seq)
    bm.publish_computed_blocks(seq)


@pytest.mark.parametrize("seed", range(20))
def test_random_workload_keeps_accounting_exact(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=BLOCK)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(300):
        op = rng.random()
        if op < 0.35:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 9))]
            seq = Sequence(tokens)
            hits = bm.can_allocate(seq)
            if hits is not None:
                free_before = bm.num_free_blocks
                bm.allocate(seq, hits)
                assert seq.num_cached_tokens % BLOCK == 0 and seq.num_cached_tokens < len(seq)
                assert bm.num_free_blocks >= free_before - bm.num_blocks(seq)
                compute(bm, seq)
                live.append(seq)
        elif op < 0.8 and live:
            seq = rng.choice(live)
            seq.append_token(rng.randrange(50))
            if bm.can_append(seq):
                bm.may_append(seq)
                compute(bm, seq)
            else:
                bm.deallocate(seq)
                live.remove(seq)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.deallocate(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.deallocate(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 24


def test_prefix_hit_is_confirmed_by_token_ids():
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a, bm.can_allocate(a))
    compute(bm, a)
    b = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 10])
    bm.allocate(b, bm.can_allocate(b))
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    # Forge a hash collision: the stored token ids must veto the hit.
    bm.blocks[a.block_table[0]].token_ids = [0, 0, 0, 0]
    c = Sequence([1, 2, 3, 4, 5])
    bm.allocate(c, bm.can_allocate(c))
    assert c.num_cached_tokens == 0


def test_freed_blocks_keep_their_hash_and_can_be_revived():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    a = Sequence(list(range(9)))
    bm.allocate(a, bm.can_allocate(a))
    compute(bm, a)
    table = list(a.block_table)
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    b = Sequence(list(range(9)))
    assert bm.can_allocate(b) is not None
    bm.allocate(b, bm.can_allocate(b))
    assert b.block_table[:2] == table[:2] and b.num_cached_tokens == 8


def test_can_allocate_counts_revived_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    a = Sequence(list(range(8)) + [99])     # 3 blocks, the first two full
    bm.allocate(a, bm.can_allocate(a))
    compute(bm, a)
    b = Sequence(list(range(8)) + [7, 7])       # shares a's 2 full blocks and needs 1 new one
    assert bm.can_allocate(b) is None             # no block is free while a holds all 3
    c = Sequence(list(range(8)) + [1, 2, 3, 4, 5])   # 4 blocks can never fit in 3
    bm.deallocate(a)
    assert bm.can_allocate(b) is not None and bm.can_allocate(c) is None
    bm.allocate(b, bm.can_allocate(b))                              # the 2 cached blocks are revived from the free list
    assert b.num_cached_tokens == 8 and bm.num_free_blocks == 0
