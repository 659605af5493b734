"""Does an NCCL all-reduce work on this machine eagerly, inside a captured CUDA graph, and mixed with an
eager gather, as the tensor-parallel engine uses them? And does the process group go away afterwards?
Two processes, one GPU each; prints per-step times.
    python benchmarks/nccl_graph_check.py [--keep-graph]    (NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT: the transport)
--keep-graph destroys the group while the graph still exists; on an H200 pair (NCCL 2.28) the processes then never
exited: NCCL waits for the graphs that captured its collectives to be destroyed first."""
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def step(rank: int, what: str, start: float):
    torch.cuda.synchronize()
    print(f"rank {rank}: {what} ok at {time.perf_counter() - start:.2f}s", flush=True)


def main(rank: int, world: int, port: int, keep_graph: bool):
    start = time.perf_counter()
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    x = torch.full((4096,), rank + 1.0, device="cuda")
    dist.all_reduce(x)
    assert x[0].item() == world * (world + 1) / 2
    step(rank, "eager all_reduce", start)

    buf = torch.zeros(4096, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = buf * 2
        dist.all_reduce(y)
    step(rank, "capture", start)
    for i in range(100):
        buf.fill_(i + rank)
        graph.replay()
        parts = [torch.empty_like(y) for _ in range(world)] if rank == 0 else None
        dist.gather(y, parts, 0)    # an eager collective between replays, as the lm head does
        if rank == 0:
            expected = 2 * sum(i + r for r in range(world))
            assert all(p[0].item() == expected for p in parts), (i, [p[0].item() for p in parts])
    step(rank, "100 replays with eager gathers", start)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(1000):
        graph.replay()
    torch.cuda.synchronize()
    print(f"rank {rank}: replay of a 16 KiB all-reduce graph: {(time.perf_counter() - t) * 1e3:.1f} us", flush=True)
    if not keep_graph:
        del graph
        torch.cuda.synchronize()
    dist.destroy_process_group()
    print(f"rank {rank}: destroy_process_group ok at {time.perf_counter() - start:.2f}s", flush=True)


if __name__ == "__main__":
    world = 2
    probe = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    port = probe.port
    del probe
    mp.spawn(main, args=(world, port, "--keep-graph" in sys.argv), nprocs=world)
