"""Try the model on a prompt: the smallest command line of the project.

    python generate.py --prompt "The capital of France is" --max-new-tokens 16
    python generate.py --chat --prompt "What is 12 * 7?"
"""
import time

import torch

import cli
import fast
from checkpoint import load
from model import generate


def main(prompt: str, max_new_tokens: int, chat: bool, model_path: str | None, device: str,
         dtype: str, temperature: float, top_p: float, seed: int) -> None:
    fast.enable()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        model, tokenizer = load(model_path, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:  # a corrupt file, or not a Llama's: one line
        cli.fail(str(e))
    print(f"loaded in {time.perf_counter() - t0:.1f}s")
    if chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    gen = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
    t0 = time.perf_counter()
    [c] = generate(model, tokenizer, [ids], max_new_tokens, temperature, top_p, generator=gen)
    dt = time.perf_counter() - t0
    print(("" if chat else prompt) + c.text)
    print(f"[{len(c.tokens)} tokens in {dt:.2f}s, {len(c.tokens) / dt:.1f} tok/s, "
          f"finish={c.finish}]")


if __name__ == "__main__":
    p = cli.parser("Generate text with a pretrained Llama-family model.")
    p.add_argument("--prompt", type=cli.non_empty, required=True,
                   help="text to continue (or the user message with --chat)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=64,
                   help="number of tokens to generate at most")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--model", dest="model_path", type=cli.model_path, default=None,
                   help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct)")
    cli.add_device_options(p)
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.0,
                   help="0 means greedy decoding")
    p.add_argument("--top-p", type=cli.probability, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed for sampling")
    main(**vars(p.parse_args()))
