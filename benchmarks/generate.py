"""Generation speed: ``ftengine.generate`` (the patched model with a LoRA adapter, KV cache) against plain
transformers + PEFT ``model.generate`` on the same random-weight model, adapter, prompts and settings.

Both decode greedily with every row generating exactly ``--new-tokens`` tokens (``min_new_tokens``, so an
early EOS cannot shorten one side), from left-padded prompts of ``--prompt-tokens`` tokens. Per
framework: the median over ``--repeats`` timed runs after one warm-up, in seconds and generated tokens/s.

Run on the GPU: ``python benchmarks/generate.py --out generate.jsonl`` (Llama-3.1-8B shape, bf16, batches 1
and 8, 256 new tokens; about 3 minutes on an H100). On the CPU, end to end at toy shapes:
``python benchmarks/generate.py --tiny``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=640, rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False)


def build(shape: dict, dtype: torch.dtype, device: str, patched: bool):
    """The random-weight Llama (seed 0), patched by ftengine's adapter or not, with the same LoRA (r=16)."""
    from peft import LoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    if patched:
        from ftengine.core import plugins
        from ftengine.core.kernels import get_op

        plugins.adapter_for_model_type("llama").patch(model, get_op)
    torch.manual_seed(1)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"], init_lora_weights="gaussian")
    return get_peft_model(model, lora).eval()


def tokenizer_for():
    """The demo's tokenizer (generated ids beyond its vocabulary decode to nothing; only speed is measured)."""
    from transformers import AutoTokenizer

    from ftengine.demo import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    tokenizer.chat_template = None  # the prompt is the raw text
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.eos_token = None  # no early stop (with the model's generation_config.eos_token_id = None)
    return tokenizer


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def caller(framework: str, model, tokenizer, prompts: list[str], new_tokens: int):
    """One generation call of ``framework``: ftengine's API, or transformers' ``generate`` on the same inputs."""
    import ftengine
    from ftengine.engine import generation

    if framework == "ftengine":
        return lambda: ftengine.generate(model, tokenizer, prompts, temperature=0, max_new_tokens=new_tokens)
    inputs = generation._inputs(model, tokenizer, prompts)

    def call():
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, use_cache=True,
                           pad_token_id=tokenizer.pad_token_id)

    return call


def run(shape: dict, dtype: torch.dtype, device: str, batch: int, prompt_tokens: int, new_tokens: int,
        repeats: int) -> list[dict]:
    tokenizer = tokenizer_for()
    words = "the capital of france is paris and " * prompt_tokens
    prompt = tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:prompt_tokens])
    prompts = [prompt] * batch
    rows = []
    for framework in ("hf-peft", "ftengine"):
        model = build(shape, dtype, device, patched=framework == "ftengine")
        model.generation_config.eos_token_id = None  # no early stop: every row generates new_tokens tokens
        seconds = timed(caller(framework, model, tokenizer, prompts, new_tokens), repeats, device)
        rows.append({"framework": framework, "batch": batch, "prompt_tokens": prompt_tokens,
                     "new_tokens": new_tokens, "seconds": round(seconds, 4),
                     "tokens_per_second": round(batch * new_tokens / seconds, 1)})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (an end-to-end check)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append JSON rows here")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape, dtype = (TINY, torch.float32) if args.tiny else (LLAMA_8B, torch.bfloat16)
    if args.tiny:
        args.batches, args.prompt_tokens, args.new_tokens, args.repeats = "1,2", 8, 8, 1
    device_line = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {device_line}; torch {torch.__version__}; model: {'tiny' if args.tiny else 'llama-3.1-8b'}")
    print(f"{'framework':<10} {'batch':>5} {'seconds':>9} {'tokens/s':>10}")
    for batch in (int(b) for b in args.batches.split(",")):
        for row in run(shape, dtype, device, batch, args.prompt_tokens, args.new_tokens, args.repeats):
            row.update(device=device_line, model="tiny" if args.tiny else "llama-3.1-8b",
                       timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            print(f"{row['framework']:<10} {row['batch']:>5} {row['seconds']:>9.3f} {row['tokens_per_second']:>10.1f}")
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
