"""Sampling a batch of completions with a preallocated KV cache, the one-token step replayed from a CUDA graph.

Why not transformers' ``generate``: each new token runs the whole model forward from Python, every kernel of
every layer launched by the host one after the other. At the batch sizes of RL fine-tuning (a few prompts x
``num_generations``) the GPU finishes each kernel faster than Python launches the next, so decoding is bound
by the host. Here the prompt is run once (prefill) into a cache of fixed size, and the one-token step, whose
tensors then keep their shapes and addresses, is recorded once in a CUDA graph and replayed for every further
token: one launch a token. The position written in the cache, the attention mask and the position ids are
device tensors updated in place, so the recorded step stays valid from the first token to the last.

The graph is recorded for one call and dropped at its end, so its memory goes back to training. Without
CUDA, or for a model whose step cannot be recorded, the same loop runs the step eagerly.

What it serves: decoder-only models whose transformers forward takes a prepared 4-D attention mask (every
text family ftengine patches), with sdpa or eager attention, sampled as transformers samples (temperature,
top-k, top-p, min-p, EOS and padding). Anything else (beam search, repetition penalty, images, other cache
layouts) goes to transformers' ``generate``: :func:`unsupported` says why.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ftengine.core.errors import ConfigError

log = logging.getLogger("ftengine")

EOS_CHECK_EVERY = 16
"""Tokens between the read-backs that end the loop once every row has finished (each one waits for the GPU)."""


@dataclass(frozen=True)
class Sampler:
    """How each token is drawn, in transformers' order: temperature, top-k, top-p, min-p; greedy without
    ``do_sample``."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> the float32 distribution the next token is drawn from (zero where filtered)."""
        scores = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = tail_mass <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
        if self.min_p:
            probs = scores.softmax(dim=-1)
            scores = scores.masked_fill(probs < self.min_p * probs.amax(dim=-1, keepdim=True), -float("inf"))
        return scores.softmax(dim=-1)

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> ``[B]`` token ids."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probabilities(logits), 1).squeeze(-1)


class StaticKVCache:
    """Per-layer key / value buffers of a fixed length, written at the positions in :attr:`write_at`.

    Duck-types the one method transformers' attention modules call on a cache (``update``); the decoder
    owns the positions, so a recorded step finds the same tensors at every replay.
    """

    def __init__(self, max_length: int, write_at: torch.Tensor):
        self.max_length = max_length
        self.write_at = write_at
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[B, heads, T, D]`` keys and values at ``write_at`` (``T`` positions); return the whole buffers."""
        if layer_idx not in self.keys:
            self.keys[layer_idx] = key.new_zeros(*key.shape[:2], self.max_length, key.shape[-1])
            self.values[layer_idx] = value.new_zeros(*value.shape[:2], self.max_length, value.shape[-1])
        self.keys[layer_idx].index_copy_(2, self.write_at, key)
        self.values[layer_idx].index_copy_(2, self.write_at, value)
        return self.keys[layer_idx], self.values[layer_idx]


SERVED_SETTINGS = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "suppress_tokens": (None, []), "bad_words_ids": (None,),
    "begin_suppress_tokens": (None, []), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "forced_eos_token_id": (None,), "forced_bos_token_id": (None,), "stop_strings": (None,),
}
"""Generation settings the decoder leaves out, with the values at which leaving them out changes nothing."""


def unsupported_architecture(config: Any, attn_implementation: str) -> str | None:
    """Why a model of this config, attending with ``attn_implementation``, needs transformers' ``generate``
    whatever the settings, or ``None``; readable before the model loads."""
    if getattr(config, "vision_config", None) is not None:
        return "inputs other than token ids (a vision model)"
    if attn_implementation not in ("sdpa", "eager"):
        return f"attention {attn_implementation!r} (sdpa or eager is needed for a prepared mask)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


def static_refusal(why: str) -> str:
    """The error of ``trainer_options.generation_backend: static`` for a model it cannot serve (``why``)."""
    return (f"training.trainer_options.generation_backend: static cannot serve this model: {why}; use auto or "
            f"transformers")


def unsupported(model: Any, generation_config: Any = None, extra_inputs: tuple[str, ...] = ()) -> str | None:
    """Why this model and these settings need transformers' ``generate``, or ``None`` when the static decoder
    serves them."""
    if extra_inputs:
        return f"inputs other than token ids ({', '.join(extra_inputs)})"
    why = unsupported_architecture(model.config, model.config._attn_implementation)
    if why is not None:
        return why
    if generation_config is None:
        return None
    for name, allowed in SERVED_SETTINGS.items():
        value = getattr(generation_config, name, None)
        if value not in allowed:
            return f"generation setting {name}={value!r}"
    if not generation_config.max_new_tokens:
        return "no max_new_tokens"
    return None


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position in its row of a left-padded batch (padding gets 1, as transformers does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class _Masks:
    """The prepared attention masks: every query sees the real prompt tokens and the generated ones up to its
    own position (and, in sliding-window layers, only the last ``sliding_window`` of them)."""

    def __init__(self, model: Any, real_keys: torch.Tensor, dtype: torch.dtype):
        text = model.config.get_text_config()
        self.window = getattr(text, "sliding_window", None)
        self.layer_types = set(getattr(text, "layer_types", None) or ())
        self.additive = model.config._attn_implementation == "eager"
        self.dtype = dtype
        self.real_keys = real_keys  # [B, L]
        self.key_index = torch.arange(real_keys.shape[1], device=real_keys.device)

    def _finish(self, visible: torch.Tensor) -> torch.Tensor:
        visible = visible.unsqueeze(1)  # [B, 1, Q, L]
        if not self.additive:
            return visible
        return torch.zeros((), dtype=self.dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min).expand(visible.shape)

    def for_queries(self, query_index: torch.Tensor) -> Any:
        """The mask (or transformers' per-layer-type dict of masks) for queries at cache positions
        ``query_index`` ``[Q]``. A query always sees itself, so a padding query attends to something."""
        keys, queries = self.key_index[None, None, :], query_index[None, :, None]
        causal = ((keys <= queries) & self.real_keys[:, None, :]) | (keys == queries)
        windowed = causal & (keys > queries - self.window) if self.window else causal
        if self.layer_types:
            return {"full_attention": self._finish(causal), "sliding_attention": self._finish(windowed)}
        return self._finish(windowed)


def _forward_logits(model: Any, tokens: torch.Tensor, positions: torch.Tensor, mask: Any,
                    cache: StaticKVCache) -> torch.Tensor:
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


class _Step:
    """The one-token forward on fixed buffers: eager, or recorded once in a CUDA graph and replayed."""

    def __init__(self, model: Any, cache: StaticKVCache, masks: _Masks, first_token: torch.Tensor,
                 first_position: torch.Tensor):
        self.model, self.cache, self.masks = model, cache, masks
        self.token = first_token.unsqueeze(1).clone()  # [B, 1]
        self.position = first_position.unsqueeze(1).clone()  # [B, 1]
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def eager(self) -> torch.Tensor:
        mask = self.masks.for_queries(self.cache.write_at)
        return _forward_logits(self.model, self.token, self.position, mask, self.cache)

    def record(self) -> None:
        """Record the step in a CUDA graph (after two warm-up runs on a side stream, which also compile and
        tune the Triton kernels). They write the cache at the current position, which the first replay
        writes again. A forward that cannot be recorded stays eager, with a log line."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.eager()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = self.eager()
        except RuntimeError as exc:
            torch.cuda.synchronize()
            log.warning("decoding without a CUDA graph: the model's step could not be recorded (%s)",
                        str(exc).splitlines()[0])
            return
        self.graph, self.logits = graph, logits

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.eager()
        self.graph.replay()
        return self.logits

    def advance(self, token: torch.Tensor) -> None:
        self.token.copy_(token.unsqueeze(1))
        self.position.add_(1)
        self.cache.write_at.add_(1)


@torch.no_grad()
def decode(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, max_new_tokens: int,
           sampler: Sampler, eos_token_ids: list[int] | tuple[int, ...] = (), pad_token_id: int | None = None,
           min_new_tokens: int = 0, cuda_graph: bool | None = None, streamer: Any = None) -> torch.Tensor:
    """Continue each row of a left-padded batch; ``[B, P + n]`` prompt and completion ids, as transformers'
    ``generate`` returns them (rows that ended early padded with ``pad_token_id``; ``n`` up to
    ``max_new_tokens``, less when every row has ended).

    Args:
        model: a decoder-only causal LM (ftengine-patched or not, with or without a peft adapter), in the
            mode the caller wants (eval for sampling without dropout).
        input_ids: ``[B, P]`` prompts, padded on the left.
        attention_mask: ``[B, P]``, 0 on padding; ``None`` when no row is padded.
        sampler: how tokens are drawn.
        eos_token_ids: ids that end a row (kept in its output).
        pad_token_id: what follows a row's end (defaults to the first EOS id, else 0).
        min_new_tokens: EOS ids are not drawn before this many tokens.
        cuda_graph: record the step in a CUDA graph (default: when the model is on a CUDA device).
        streamer: a transformers streamer (``put`` / ``end``), given the prompt and then each token as
            ``generate`` gives them (a read-back a token: for one row shown as it is written).
    """
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    total = prompt_length + max_new_tokens
    real_keys = torch.ones(batch, total, dtype=torch.bool, device=device)
    real_keys[:, :prompt_length] = attention_mask.bool()
    masks = _Masks(model, real_keys, next(p.dtype for p in model.parameters() if p.is_floating_point()))
    cache = StaticKVCache(total, torch.arange(prompt_length, device=device))
    positions = _positions(attention_mask)
    prompt_index = torch.arange(prompt_length, device=device)
    logits = _forward_logits(model, input_ids, positions, masks.for_queries(prompt_index), cache)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)  # a column any row was still in
    step: _Step | None = None
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    check_every = 1 if streamer is not None else EOS_CHECK_EVERY  # a streamer reads every token back anyway
    for i in range(max_new_tokens):
        if i:
            logits = step()
        if i < min_new_tokens and len(eos):
            logits = logits.index_fill(-1, eos, -float("inf"))
        token = sampler.draw(logits).masked_fill(finished, pad)
        out[:, i] = token
        generated[i] = ~finished.all()
        finished |= torch.isin(token, eos)
        if streamer is not None:
            streamer.put(token.cpu())
        if i == max_new_tokens - 1 or (i % check_every == check_every - 1 and bool(finished.all())):
            break
        if step is None:
            cache.write_at = torch.full((1,), prompt_length, dtype=torch.long, device=device)
            step = _Step(model, cache, masks, token, positions[:, -1] + 1)
            if use_graph:
                step.record()
        else:
            step.advance(token)
    if streamer is not None:
        streamer.end()
    return torch.cat((input_ids, out[:, :int(generated.sum())]), dim=1)


def resolved_config(model: Any, generation_config: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``(settings, model inputs)`` as ``model.generate(generation_config=..., **kwargs)`` splits them: the
    generation keywords over the given config, then the model's ``generation_config``, then transformers'
    defaults; the keywords that are not generation settings come back as the model's inputs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base._prepare_generation_config(generation_config, **kwargs)


def generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generation_config: Any,
             cuda_graph: bool | None = None, streamer: Any = None) -> torch.Tensor:
    """:func:`decode` with the settings of a transformers ``GenerationConfig`` already resolved
    (:func:`resolved_config`) and accepted (:func:`unsupported`), returning what ``model.generate`` would."""
    eos = generation_config.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    sampler = Sampler(do_sample=bool(generation_config.do_sample), temperature=generation_config.temperature,
                      top_k=generation_config.top_k or None, top_p=generation_config.top_p,
                      min_p=generation_config.min_p)
    return decode(model, input_ids, attention_mask, max_new_tokens=generation_config.max_new_tokens,
                  sampler=sampler, eos_token_ids=eos_ids, pad_token_id=generation_config.pad_token_id,
                  min_new_tokens=generation_config.min_new_tokens or 0, cuda_graph=cuda_graph, streamer=streamer)


_told: set[str] = set()


def generate_or_hand_on(model: Any, fallback: Any, input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None, generation_config: Any = None,
                        cuda_graph: bool | None = None, streamer: Any = None, **kwargs: Any) -> Any:
    """``model.generate``'s result: from :func:`generate` in eval mode (no dropout while sampling) when
    :func:`unsupported` accepts the call, else from ``fallback`` (the original ``generate``) with the same
    arguments; the first time a reason sends calls there, it is logged. Generation settings may come as
    keywords (``max_new_tokens=...``), as ``generate`` takes them."""
    config, inputs = resolved_config(model, generation_config, **kwargs)
    extra = tuple(sorted(name for name, value in inputs.items() if value is not None))
    why = "no input_ids" if input_ids is None else unsupported(model, config, extra)
    if why is not None:
        if why not in _told:
            _told.add(why)
            log.info("generation through transformers' generate: %s", why)
        return fallback(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                        **({"streamer": streamer} if streamer is not None else {}), **kwargs)
    training = model.training
    model.eval()
    try:
        return generate(model, input_ids, attention_mask, config, cuda_graph=cuda_graph, streamer=streamer)
    finally:
        model.train(training)


def route_generate(model: Any, cuda_graph: bool | None = None) -> None:
    """Make ``model.generate`` (an instance attribute over the class's method) :func:`generate_or_hand_on`,
    for trainers that call ``generate`` themselves (trl's GRPO)."""
    if isinstance(vars(model).get("generate"), functools.partial):
        return  # routed already
    model.generate = functools.partial(generate_or_hand_on, model, model.generate, cuda_graph=cuda_graph)


def route_for_backend(model: Any, backend: str) -> str:
    """``TrainRequest.route_generate``: :func:`route_generate` unless ``backend`` is ``transformers`` or (with
    ``auto``) the model needs transformers' ``generate``; the run log's line.

    Raises:
        ConfigError: ``static`` for a model the decoder cannot serve.
    """
    why = None if backend == "transformers" else unsupported(model)
    if backend == "transformers" or (backend == "auto" and why is not None):
        return "generation: transformers' generate" + (f" ({why})" if why else "")
    if why is not None:
        raise ConfigError(static_refusal(why))
    route_generate(model)
    return "generation: static KV cache" + (", one CUDA graph a token" if next(model.parameters()).is_cuda else "")
