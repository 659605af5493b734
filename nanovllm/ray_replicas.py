"""Data parallelism on Ray: `LLM` replicas as Ray actors, each holding `tensor_parallel_size` GPUs.

    pip install "nano-vllm[ray]"

- `LLMPredictor`: the callable class for `ray.data.Dataset.map_batches` (a "prompt" column and optional
  SamplingParams columns in; "text", "token_ids", "finish_reason" added to each row).
- `ReplicaPool(model, num_replicas, **llm_kwargs).generate(prompts, sampling_params)`: a list of prompts over
  replicas that stay loaded between calls; `generate(prompts, sampling_params, model, num_replicas)` is one call.

A replica is one actor: its tensor-parallel ranks are processes the engine spawns beside it, so they share its node
and the GPUs Ray gave it (CUDA_VISIBLE_DEVICES). Ray restarts a replica that dies and retries its batches; an error
the engine raises (a bad prompt, option or checkpoint) reaches the caller as that error, not as Ray's wrapper.
Ray is imported only here, so `import nanovllm` never needs it.
"""
import dataclasses

from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def _plain(value):
    """A numpy value from a Ray Data batch as the Python value the engine checks for (int, str, list of ints)."""
    return value.tolist() if hasattr(value, "tolist") else value


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError('nanovllm.ray_replicas needs Ray: pip install "nano-vllm[ray]"') from None
    return ray


def _get(refs: list) -> list:
    """ray.get, raising an exception from a replica as itself rather than wrapped in Ray's RayTaskError."""
    ray = _ray()
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


class LLMPredictor:
    """For `ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model": ..., **llm_kwargs},
    compute=ray.data.ActorPoolStrategy(size=N), num_gpus=tensor_parallel_size, batch_size=...)`: each of the N
    actors holds one `LLM`. A batch's "prompt" column holds strings or token-id lists; a column named after a
    SamplingParams field (max_tokens, temperature, seed, ...) sets that field per row, over `sampling_params`. Every
    input column is kept, and each row gets its completion's "text", "token_ids" and "finish_reason", in the
    batch's order."""

    def __init__(self, model: str, sampling_params: SamplingParams | None = None, **llm_kwargs):
        self.llm = LLM(model, **llm_kwargs)
        self.sampling_params = sampling_params or SamplingParams()

    def __call__(self, batch: dict) -> dict:
        prompts = [_plain(p) for p in batch["prompt"]]
        fields = [name for name in SAMPLING_FIELDS if name in batch]
        params = [dataclasses.replace(self.sampling_params, **{name: _plain(batch[name][i]) for name in fields})
                  for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return {**batch, "text": [o["text"] for o in outputs], "token_ids": [o["token_ids"] for o in outputs],
                "finish_reason": [o["finish_reason"] for o in outputs]}


class _Replica:
    """One LLM in a Ray actor. An error from LLM(...) is kept and raised by every call: Ray reports a failed
    constructor only as text (ActorDiedError), while a call's exception reaches the caller as itself."""

    def __init__(self, model: str, llm_kwargs: dict):
        self.error = None
        try:
            self.llm = LLM(model, **llm_kwargs)
        except Exception as e:
            self.error = e

    def ready(self):
        """Returns once the engine has loaded, or raises why it did not."""
        if self.error is not None:
            raise self.error

    def generate(self, prompts: list, sampling_params) -> list[dict]:
        self.ready()
        return self.llm.generate(prompts, sampling_params, use_tqdm=False)


class ReplicaPool:
    """`num_replicas` LLM replicas on the Ray cluster (`ray.init()` first to join one; else Ray starts a local one).
    The constructor returns once every replica has loaded. `ray_remote_args` go to the actors' `.options()` over
    the defaults: `num_gpus=tensor_parallel_size`, and a replica that dies (killed, out of memory, its node lost)
    is restarted up to `max_restarts=3` times, its unfinished batches retried on the new one."""

    def __init__(self, model: str, num_replicas: int = 1, ray_remote_args: dict | None = None, **llm_kwargs):
        ray = _ray()
        if not (isinstance(num_replicas, int) and num_replicas >= 1):
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        options = {"num_gpus": llm_kwargs.get("tensor_parallel_size", 1), "max_restarts": 3, "max_task_retries": 3,
                   **(ray_remote_args or {})}
        actor = ray.remote(_Replica).options(**options)
        self.replicas = [actor.remote(model, llm_kwargs) for _ in range(num_replicas)]
        try:
            _get([replica.ready.remote() for replica in self.replicas])
        except BaseException:
            self.shutdown()     # a replica that failed to load must not keep the others' GPUs
            raise

    def submit(self, prompts: list, sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
               batch_size: int | None = None) -> list:
        """Split the prompts into batches of `batch_size` (default: one batch per replica, so each engine batches
        its share as one `LLM.generate` would) and hand them to the replicas in turn; returns one Ray ObjectRef
        per batch, in order (`gather` reads them back)."""
        if not isinstance(prompts, list):
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        per_prompt = isinstance(sampling_params, (list, tuple))
        if per_prompt and len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                             "pass one SamplingParams, or one per prompt")
        if batch_size is None:
            batch_size = max(1, -(-len(prompts) // len(self.replicas)))
        elif not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")
        refs = []
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            batch = slice(start, start + batch_size)
            params = sampling_params[batch] if per_prompt else sampling_params
            refs.append(self.replicas[i % len(self.replicas)].generate.remote(prompts[batch], params))
        return refs

    def gather(self, refs: list) -> list[dict]:
        """The outputs of `submit`'s batches, concatenated in input order. An exception the engine raised in a
        replica (say a ValueError for a prompt longer than max_model_len) is raised here as itself."""
        return [output for batch in _get(refs) for output in batch]

    def generate(self, prompts: list, sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
                 batch_size: int | None = None) -> list[dict]:
        """What `LLM.generate` returns for these prompts (one dict per prompt, in input order), computed by the
        replicas."""
        return self.gather(self.submit(prompts, sampling_params, batch_size))

    def shutdown(self):
        """Stop the replicas (their tensor-parallel workers exit with them) and free their GPUs."""
        for replica in self.replicas:
            _ray().kill(replica)
        self.replicas = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def generate(prompts: list, sampling_params: SamplingParams | list[SamplingParams], model: str,
             num_replicas: int = 1, batch_size: int | None = None, ray_remote_args: dict | None = None,
             **llm_kwargs) -> list[dict]:
    """`LLM(model, **llm_kwargs).generate(prompts, sampling_params)`, spread over `num_replicas` replicas on Ray,
    outputs in input order; the replicas are stopped afterwards (keep a `ReplicaPool` to reuse them)."""
    with ReplicaPool(model, num_replicas, ray_remote_args, **llm_kwargs) as pool:
        return pool.generate(prompts, sampling_params, batch_size)
