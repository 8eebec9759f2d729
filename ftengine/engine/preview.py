"""``ftengine data preview``: what the trainer will see, without loading the model's weights.

Only the tokenizer and the chat template are loaded (and the model's config, to pick the default
template of its architecture). The first samples are printed rendered, their trained tokens
highlighted; then statistics over the whole dataset: what became of the rows, token lengths,
truncation, the trained fraction and the packing efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from ftengine.core import plugins
from ftengine.core.config import RunConfig
from ftengine.core.errors import ModelError
from ftengine.engine import vision
from ftengine.engine.data import DataReport
from ftengine.engine.data import Encoded
from ftengine.engine.data import count_sample
from ftengine.engine.data import encode_for_training
from ftengine.engine.data import load_samples
from ftengine.engine.data import pack_bins
from ftengine.engine.data import packing_efficiency
from ftengine.engine.data import unusable

ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"
BRACKETS = ("[[", "]]")


@dataclass
class Shown:
    """One sample as the trainer sees it: where it came from and its encoded sequence(s)."""

    where: str
    sequences: list[tuple[str, Encoded]]  # (label, encoded): one for SFT, chosen and rejected for DPO
    images: list[str] = field(default_factory=list)  # vision rows: one placeholder per image
    tokens: int | None = None  # vision rows: the length with the image tokens the processor expands


@dataclass
class Preview:
    """The shown samples and the statistics over the whole dataset."""

    shown: list[Shown]
    report: DataReport
    lengths: list[int] = field(default_factory=list)  # token length of each sequence before truncation
    template: str = ""
    trainer: str = ""
    converted: int = 0  # rows the format turned into samples
    max_seq_length: int = 0
    packing: bool = False
    marker: str = ""  # vision runs: the text the chat template writes for an image


def load_tokenizer(config: RunConfig) -> tuple[Any, str]:
    """The model's tokenizer with the run's chat template on it (a vision-language model's processor,
    its tokenizer carrying the template), and the template's name; reads the model's config, never its weights."""
    from transformers import AutoTokenizer

    from ftengine.engine.pipeline import find_adapter
    from ftengine.engine.pipeline import load_model_config
    from ftengine.engine.run_data import choose_chat_template
    from ftengine.engine.templates import apply_chat_template

    m = config.model
    hf_config = load_model_config(m.name_or_path, m.trust_remote_code, m.revision)
    adapter = find_adapter(hf_config, m.adapter)
    local = Path(m.name_or_path).expanduser()
    if vision.is_vision_config(hf_config):
        source = str(local) if local.exists() else m.name_or_path
        processor = vision.load_processor(source, hf_config, m.trust_remote_code, m.revision,
                                          config.data.max_pixels, config.data.min_pixels)
        template = choose_chat_template(processor.tokenizer, config.data.chat_template, adapter)
        apply_chat_template(processor.tokenizer, template)
        processor.chat_template = processor.tokenizer.chat_template or processor.chat_template
        return processor, template
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else m.name_or_path,
                                                  trust_remote_code=m.trust_remote_code, revision=m.revision)
    except OSError as exc:
        raise ModelError(f"{m.name_or_path}: cannot load the tokenizer ({exc})") from None
    template = choose_chat_template(tokenizer, config.data.chat_template, adapter)
    apply_chat_template(tokenizer, template)
    return tokenizer, template


def build_preview(config: RunConfig, tokenizer: Any, n: int = 3, template: str = "") -> Preview:
    """Encode every sample of ``config.data.path`` as the run would; keep the first ``n``.
    ``template`` names the chat template on ``tokenizer`` (for the statistics' heading).

    Bad rows never stop a preview: they are counted and reported as ``data.on_bad_rows: skip``
    would (a run with ``error`` stops at the first of them).
    """
    d, max_len = config.data, config.model.max_seq_length
    trainer = plugins.get("trainers", config.training.trainer)
    report = DataReport()
    if getattr(tokenizer, "image_processor", None) is not None:
        from ftengine.engine.pipeline import find_adapter
        from ftengine.engine.pipeline import load_model_config
        from ftengine.engine.vision_preview import build_vision_preview
        from ftengine.engine.vision_preview import image_marker

        m = config.model
        spec = getattr(find_adapter(load_model_config(m.name_or_path, m.trust_remote_code, m.revision), m.adapter),
                       "vision", None)
        preview = Preview([], report, template=template, trainer=trainer.name, max_seq_length=max_len,
                          marker=image_marker(tokenizer))
        return build_vision_preview(config, tokenizer, n, getattr(spec, "max_images_per_turn", None), preview)
    samples = load_samples(d.path, d.model_copy(update={"on_bad_rows": "skip"}), report)
    preview = Preview([], report, template=template, trainer=trainer.name, converted=len(samples),
                      max_seq_length=max_len, packing=d.packing and "preference" not in trainer.sample_kinds)
    for where, sample in samples:
        if sample.kind not in trainer.sample_kinds:
            report.skip(f"{where}: a {sample.kind} sample, which the {trainer.name} trainer does not train on",
                        f"{sample.kind} sample")
            continue
        try:
            encoded = encode_for_training(sample, tokenizer, d.train_on)
        except Exception as exc:
            report.skip(f"{where}: the chat template cannot render it: {exc}", "chat template error")
            continue
        problem = unusable(encoded, max_len)
        if problem is not None:
            report.skip(f"{where}: {problem[0]}", problem[1])
            continue
        count_sample(report, encoded, max_len)
        preview.lengths += [len(e.input_ids) for e in encoded]
        sequences = list(zip(("chosen", "rejected") if sample.kind == "preference" else ("",), encoded, strict=True))
        if len(preview.shown) < n:
            preview.shown.append(Shown(where, sequences))
    if preview.packing:
        cut = [min(n_tokens, max_len) for n_tokens in preview.lengths]
        bins = pack_bins(cut, max_len)
        report.packed_rows = len(bins)
        report.packing_efficiency = packing_efficiency(cut, len(bins), max_len)
    return preview


def highlight(enc: Encoded, max_seq_length: int, color: bool) -> str:
    """The rendered text up to the truncation point, trained tokens marked: ANSI green when
    ``color``, else ``[[...]]``. Characters between tokens take the state of the token before."""
    kept = min(len(enc.input_ids), max_seq_length)
    end = enc.offsets[kept - 1][1] if kept else 0
    state: list[bool | None] = [None] * end
    for (start, stop), trained in zip(enc.offsets[:kept], enc.trained[:kept], strict=True):
        state[start:stop] = [trained] * (stop - start)
    for c in range(end):  # gaps: characters no token's span covers
        if state[c] is None:
            state[c] = bool(c and state[c - 1])
    opening, closing = (ANSI_TRAINED, ANSI_RESET) if color else BRACKETS
    out, inside = [], False
    for c in range(end):
        if state[c] != inside:
            out.append(opening if state[c] else closing)
            inside = state[c]
        out.append(enc.text[c])
    if inside:
        out.append(closing)
    text = "".join(out)
    if kept < len(enc.input_ids):
        text += f"\n... truncated: {len(enc.input_ids) - kept} more tokens beyond max_seq_length={max_seq_length}"
    return text


def _percentile(values: list[int], p: float) -> int:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def format_sample(index: int, shown: Shown, max_seq_length: int, color: bool, marker: str = "") -> str:
    """One shown sample: a heading with its token counts, then its highlighted text (with a vision row's
    ``marker`` of each image replaced by the image's placeholder)."""
    from ftengine.engine.vision_preview import with_placeholders

    lines = []
    for label, enc in shown.sequences:
        trained = sum(enc.trained[:max_seq_length])
        title = f"sample {index} ({shown.where})" + (f" {label}" if label else "")
        if shown.tokens is None:
            lines.append(f"--- {title}: {len(enc.input_ids)} tokens, {trained} trained ---")
            lines.append(highlight(enc, max_seq_length, color))
        else:
            lines.append(f"--- {title}: {shown.tokens} tokens with {len(shown.images)} image(s), {trained} trained ---")
            lines.append(with_placeholders(highlight(enc, max_seq_length, color), marker, shown.images))
    return "\n".join(lines)


def format_statistics(preview: Preview, path: str) -> list[str]:
    """The statistics block: one ``name  value`` line each."""
    r = preview.report
    rows = [("rows", f"{r.rows} read: {preview.converted} converted ({r.format or '?'}), {r.samples} used, "
                     f"{r.skipped} skipped")]
    for kind, count in sorted(r.skip_kinds.items(), key=lambda kv: -kv[1]):
        rows.append(("  skipped", f"{count} x {kind}"))
    for reason in r.skip_reasons[:5]:
        rows.append(("  e.g.", reason))
    if preview.lengths:
        what = "sequence lengths (chosen and rejected)" if preview.trainer == "dpo" else "token lengths"
        mean = sum(preview.lengths) / len(preview.lengths)
        rows.append((what, f"mean {mean:.1f}, p50 {_percentile(preview.lengths, 0.5)}, "
                           f"p95 {_percentile(preview.lengths, 0.95)}, max {max(preview.lengths)} "
                           f"(max_seq_length {preview.max_seq_length})"))
    if preview.marker:
        per_image = f", {r.image_tokens / r.images:.1f} per image" if r.images else ""
        rows.append(("images", f"{r.images} in {r.samples} samples, {r.image_tokens} image tokens{per_image}"))
    rows.append(("truncated", f"{r.truncated / max(r.samples, 1):.1%} of samples ({r.truncated})"))
    rows.append(("trained tokens", f"{r.trained_tokens / max(r.tokens, 1):.1%} of {r.tokens} tokens"))
    if preview.trainer == "dpo":
        rows.append(("packing", "not used by the dpo trainer"))
    elif r.packing_efficiency is not None:
        rows.append(("packing", f"{r.packed_rows} rows of {preview.max_seq_length} tokens, "
                                f"{r.packing_efficiency:.1%} of token slots filled"))
    else:
        unpacked = r.tokens / max(r.samples * preview.max_seq_length, 1)
        rows.append(("packing", f"off (data.packing: false); samples fill {unpacked:.1%} of max_seq_length"))
    width = max(len(k) for k, _ in rows)
    head = (f"statistics of {path} (format {r.format or '?'}, chat template {preview.template}, trainer "
            f"{preview.trainer})")
    return [head] + [f"  {k.ljust(width)}  {v}" for k, v in rows]
