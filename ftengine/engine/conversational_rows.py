"""Rows for the trainers that render conversations themselves (DPO, ORPO, KTO, GRPO): preference
pairs, unpaired completions with a label, and prompts to generate from, checked and counted by the data
layer but left as turns for the trainer's chat template."""

from __future__ import annotations

from typing import Any

from ftengine.core.types import Sample
from ftengine.engine.data import RENDER_DATE
from ftengine.engine.data import DataReport
from ftengine.engine.data import as_turns
from ftengine.engine.data import encode_and_count
from ftengine.engine.data import preference_messages
from ftengine.engine.data import render
from ftengine.engine.data import sample_problem


def preference_rows(samples: list[tuple[str, Sample]], tokenizer: Any, max_seq_length: int, on_bad_rows: str,
                    report: DataReport) -> list[dict[str, Any]]:
    """Conversational ``prompt``/``chosen``/``rejected`` rows for the DPO trainer, which applies the
    chat template itself (with ``chat_template_kwargs``: the fixed render date).

    Counted and checked by :func:`encode_and_count` (chosen and rejected sequences; a pair whose
    prompt alone fills ``max_seq_length`` is unusable).
    """
    out = []
    for sample, _ in encode_and_count(samples, tokenizer, max_seq_length, "assistant", on_bad_rows, report):
        prompt, chosen, rejected = preference_messages(sample)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "chat_template_kwargs": {"date_string": RENDER_DATE}})
    return out


def unpaired_preference_rows(samples: list[tuple[str, Sample]], tokenizer: Any, max_seq_length: int,
                             on_bad_rows: str, report: DataReport) -> list[dict[str, Any]]:
    """Conversational ``prompt``/``completion``/``label`` rows for the KTO trainer, which renders
    them with the chat template as DPO does; counted and checked by :func:`encode_and_count`."""
    out = []
    for sample, _ in encode_and_count(samples, tokenizer, max_seq_length, "assistant", on_bad_rows, report):
        prompt, completion = as_turns(sample.prompt, "user"), as_turns(sample.completion, "assistant")
        out.append({"prompt": prompt, "completion": completion, "label": sample.label,
                    "chat_template_kwargs": {"date_string": RENDER_DATE}})
    return out


def prompt_rows(samples: list[tuple[str, Sample]], tokenizer: Any, max_seq_length: int, on_bad_rows: str,
                report: DataReport, row_column: str = "ftengine_row") -> list[dict[str, Any]]:
    """Conversational prompts to generate from (GRPO), each with its row's other columns and, under
    ``row_column``, where it came from (``file: row N``, for the reward functions' errors). A prompt
    as long as ``max_seq_length`` leaves no room to generate: an error naming its row (or skipped).
    Every row must carry the same extra columns."""
    out = []
    columns: set[str] | None = None
    for where, sample in samples:
        prompt = as_turns(sample.prompt, "user")
        try:
            length = len(tokenizer(render(tokenizer, prompt, add_generation_prompt=True),
                                   add_special_tokens=False)["input_ids"])
        except Exception as exc:
            sample_problem(where, f"the chat template cannot render it: {exc}", on_bad_rows, report,
                            "chat template error")
            continue
        if length >= max_seq_length:
            sample_problem(where, f"the prompt ({length} tokens) fills max_seq_length={max_seq_length}", on_bad_rows,
                            report, "prompt fills max_seq_length")
            continue
        extra = dict(sample.columns or {})
        if columns is None:
            columns = set(extra)
        elif set(extra) != columns:
            sample_problem(where, f"columns {sorted(extra)} differ from the first row's {sorted(columns)} (the reward "
                                   f"functions get every column for every row)", on_bad_rows, report,
                            "different columns")
            continue
        report.tokens += length
        out.append({"prompt": prompt, **extra, row_column: where,
                    "chat_template_kwargs": {"date_string": RENDER_DATE}})
    report.samples += len(out)
    return out
