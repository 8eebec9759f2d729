"""Run under torchrun by ``test_distributed.py``: the Python API on every process (load, LoRA,
data, train, export), as a notebook-style script launched with ``torchrun`` would.

Usage: ``torchrun --nproc-per-node 2 api_worker.py BASE_MODEL DATA OUT_DIR [PER_DEVICE_BATCH]``
(run with ``python`` it is the one-process twin).
"""

import sys
from pathlib import Path

import torch

import ftengine


def main() -> None:
    base, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    model, tokenizer = ftengine.load_model(base, max_seq_length=64, dtype=torch.float32)
    model = ftengine.add_lora(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    tokenizer = ftengine.get_chat_template(tokenizer, "chatml")
    dataset = ftengine.load_dataset(data, tokenizer=tokenizer, format="messages", max_seq_length=64)
    per_device = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    ftengine.train(model, tokenizer, dataset, output_dir=str(out / "run"), max_steps=3,
                   per_device_train_batch_size=per_device, gradient_accumulation_steps=1, learning_rate=1e-3, seed=7,
                   save_steps=100)
    ftengine.export(model, tokenizer, str(out / "lora"), format="lora")


if __name__ == "__main__":
    main()
