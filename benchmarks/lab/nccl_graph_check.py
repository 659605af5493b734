"""NCCL as the tensor-parallel engine uses it, in isolation: two processes, one GPU each, per-step times.

    python benchmarks/lab/nccl_graph_check.py [MODE]    (NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT: the transport)

(no MODE)      an all-reduce eagerly, captured in a CUDA graph and replayed between eager gathers, then the
               graph is freed and the group destroyed: what a healthy engine does.
--keep-graph   the group is destroyed while the graph exists. On an H200 pair (NCCL 2.28) the processes never
               exited: NCCL waits for the graphs that captured its collectives to be destroyed first.
--kill-peer    rank 1 dies; rank 0 replays the graph (stuck on its dead peer) while a second thread aborts the
               group, keeping the graph. Does the replay return, and does the abort (before rank 0 leaves)?
--kill-peer-drop-graph   the same, but a third thread drops the graph as the abort starts, as the engine does.
"""
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def say(rank: int, what: str, start: float, sync: bool = True):
    if sync:
        torch.cuda.synchronize()
    print(f"rank {rank}: {what} at {time.perf_counter() - start:.2f}s", flush=True)


def main(rank: int, world: int, port: int, mode: str):
    start = time.perf_counter()
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    x = torch.full((4096,), rank + 1.0, device="cuda")
    dist.all_reduce(x)
    assert x[0].item() == world * (world + 1) / 2
    say(rank, "eager all_reduce ok", start)

    buf = torch.zeros(4096, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = buf * 2
        dist.all_reduce(y)
    say(rank, "capture ok", start)
    for i in range(100):
        buf.fill_(i + rank)
        graph.replay()
        parts = [torch.empty_like(y) for _ in range(world)] if rank == 0 else None
        dist.gather(y, parts, 0)    # an eager collective between replays, as the lm head does
        if rank == 0:
            expected = 2 * sum(i + r for r in range(world))
            assert all(p[0].item() == expected for p in parts), (i, [p[0].item() for p in parts])
    say(rank, "100 replays with eager gathers ok", start)

    if mode.startswith("--kill-peer"):
        if rank == 1:
            os._exit(1)
        graphs = {4096: graph}      # held as the ModelRunner holds them
        del graph

        def abort():
            time.sleep(2)
            if mode == "--kill-peer-drop-graph":    # what WorkerPool._abort_nccl does
                threading.Thread(target=graphs.clear, daemon=True).start()
            say(0, "aborting the group", start, sync=False)
            dist.distributed_c10d._abort_process_group()
            say(0, "abort returned", start, sync=False)
        threading.Thread(target=abort, daemon=True).start()
        graphs[4096].replay()
        torch.cuda.synchronize()
        say(0, f"the replay on a dead peer returned ({len(graphs)} graph left)", start, sync=False)
        time.sleep(8)
        say(0, "leaving (the graph goes now, if it is still there)", start, sync=False)
        graphs.clear()
        time.sleep(3)
        return

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(1000):
        graph.replay()
    torch.cuda.synchronize()
    print(f"rank {rank}: replay of a 16 KiB all-reduce graph: {(time.perf_counter() - t) * 1e3:.1f} us", flush=True)
    if mode != "--keep-graph":
        del graph
        torch.cuda.synchronize()
    dist.destroy_process_group()
    say(rank, "destroy_process_group ok", start)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    world = 2
    probe = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    port = probe.port
    del probe
    # Plain processes, not mp.spawn: spawn would terminate rank 0 as soon as rank 1 dies.
    ctx = mp.get_context("spawn")
    processes = [ctx.Process(target=main, args=(rank, world, port, mode)) for rank in range(world)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    print("exit codes", [p.exitcode for p in processes], flush=True)
