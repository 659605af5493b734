"""Shared fixtures and helpers: tiny random checkpoints written offline, the transformers oracle, the check that an
engine holds no block, and the end of the Triton interpreter worker (tests/triton_interpreter.py)."""
import pytest
import torch

from tests.tiny_checkpoint import build_tiny_checkpoint
from tests.triton_interpreter import stop_worker


@pytest.fixture(scope="module", autouse=True)
def _stop_interpreter_worker():
    """The TRITON_INTERPRET=1 worker must not outlive the module that started it (other tests count children)."""
    yield
    stop_worker()


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3")), arch="qwen3", seed=0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen2")), arch="qwen2", seed=1)


@pytest.fixture(scope="session", params=["qwen3", "qwen2"])
def model_dir(request, qwen3_dir, qwen2_dir):
    return qwen3_dir if request.param == "qwen3" else qwen2_dir


_HF_CACHE = {}


def hf_model(path: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM
    key = (path, device)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return _HF_CACHE[key]


def hf_greedy(path: str, prompt: list[int], max_tokens: int, device: str = "cpu") -> list[int]:
    """transformers' greedy completion of exactly `max_tokens` tokens, not stopping at eos (like ignore_eos)."""
    model = hf_model(path, device)
    ids = torch.tensor([prompt], device=device)
    out, past = [], None
    with torch.no_grad():
        for _ in range(max_tokens):
            result = model(ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            ids = result.logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids.item())
    return out


def all_free(llm) -> bool:
    """The engine holds nothing: no sequence left, every KV block back in the free list with no reference."""
    bm = llm.scheduler.block_manager
    return llm.is_finished() and len(bm.free_block_ids) == len(bm.blocks) and all(b.ref_count == 0 for b in bm.blocks)
