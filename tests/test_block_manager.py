"""BlockManager invariants under random allocate / append / free sequences."""
import random
from collections import Counter

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence

BLOCK = 4


def check_invariants(bm: BlockManager, live: list[Sequence], written: dict[int, list[int]] | None = None):
    """`written`: the tokens whose KV each block holds, where the test tracks it: only such blocks may be shared."""
    refs = Counter(b for seq in live for b in seq.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id]
    free = list(bm.free_block_ids)
    assert len(free) == len(set(free)), "a block is free twice"
    assert all(bm.blocks[b].ref_count == 0 for b in free)
    assert sum(block.ref_count > 0 for block in bm.blocks) + len(free) == len(bm.blocks), "a block is lost"
    for h, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == h
        if written is not None:
            assert written.get(block_id) == bm.blocks[block_id].token_ids, "a block is shared before its KV is written"
    for seq in live:
        assert len(seq.block_table) == bm.num_blocks(seq)


def compute(bm: BlockManager, seq: Sequence, written: dict[int, list[int]] | None = None):
    """What a decode step does: everything scheduled is computed, then full blocks are published when booked."""
    seq.num_scheduled_tokens = len(seq) - seq.num_computed_tokens
    seq.num_computed_tokens = len(seq)
    if written is not None:
        for i in range(len(seq) // BLOCK):
            written[seq.block_table[i]] = seq.token_ids[i * BLOCK:(i + 1) * BLOCK]
    bm.publish_blocks(seq, seq.num_computed_tokens)


def prefill(bm: BlockManager, seq: Sequence, written: dict[int, list[int]] | None = None, launched: bool = True):
    """What a prefill step does: publish at scheduling what it will compute, then launch it (or fail to)."""
    bm.publish_blocks(seq, len(seq))
    if launched:
        compute(bm, seq, written)


@pytest.mark.parametrize("seed", range(20))
def test_random_workload_keeps_accounting_exact(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=BLOCK)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    live: list[Sequence] = []
    written: dict[int, list[int]] = {}      # what the "GPU" holds: block -> the tokens whose KV is there
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
                if rng.random() < 0.15:     # the step's launch raises: the request is aborted
                    prefill(bm, seq, written, launched=False)
                    bm.deallocate(seq)
                else:
                    prefill(bm, seq, written)
                    live.append(seq)
        elif op < 0.8 and live:
            seq = rng.choice(live)
            seq.append_token(rng.randrange(50))
            if bm.can_append(seq):
                bm.may_append(seq)
                compute(bm, seq, written)
            else:
                bm.deallocate(seq)
                live.remove(seq)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.deallocate(seq)
        check_invariants(bm, live, written)
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


def test_blocks_published_at_scheduling_are_shared_within_the_step():
    """A prompt's blocks are findable as soon as the chunk that fills them is scheduled, and not before."""
    bm = BlockManager(num_blocks=12, block_size=BLOCK)
    prefix = list(range(1, 11))                 # 2 full blocks and 2 tokens
    a, b, c = Sequence(prefix + [20]), Sequence(prefix + [21, 22]), Sequence(prefix + [23])
    bm.allocate(a, bm.can_allocate(a))
    bm.publish_blocks(a, 6)                     # a 6-token chunk: block 0 full, block 1 not yet
    assert [bm.blocks[i].hash != -1 for i in a.block_table] == [True, False, False]
    bm.allocate(b, bm.can_allocate(b))
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    bm.publish_blocks(a, len(a))                # the rest of a: block 1 full, its last block partial
    bm.allocate(c, bm.can_allocate(c))
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [3, 2, 1]
    live = [a, b, c]
    for seq in (a, c, b):
        check_invariants(bm, live)
        bm.deallocate(seq)
        live.remove(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 12


def test_can_allocate_counts_hits_on_blocks_published_this_step_as_in_use():
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    a = Sequence(list(range(8)) + [99])          # 3 blocks
    bm.allocate(a, bm.can_allocate(a))
    bm.publish_blocks(a, len(a))
    b = Sequence(list(range(8)) + [7])           # its 2 full blocks are a's: it needs 1 more, and 1 is free
    assert bm.can_allocate(b) == a.block_table[:2]
    bm.allocate(b, bm.can_allocate(b))
    assert bm.num_free_blocks == 0 and bm.can_allocate(Sequence(list(range(8)) + [5])) is None
    check_invariants(bm, [a, b])


@pytest.mark.parametrize("order", ["publisher_first", "hitter_first"])
def test_a_step_that_never_launched_withdraws_its_blocks(order):
    """Blocks published when a step was scheduled whose launch then raised hold no KV: freeing its sequences
    (they are aborted) unpublishes them, whoever of them goes first, and a later prompt computes them itself."""
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    a, b = Sequence(list(range(9))), Sequence(list(range(8)) + [42])
    old = Sequence([50, 51, 52, 53, 54])         # computed in an earlier step: stays shared
    bm.allocate(old, bm.can_allocate(old))
    prefill(bm, old)
    bm.allocate(a, bm.can_allocate(a))
    prefill(bm, a, launched=False)
    bm.allocate(b, bm.can_allocate(b))           # b hits a's blocks in the same step
    prefill(bm, b, launched=False)
    assert b.num_cached_tokens == 8
    for seq in ((a, b) if order == "publisher_first" else (b, a)):
        bm.deallocate(seq)
    assert list(bm.hash_to_block_id.values()) == old.block_table[:1]
    check_invariants(bm, [old])
    c = Sequence(list(range(9)))
    bm.allocate(c, bm.can_allocate(c))
    assert c.num_cached_tokens == 0
    d = Sequence([50, 51, 52, 53, 60])
    bm.allocate(d, bm.can_allocate(d))
    assert d.num_cached_tokens == 4
