"""nano-vllm's example: chat-format two prompts and print their completions.

    python example.py                                  # ~/huggingface/Qwen3-0.6B, or a tiny random demo model
    python example.py --model /path/to/Qwen3-checkpoint
"""
import argparse
import os

from nanovllm import LLM, SamplingParams

DEMO_DIR = os.path.join(os.path.expanduser("~/.cache"), "nanovllm", "demo-qwen3")


def demo_checkpoint() -> str:
    from tests.tiny_checkpoint import build_tiny_checkpoint
    if not os.path.isfile(os.path.join(DEMO_DIR, "config.json")):
        build_tiny_checkpoint(DEMO_DIR)
    return DEMO_DIR


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="~/huggingface/Qwen3-0.6B")
    path = os.path.expanduser(parser.parse_args().model)
    if not os.path.isdir(path):
        path = demo_checkpoint()
        print(f"No model at {parser.parse_args().model}: running a tiny demo checkpoint with RANDOM weights "
              f"({path}). Its output is random text; pass --model to use a real Qwen3 or Qwen2 checkpoint.")
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)
    tokenizer = llm.tokenizer

    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
               for prompt in prompts]
    outputs = llm.generate(prompts, sampling_params)

    for prompt, output in zip(prompts, outputs):
        print("\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")


if __name__ == "__main__":
    main()
