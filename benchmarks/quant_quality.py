"""Quality of our GGUF quantizers next to llama.cpp's own, per type, with and without an importance matrix.

A small Llama (hidden 256, 4 layers, one key/value head per four query heads, the demo tokenizer's
640-token vocabulary) is first trained for a few hundred steps on this repository's README (random
weights give near-uniform next-token distributions, where KL numbers say little). Its weights are
rounded to fp16 and written as the F16 GGUF reference. For every type, two files are made from the
same weights: ours (``write_gguf``) and llama.cpp's (``llama_model_quantize`` on the F16 file), both
with the same importance matrix in the imatrix rows (ours, collected on the training text and
passed to llama.cpp as its per-tensor arrays). llama.cpp then runs each file over held-out text
(the README's last fifth, not trained on) and the table gives, against the F16 file's next-token
distributions, the mean KL divergence and the top-1 agreement.

Run on the CPU (a few minutes)::

    python benchmarks/quant_quality.py --json benchmarks/quant_quality.jsonl
    python benchmarks/quant_quality.py --tiny      # two types, a few steps: a smoke check
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers import LlamaConfig
from transformers import LlamaForCausalLM

from ftengine.plugins.exporters.gguf.exporter import gguf_name_of
from ftengine.plugins.exporters.gguf.imatrix import ImportanceMatrix
from ftengine.plugins.exporters.gguf.imatrix import collect
from ftengine.plugins.exporters.gguf.writer import write_gguf

REPO = Path(__file__).resolve().parent.parent
TYPES = ["q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "iq4_nl",
         "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k"]
SEQ = 128


def _tokens(tokenizer) -> tuple[list[int], list[int]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = len(ids) * 4 // 5
    return ids[:cut], ids[cut:]


def _train(train_ids: list[int], vocab: int, steps: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    data = torch.tensor(train_ids)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ - 1, (8,), generator=generator)
        batch = torch.stack([data[s : s + SEQ] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():  # the F16 file is the reference: every file starts from the same fp16 weights
        for param in model.parameters():
            param.copy_(param.half().float())
    print(f"trained {steps} steps, last loss {loss.item():.3f}")
    return model


def _llama_cpp_quantize(llama_cpp, source: Path, target: Path, quantization: str,
                        imatrix: ImportanceMatrix | None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quantization.upper()}")
    entries = imatrix.llama_cpp_entries(llama_cpp) if imatrix is not None else None
    if entries is not None:
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {quantization}")


def _log_probs(llama_cpp, path: Path, chunks: list[list[int]]) -> np.ndarray:
    """llama.cpp's next-token log-probabilities over every chunk, ``(tokens, vocab)``."""
    llm = llama_cpp.Llama(str(path), n_ctx=SEQ, logits_all=True, verbose=False, n_threads=2)
    out = []
    for ids in chunks:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        out.append(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    llm.close()
    return np.concatenate(out)


def _compare(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || other) per token, and how often the top-1 tokens agree."""
    kl = (np.exp(reference) * (reference - other)).sum(axis=-1).mean()
    return float(kl), float((reference.argmax(-1) == other.argmax(-1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--steps", type=int, default=300, help="training steps of the small model")
    parser.add_argument("--chunks", type=int, default=16, help="held-out chunks of 128 tokens")
    parser.add_argument("--tiny", action="store_true", help="q4_k_m and q3_k_s, 5 steps, 2 chunks")
    parser.add_argument("--json", help="append one JSON row per type and imatrix setting")
    parser.add_argument("--calibration", choices=("training", "apart"), default="training",
                        help="imatrix text: the training part, or the held-out tokens past the evaluated chunks "
                             "(text the model never saw and that is not scored)")
    args = parser.parse_args()
    import llama_cpp

    types = ["q4_k_m", "q3_k_s"] if args.tiny else args.types.split(",")
    steps, n_chunks = (5, 2) if args.tiny else (args.steps, args.chunks)
    tokenizer = AutoTokenizer.from_pretrained(str(REPO / "ftengine" / "demo" / "tokenizer"))
    train_ids, held_out = _tokens(tokenizer)
    started = time.time()
    model = _train(train_ids, len(tokenizer), steps, seed=0)
    chunks = [held_out[i : i + SEQ] for i in range(0, len(held_out) - SEQ + 1, SEQ)][:n_chunks]
    source, label = train_ids, "README.md (training part)"
    if args.calibration == "apart":
        source, label = held_out[len(chunks) * SEQ:], "README.md (held out, not evaluated)"
    calibration = [source[i : i + SEQ] for i in range(0, len(source) - SEQ + 1, SEQ)]
    if not calibration:
        parser.error(f"--calibration {args.calibration}: fewer than {SEQ} tokens left for calibration")
    imatrix = collect(model, calibration, gguf_name_of(model), chunk_size=SEQ, dataset=label)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        f16 = tmp_path / "f16.gguf"
        write_gguf(model, tokenizer, f16, "f16")
        reference = _log_probs(llama_cpp, f16, chunks)
        for quantization in types:
            for weighted in (False, True):
                matrix = imatrix if weighted else None
                ours, theirs = tmp_path / "ours.gguf", tmp_path / "llama-cpp.gguf"
                write_gguf(model, tokenizer, ours, quantization, imatrix=matrix)
                _llama_cpp_quantize(llama_cpp, f16, theirs, quantization, matrix)
                ours_kl, ours_top1 = _compare(reference, _log_probs(llama_cpp, ours, chunks))
                theirs_kl, theirs_top1 = _compare(reference, _log_probs(llama_cpp, theirs, chunks))
                rows.append({"type": quantization, "imatrix": weighted, "kl_ours": ours_kl, "kl_llama_cpp": theirs_kl,
                             "top1_ours": ours_top1, "top1_llama_cpp": theirs_top1,
                             "kl_ratio": ours_kl / theirs_kl if theirs_kl > 0 else float("nan"),
                             "size_ours": ours.stat().st_size, "size_llama_cpp": theirs.stat().st_size})
                print(f"{quantization:7s} imatrix={weighted!s:5s} KL ours {ours_kl:.5f} llama.cpp {theirs_kl:.5f} "
                      f"top-1 {ours_top1:.3f} / {theirs_top1:.3f}", flush=True)
    device = f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, " \
             f"llama-cpp-python {llama_cpp.__version__}"
    print(f"\n{device}; {len(chunks) * SEQ} held-out tokens scored; imatrix from {label}, "
          f"{len(calibration) * SEQ} tokens; {time.time() - started:.0f} s\n")
    print("| type | imatrix | KL ours | KL llama.cpp | ours / llama.cpp | top-1 ours | top-1 llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['type']} | {'yes' if row['imatrix'] else 'no'} | {row['kl_ours']:.5f} | "
              f"{row['kl_llama_cpp']:.5f} | {row['kl_ratio']:.3f} | {row['top1_ours']:.3f} | "
              f"{row['top1_llama_cpp']:.3f} |")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "device": device, "steps": steps, "calibration": args.calibration,
                                    "calibration_tokens": len(calibration) * SEQ,
                                    "held_out_tokens": len(chunks) * SEQ}) + "\n")


if __name__ == "__main__":
    main()
