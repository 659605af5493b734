from contextlib import nullcontext
from dataclasses import replace

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.step_batch import StepBatch
from nanovllm.engine.workers import WorkerPool


class Executor:
    """Rank 0's side of the model: the local ModelRunner and, with tensor parallelism, the worker processes that
    run ranks 1..N-1. Every call runs on every rank; rank 0's result is returned."""

    def __init__(self, config: Config, eos_token_ids: frozenset[int]):
        self.runner: ModelRunner | None = None
        # Ranks 1..N-1 start loading in their own processes while rank 0 loads here.
        self.pool = WorkerPool(config, on_abort=self._drop_cuda_graphs) if config.tensor_parallel_size > 1 else None
        with self.pool.guard() if self.pool is not None else nullcontext():    # a failure stops the workers
            self.runner = ModelRunner(config, eos_token_ids)

    def call(self, name: str, *args, worker_args: tuple | None = None):
        """Run ModelRunner method `name` on every rank; the workers get `worker_args` where given."""
        if self.pool is None:
            return getattr(self.runner, name)(*args)
        with self.pool.guard():
            self.pool.send(name, args if worker_args is None else worker_args)
            return getattr(self.runner, name)(*args)

    def run(self, batch: StepBatch):
        """Launch one step on every rank; only rank 0 samples, so the workers' copy leaves the sampling rows out."""
        return self.call("run", batch, worker_args=(replace(batch, sampling=None),))

    def _drop_cuda_graphs(self):
        if self.runner is not None and self.runner.graphs is not None:
            self.runner.graphs.clear()

    def exit(self):
        """Free rank 0's CUDA graphs before the workers (and the NCCL group) go (see ModelRunner.exit)."""
        if self.runner is not None:     # after a worker died a replay may be stuck: CUDA frees its graph once it ends
            self.runner.exit(synchronize=self.pool is None or self.pool.failure is None)
        if self.pool is not None:
            self.pool.close()
