"""Talking to a model: chat-template prompts, sampling with the KV cache, streaming, left-padded batches;
and opening what a user points at (a run directory, a model or LoRA directory, a GGUF file) for it.
A vision-language model (its processor in place of the tokenizer) also takes images: content parts
``{"type": "image", "image": path}`` in a user message.

The model is the patched model ftengine trains (its forward with the kernel ops), put in eval mode
for the call and back as it was afterwards.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import NamedTuple

import torch

from ftengine.core.errors import FtengineError
from ftengine.core.errors import ModelError
from ftengine.core.types import Message


@dataclass
class Sampling:
    """How tokens are drawn; ``temperature`` 0 is greedy; ``top_k`` 0 keeps every token, ``None`` leaves
    the model's generation config to decide."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        top_k = {} if self.top_k is None else {"top_k": self.top_k}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "min_p": self.min_p or None, "max_new_tokens": self.max_new_tokens, **top_k}


def as_conversation(prompt: str | list[Message], system: str | None = None) -> list[Message]:
    """A prompt string as a one-turn conversation; ``system`` first unless the conversation has one."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The text the model continues: the chat template with the generation prompt, or the bare user
    text for a tokenizer without a template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str))


class _EvalMode:
    """Eval mode and the KV cache on for a call; the training mode and the cache flag back afterwards."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.use_cache = getattr(self.model.config, "use_cache", True)
        self.model.eval()
        self.model.config.use_cache = True

    def __exit__(self, *exc: Any) -> None:
        self.model.config.use_cache = self.use_cache
        self.model.train(self.training)


def _inputs(model: Any, tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: every row's last token must be real
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def _special_ids(tokenizer: Any) -> dict[str, Any]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}


def _decode(model: Any, inputs: dict[str, torch.Tensor], tokenizer: Any, sampling: Sampling,
            streamer: Any = None) -> torch.Tensor:
    """Prompts and completions: :mod:`ftengine.engine.static_decode` where it serves the model, else
    transformers' ``generate``."""
    from transformers import GenerationConfig

    from ftengine.engine import static_decode

    config = GenerationConfig(**_special_ids(tokenizer), **sampling.generate_kwargs())
    with _EvalMode(model), torch.no_grad():
        return static_decode.generate_or_hand_on(model, model.generate, **inputs, generation_config=config,
                                                 streamer=streamer)


def completion_ids(model: Any, tokenizer: Any, prompts: list[str], sampling: Sampling) -> torch.Tensor:
    """The new tokens after each prompt text, generated as one left-padded batch (``[prompts, new]``;
    a row that ended early is padded on the right)."""
    inputs = _inputs(model, tokenizer, prompts)
    return _decode(model, inputs, tokenizer, sampling)[:, inputs["input_ids"].shape[1]:]


def generate_batch(model: Any, tokenizer: Any, conversations: list[list[Message]], sampling: Sampling) -> list[str]:
    """One completion per conversation, generated as one left-padded batch."""
    new = completion_ids(model, tokenizer, [render_prompt(tokenizer, c) for c in conversations], sampling)
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def generate_stream(model: Any, tokenizer: Any, messages: list[Message], sampling: Sampling) -> Iterator[str]:
    """The completion's text piece by piece as it is generated (transformers' ``TextIteratorStreamer``)."""
    inputs = _inputs(model, tokenizer, [render_prompt(tokenizer, messages)])
    return _streamed(tokenizer, lambda streamer: _decode(model, inputs, tokenizer, sampling, streamer=streamer))


def _streamed(tokenizer: Any, decode: Callable[[Any], Any]) -> Iterator[str]:
    """The text ``decode(streamer)`` generates, piece by piece: it runs in a thread feeding the streamer."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            decode(streamer)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- backends


class TransformersChat:
    """A transformers model (ftengine-patched) and its tokenizer."""

    takes_images = False

    def __init__(self, model: Any, tokenizer: Any, description: str):
        self.model, self.tokenizer, self.description = model, tokenizer, description

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        return generate_stream(self.model, self.tokenizer, messages, sampling)

    def batch(self, conversations: list[list[Message]], sampling: Sampling) -> list[str]:
        return generate_batch(self.model, self.tokenizer, conversations, sampling)


class VisionChat(TransformersChat):
    """A vision-language model (ftengine-patched) and its processor: conversations may hold images."""

    takes_images = True

    def _answer(self, conversations: list[list[Message]], sampling: Sampling, **extra: Any) -> list[str]:
        from ftengine.engine import vision

        options = sampling.generate_kwargs()
        max_new_tokens = options.pop("max_new_tokens")
        return vision.generate_with_images(self.model, self.tokenizer, conversations, max_new_tokens=max_new_tokens,
                                           **options, **extra)

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        return _streamed(self.tokenizer.tokenizer, lambda streamer: self._answer([messages], sampling,
                                                                                 streamer=streamer))

    def batch(self, conversations: list[list[Message]], sampling: Sampling) -> list[str]:
        return [answer.strip() for answer in self._answer(conversations, sampling)]


def image_problem(backend: TransformersChat | LlamaCppChat, path: str, attached: int) -> str | None:
    """Why the image at ``path`` cannot join a message that already has ``attached`` images (None: it can)."""
    from ftengine.engine.vision import open_image
    from ftengine.engine.vision_api import images_per_turn_limit

    if not backend.takes_images:
        return f"{backend.description} is a text model: it takes no images"
    limit = images_per_turn_limit(backend.tokenizer)
    if limit is not None and attached >= limit:
        return f"this model takes at most {limit} image(s) a message"
    try:
        open_image(path)
    except ValueError as exc:
        return str(exc)
    return None


def user_message(text: str, images: list[str]) -> Message:
    """A user turn: the text, then the images as content parts when there are any (the order of the
    ``vision`` data format's turns: instruction, then image)."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image", "image": path} for path in images)]}


class LlamaCppChat:
    """A GGUF file run by llama.cpp (``llama_cpp``), with the chat template the file carries.

    Text only: llama.cpp's multimodal side (an ``mmproj`` file) is not driven from here."""

    takes_images = False

    def __init__(self, path: Path, n_ctx: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ModelError(f"{path}: a GGUF file needs llama-cpp-python (pip install llama-cpp-python)") from None
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
        self.description = f"{path.name} (llama.cpp)"

    def _options(self, sampling: Sampling) -> dict[str, Any]:
        return {"max_tokens": sampling.max_new_tokens, "temperature": max(sampling.temperature, 0.0),
                "top_p": sampling.top_p, "min_p": sampling.min_p, **({"top_k": 1} if sampling.temperature <= 0
                                                                      else {})}

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        for chunk in self.llm.create_chat_completion(messages=messages, stream=True, **self._options(sampling)):
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece

    def batch(self, conversations: list[list[Message]], sampling: Sampling) -> list[str]:
        return [self.llm.create_chat_completion(messages=c, **self._options(sampling))["choices"][0]["message"]
                ["content"].strip() for c in conversations]


def chat_backend(model: Any, tokenizer: Any, description: str = "the model") -> TransformersChat:
    """A loaded model with its tokenizer, or with its processor (:class:`VisionChat`: conversations with images)."""
    from ftengine.engine.vision_api import is_processor

    return (VisionChat if is_processor(tokenizer) else TransformersChat)(model, tokenizer, description)


def open_chat(path: str | Path) -> TransformersChat | LlamaCppChat:
    """What ``ftengine chat`` / ``generate`` talk to: a GGUF file (llama.cpp), a run directory or one of
    its checkpoints (the trained adapter on its base), or a model or LoRA directory; a vision-language
    model's (:class:`VisionChat`) takes images.

    Raises:
        FtengineError: a path that is none of these.
    """
    import ftengine

    source = Path(path)
    if source.is_file() and source.suffix == ".gguf":
        return LlamaCppChat(source)
    if not source.is_dir():
        raise FtengineError(f"{path}: expected a run directory, a model or LoRA directory, or a .gguf file")
    if (source / "config.yaml").exists() or source.name.startswith("checkpoint-"):
        from ftengine.engine.export_source import load_for_export

        model, tokenizer, _, _ = load_for_export(source, (), None)
        return chat_backend(model, tokenizer, f"{source} (latest checkpoint)")
    model, tokenizer = ftengine.load_model(str(source))
    return chat_backend(model, tokenizer, str(source))


def _with_image_paths_resolved(messages: list[Message], base_dir: Path) -> list[Message]:
    """``messages`` with each image part's relative path made relative to ``base_dir`` (the prompts file's)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{**part, "image": str(base_dir / part["image"])}
                       if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), str)
                       and not Path(part["image"]).expanduser().is_absolute() else part for part in content]
        out.append({**m, "content": content})
    return out


class Prompt(NamedTuple):
    """One row of a prompts file: its line number, the row as read and its conversation."""

    line: int
    row: dict[str, Any]
    messages: list[Message]


def read_prompts(path: Path) -> list[Prompt]:
    """``{"prompt": str}`` or ``{"messages": [...]}`` rows of a JSONL file, each with its conversation; an
    image part's relative path is taken relative to the file, and every image is opened once here.

    Raises:
        FtengineError: a line that is not such a row, or whose image is missing or unreadable (naming file
            and line).
    """
    from ftengine.engine.vision import images_of
    from ftengine.engine.vision import open_image

    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FtengineError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        prompt = row.get("messages", row.get("prompt")) if isinstance(row, dict) else None
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt))):
            raise FtengineError(f"{path}: line {number}: expected a 'prompt' string or a 'messages' list")
        turns = prompt if isinstance(prompt, list) else []
        contents = [m["content"] for m in turns if isinstance(m.get("content"), list)]
        if not all(isinstance(part, dict) for content in contents for part in content):
            raise FtengineError(f'{path}: line {number}: content parts must be objects ({{"type": "text", "text": '
                                f'...}} or {{"type": "image", "image": path}})')
        messages = _with_image_paths_resolved(as_conversation(prompt), path.parent)
        for image in images_of(messages):
            try:
                open_image(image)
            except ValueError as exc:
                raise FtengineError(f"{path}: line {number}: {exc}") from None
        rows.append(Prompt(number, row, messages))
    return rows


def check_images_taken(prompts: list[Prompt], path: Path, backend: TransformersChat | LlamaCppChat) -> None:
    """Refuse prompts with images for a backend that takes none.

    Raises:
        FtengineError: naming the first such line.
    """
    from ftengine.engine.vision import images_of

    if backend.takes_images:
        return
    for prompt in prompts:
        if images_of(prompt.messages):
            raise FtengineError(f"{path}: line {prompt.line}: holds an image, and {backend.description} is a text "
                                "model (images need a vision-language model's directory or run)")
