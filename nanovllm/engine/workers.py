"""Ranks 1..N-1 of a tensor-parallel engine: spawned processes running the same ModelRunner as rank 0.

Rank 0 writes each call (method name and args, pickled) once into a shared-memory buffer, then posts each
worker's semaphore (multiprocessing.Event's set() would wait forever for a killed sleeper). Every call meets in
the model's collectives, so all workers have read call k before call k+1 overwrites it.
A worker that raises sends its traceback over a pipe and exits. Rank 0 notices a dead worker through its process
sentinel and raises a RuntimeError naming the rank, instead of waiting forever in a collective; the engine is dead."""
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from contextlib import contextmanager, suppress
from itertools import count
from multiprocessing.connection import wait
from multiprocessing.shared_memory import SharedMemory

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner

HEADER = struct.Struct("<QQ")   # call number, payload length
EXIT_TIMEOUT_S = 10.0           # how long workers may take to leave after "exit" before they are terminated
DEATH_GRACE_S = 2.0             # after a failed call, how long to wait for the worker that caused it to exit


def _buffer_size(config: Config) -> int:
    """An upper bound on one pickled StepBatch: ids, positions and slots of its tokens, every block table, and
    per-sequence lengths, as int64 arrays."""
    max_blocks = -(-config.max_model_len // config.kvcache_block_size)
    ints = 3 * config.max_num_batched_tokens + config.max_num_seqs * (max_blocks + 4)
    return max(2**20, 8 * ints + 2**16)


def _join_group(config: Config, rank: int, store: dist.Store):
    nccl = config.device == "cuda"
    dist.init_process_group("nccl" if nccl else "gloo", store=store, rank=rank, world_size=config.tensor_parallel_size,
                            device_id=torch.device("cuda", rank) if nccl else None)


def _leave_group(how):
    """Destroy (or abort) this process's group if it still has one; it may refuse when broken or already gone."""
    if dist.is_initialized():
        with suppress(Exception):
            how()


class WorkerPool:
    def __init__(self, config: Config, on_abort=lambda: None):
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed process group (another "
                               "tensor-parallel LLM?); call exit() on that LLM first")
        n = config.tensor_parallel_size
        self.failure: str | None = None     # why the engine stopped; every later call raises it
        self.closed = False
        self.calls = 0
        self.lock = threading.Lock()
        self.aborted = False                # the NCCL group was aborted (a worker died)
        self.on_abort = on_abort            # drops rank 0's CUDA graphs when the group is aborted (see `_abort_nccl`)
        self.errors: dict[int, str] = {}    # rank -> the traceback it sent before exiting
        self.processes, self.conns, self.wakeups = [], [], []
        self.nccl = config.device == "cuda"
        self.shm = SharedMemory(create=True, size=_buffer_size(config))     # a random name per engine
        try:
            # Port 0: the OS picks a free port, so engines on one machine never collide.
            self.store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False)
            ctx = mp.get_context("spawn")
            for rank in range(1, n):
                wakeup = ctx.Semaphore(0)
                conn, child_conn = ctx.Pipe(duplex=False)    # worker -> rank 0: "ready", or its traceback
                process = ctx.Process(target=_worker_main, name=f"nanovllm-tp-rank{rank}", daemon=True,
                                      args=(config, rank, self.store.port, self.shm.name, wakeup, child_conn))
                process.start()
                child_conn.close()
                self.processes.append(process)
                self.conns.append(conn)
                self.wakeups.append(wakeup)
            self._wait_until_ready()
            if config.device == "cuda":
                torch.cuda.set_device(0)
            _join_group(config, 0, self.store)
        except BaseException:
            self.failure = self.failure or "start-up failed"
            self.close()
            raise
        threading.Thread(target=self._watch, name="nanovllm-tp-watchdog", daemon=True).start()

    def _wait_until_ready(self):
        """Wait until every worker is about to join the process group. One that dies first (say, a script
        without an `if __name__ == "__main__":` guard) raises here, rather than leaving rank 0 in the rendezvous."""
        pending = list(self.conns)
        while pending:
            for conn in wait(pending):
                rank = self.conns.index(conn) + 1
                try:
                    message = conn.recv()
                except EOFError:    # died before our code ran, e.g. while re-importing the main module
                    self.processes[rank - 1].join(DEATH_GRACE_S)
                    raise RuntimeError((self._death_report() or f"tensor-parallel worker rank {rank} closed its pipe")
                                       + " before starting; see its traceback above. A script that creates a "
                                       "tensor-parallel LLM needs an `if __name__ == \"__main__\":` guard") from None
                if message != "ready":
                    raise RuntimeError(f"tensor-parallel worker rank {rank} raised:\n{message}")
                pending.remove(conn)

    # ---- calls ----------------------------------------------------------------------------------------

    def send(self, name: str, args: tuple):
        data = pickle.dumps((name, args), protocol=pickle.HIGHEST_PROTOCOL)
        if HEADER.size + len(data) > self.shm.size:
            raise RuntimeError(f"a {len(data)}-byte call does not fit the {self.shm.size}-byte call buffer")
        self.calls += 1
        self.shm.buf[HEADER.size:HEADER.size + len(data)] = data
        HEADER.pack_into(self.shm.buf, 0, self.calls, len(data))
        for wakeup in self.wakeups:
            wakeup.release()

    @contextmanager
    def guard(self):
        """Run rank 0's side of a call. If it raises, the ranks are out of step: stop them all, and raise a dead
        worker's story when there is one. A call that returns after a worker died raises too: its result is garbage."""
        if self.failure is not None or self.closed:
            self.close()
            raise RuntimeError("the tensor-parallel engine has stopped: "
                               + (self.failure or "exit() was called; create a new LLM"))
        try:
            yield
        except BaseException as error:
            if not isinstance(error, KeyboardInterrupt):
                wait([p.sentinel for p in self.processes], DEATH_GRACE_S)
            report = self._death_report()
            self.failure = (self.failure or report or f"rank 0 raised {type(error).__name__} in the middle of a call "
                            f"({error}), leaving the ranks out of step; create a new LLM")
            self.close()
            # A ValueError that the workers raised too is bad input every rank rejects alike (say, no room for the
            # KV cache): keep rank 0's own. Any other error is a symptom of the worker's death.
            if report is not None and not (isinstance(error, ValueError) and self.errors):
                raise RuntimeError(report) from error
            raise
        if self.failure is not None:
            self.failure = self._death_report() or self.failure     # the watchdog may still be writing its report
            self.close()
            raise RuntimeError(self.failure)

    # ---- failures -------------------------------------------------------------------------------------

    def _death_report(self) -> str | None:
        """What happened to the workers that have exited, or None while all are alive."""
        with self.lock:
            lines = []
            for rank, (process, conn) in enumerate(zip(self.processes, self.conns), 1):
                if not wait([process.sentinel], 0):
                    continue
                # The kernel reaps a dying process a moment later (with a GPU, once the driver has torn its context
                # down, which can take long), so poll its exit code for a while, never block.
                deadline = time.monotonic() + 1.0
                while process.exitcode is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                code = process.exitcode
                with suppress(EOFError, OSError):
                    while conn.poll():
                        message = conn.recv()
                        if message != "ready":
                            self.errors[rank] = message
                if rank in self.errors:
                    lines.append(f"tensor-parallel worker rank {rank} raised:\n{self.errors[rank]}")
                elif code is None:
                    lines.append(f"tensor-parallel worker rank {rank} died (its exit status is not known yet)")
                else:
                    how = f" ({signal.Signals(-code).name})" if code < 0 else ""
                    lines.append(f"tensor-parallel worker rank {rank} died with exit code {code}{how}")
            return "\n".join(lines) or None

    def _watch(self):
        """When a worker exits, unless closing: record the failure first (see `guard`), then abort the NCCL group."""
        wait([p.sentinel for p in self.processes])
        if self.closed:
            return
        self.failure = self.failure or "a tensor-parallel worker died"
        self._abort_nccl()
        self.failure = self._death_report() or self.failure

    def _abort_nccl(self):
        """Abort the NCCL group, once: a second abort from another thread would wait on the first."""
        with self.lock:
            if not self.nccl or self.aborted:
                return
            self.aborted = True
        # NCCL's abort tells every kernel stuck on the dead peer to quit, then waits, holding the group's lock, until
        # each CUDA graph that captured its collectives is destroyed. So rank 0's graphs are dropped too, on a thread
        # of their own in case CUDA makes that wait for the stuck kernels (a graph mid-replay is freed once they quit).
        threading.Thread(target=self.on_abort, name="nanovllm-tp-drop-graphs", daemon=True).start()
        _leave_group(dist.distributed_c10d._abort_process_group)    # experimental, but there is no public API

    # ---- shutdown -------------------------------------------------------------------------------------

    def close(self):
        """Stop the workers (asking first when in step), destroy the process group, free the buffer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        healthy = self.failure is None and all(p.is_alive() for p in self.processes)
        if healthy:     # every rank destroys its side of the group at once (rank 0 has freed its CUDA graphs)
            self.send("exit", ())
            _leave_group(dist.destroy_process_group)
        for process in self.processes:
            process.join(EXIT_TIMEOUT_S if healthy else 0)
        for process in self.processes:
            for stop, patience in ((process.terminate, 2), (process.kill, None)):
                if process.is_alive():
                    stop()
                    process.join(patience)
        if not healthy:     # with a peer gone, NCCL's destroy could wait for it (or for live CUDA graphs) forever
            self._abort_nccl() if self.nccl else _leave_group(dist.destroy_process_group)
        for conn in self.conns:
            conn.close()
        self.store = None
        self.shm.close()
        with suppress(FileNotFoundError):
            self.shm.unlink()


# ---- the worker process ---------------------------------------------------------------------------------

def _worker_main(config: Config, rank: int, port: int, shm_name: str, wakeup, conn):
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the whole process group; rank 0 handles it
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        if config.device == "cuda":
            torch.cuda.set_device(rank)
        else:   # the ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        shm = SharedMemory(shm_name)
        conn.send("ready")
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False)
        _join_group(config, rank, store)
        _serve(ModelRunner(config), shm, wakeup)
    except BaseException:
        with suppress(OSError):
            conn.send(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)     # skip interpreter teardown: with the ranks out of step it could block
    shm.close()
    dist.destroy_process_group()


def _serve(runner, shm: SharedMemory, wakeup):
    for expected in count(1):
        wakeup.acquire()
        number, size = HEADER.unpack_from(shm.buf, 0)
        if number != expected:
            raise RuntimeError(f"call {expected} was overwritten by call {number} before this worker read it")
        name, args = pickle.loads(shm.buf[HEADER.size:HEADER.size + size])
        if name == "exit":
            runner.exit()   # frees its CUDA graphs, so that the process group can be destroyed
            return
        getattr(runner, name)(*args)


def _exit_with_parent():
    """A worker must not outlive rank 0's process (killed, or gone without cleaning up)."""
    wait([mp.parent_process().sentinel])
    os._exit(1)
