"""Generation: the patched model with its KV cache against plain transformers, batches, streaming,
LoRA directories loading with their base, and the chat / generate commands driven through stdin."""

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM
from transformers import AutoTokenizer

import ftengine
from ftengine.cli import main

PROMPTS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def lora_dir(demo_base, tmp_path_factory):
    """A LoRA export of the demo model with non-zero adapter weights (seeded), chatml template."""
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=64, dtype="float32")
    model = ftengine.add_lora(model, r=4, use_gradient_checkpointing=False, init_lora_weights="gaussian")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ftengine.get_chat_template(tokenizer, "chatml")
    return ftengine.export(model, tokenizer, str(tmp_path_factory.mktemp("lora") / "lora"), format="lora")


def reference_greedy(demo_base, lora_dir, prompt, max_new_tokens=12):
    """Unpatched transformers + peft, one prompt, greedy, no batching."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(str(lora_dir))
    base = AutoModelForCausalLM.from_pretrained(str(demo_base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(lora_dir)).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def references(demo_base, lora_dir):
    return [reference_greedy(demo_base, lora_dir, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def loaded(lora_dir):
    return ftengine.load_model(str(lora_dir), max_seq_length=64, dtype="float32")


def test_load_model_on_a_lora_directory_loads_its_base(loaded, lora_dir):
    model, tokenizer = loaded
    assert hasattr(model, "peft_config") and model.training
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(lora_dir)).chat_template
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_generate_matches_transformers(loaded, references):
    model, tokenizer = loaded
    one = ftengine.generate(model, tokenizer, PROMPTS[0], temperature=0, max_new_tokens=12)
    assert one == references[0] and one
    assert model.training  # back in the mode it was in
    batch = ftengine.generate(model, tokenizer, PROMPTS, temperature=0, max_new_tokens=12)
    assert batch == references
    pieces = list(ftengine.generate(model, tokenizer, [{"role": "user", "content": PROMPTS[1]}], stream=True,
                                    temperature=0, max_new_tokens=12))
    assert "".join(pieces).strip() == references[1]


def test_sampling_is_seeded_and_filters(loaded):
    model, tokenizer = loaded
    torch.manual_seed(3)
    first = ftengine.generate(model, tokenizer, PROMPTS[0], temperature=1.0, top_p=0.9, min_p=0.05,
                              max_new_tokens=8)
    torch.manual_seed(3)
    assert ftengine.generate(model, tokenizer, PROMPTS[0], temperature=1.0, top_p=0.9, min_p=0.05,
                             max_new_tokens=8) == first
    with pytest.raises(ValueError, match="stream=True takes one prompt"):
        ftengine.generate(model, tokenizer, PROMPTS, stream=True)


def test_chat_command_streams_and_resets(lora_dir, references):
    runner = CliRunner()
    stdin = f"{PROMPTS[0]}\n/reset\n{PROMPTS[1]}\n/exit\n{PROMPTS[0]}\n"
    result = runner.invoke(main, ["chat", str(lora_dir), "--temperature", "0", "--max-new-tokens", "12"],
                           input=stdin)
    assert result.exit_code == 0, result.output
    answers = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    # after /reset the second question is asked alone, so it gets the single-turn reference answer;
    # nothing is answered after /exit
    assert answers == references


def test_generate_command_writes_completions(lora_dir, references, tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"prompt": PROMPTS[0], "id": 1}) + "\n"
                      + json.dumps({"messages": [{"role": "user", "content": PROMPTS[1]}]}) + "\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["generate", str(lora_dir), "--input", str(source), "--output", str(out),
                                       "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"] for r in rows] == references and rows[0]["id"] == 1
    source.write_text('{"question": "x"}\n')
    result = CliRunner().invoke(main, ["generate", str(lora_dir), "--input", str(source), "--output", str(out)])
    assert result.exit_code == 1 and "line 1: expected a 'prompt' string or a 'messages' list" in result.output


def test_chat_on_a_gguf_file(demo_base, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = ftengine.load_model(str(demo_base), max_seq_length=64, dtype="float32")
    ftengine.get_chat_template(tokenizer, "chatml")
    out = ftengine.export(model, tokenizer, str(tmp_path / "gguf"), format="gguf", quantization="f16")
    path = next(out.glob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    expected = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8,
                                          temperature=0.0, top_k=1)["choices"][0]["message"]["content"].strip()
    result = CliRunner().invoke(main, ["chat", str(path), "--temperature", "0", "--max-new-tokens", "8"],
                                input=PROMPTS[0] + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected


def reference_image_answer(base, messages, max_new_tokens=4):
    """Unpatched transformers on a vision-language checkpoint: its processor's template, greedy."""
    from PIL import Image
    from transformers import AutoConfig
    from transformers import AutoModelForImageTextToText

    from ftengine.engine.vision import load_processor

    processor = load_processor(str(base), AutoConfig.from_pretrained(str(base)))  # the inputs; the model is HF's own
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32).eval()
    template = [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
                for m in messages]
    text = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)
    images = [Image.open(p["image"]).convert("RGB") for m in messages for p in m["content"] if p["type"] == "image"]
    inputs = processor(text=[text], images=[images], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def vision_base(formula_images):
    """The vision demo's tiny Qwen2.5-VL-architecture base model and its processor (random weights)."""
    from ftengine.demo.vision import base_model_dir

    return base_model_dir()


@pytest.fixture(scope="module")
def image_prompts(vision_base, formula_images, tmp_path_factory):
    """Two images (ones the random model answers differently) beside a prompts file naming them relatively,
    and the reference answers."""
    import shutil

    folder = tmp_path_factory.mktemp("image-prompts")
    (folder / "pictures").mkdir()
    names = []
    for i in (0, 2):
        shutil.copy(formula_images / "images" / f"{i}.png", folder / "pictures" / f"{i}.png")
        names.append(f"pictures/{i}.png")
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Read:"},
                                                       {"type": "image", "image": name}]}], "id": i}
            for i, name in enumerate(names)]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    absolute = [[{**m, "content": [{**p, "image": str(folder / p["image"])} if p["type"] == "image" else p
                                   for p in m["content"]]} for m in row["messages"]] for row in rows]
    return path, absolute, [reference_image_answer(vision_base, messages) for messages in absolute]


def test_generate_command_answers_image_prompts_like_transformers(vision_base, image_prompts, tmp_path):
    path, _, references = image_prompts
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["generate", str(vision_base), "--input", str(path), "--output", str(out),
                                       "--temperature", "0", "--max-new-tokens", "4", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"] for r in rows] == references and [r["id"] for r in rows] == [0, 1]
    assert all(references) and references[0] != references[1], references


def test_chat_command_attaches_images_to_the_next_message(vision_base, image_prompts, tmp_path):
    _, absolute, references = image_prompts
    first, second = (conversation[0]["content"][1]["image"] for conversation in absolute)
    stdin = f"/image {tmp_path / 'missing.png'}\n/image {second}\nRead:\n/reset\n/image {first}\nRead:\n/exit\n"
    result = CliRunner().invoke(main, ["chat", str(vision_base), "--temperature", "0", "--max-new-tokens", "4"],
                                input=stdin)
    assert result.exit_code == 0, result.output
    assert [line.strip() for line in result.stdout.splitlines() if line.strip()] == references[::-1]
    assert "/image PATH attaches an image" in result.stderr
    assert "missing.png' does not exist" in result.stderr
    assert "goes with your next message" in result.stderr


def test_an_image_past_the_models_limit_a_message_is_refused(mllama_base, image_prompts):
    from ftengine.engine.generation import VisionChat
    from ftengine.engine.generation import image_problem

    _, absolute, _ = image_prompts
    image = absolute[0][0]["content"][1]["image"]
    _, processor = ftengine.load_model(str(mllama_base), max_seq_length=64, dtype="float32")
    chat = VisionChat(None, processor, "tiny mllama")
    assert image_problem(chat, image, 0) is None
    assert image_problem(chat, image, 1) == "this model takes at most 1 image(s) a message"


def test_images_for_a_text_model_or_missing_files_are_refused_naming_the_line(lora_dir, image_prompts, tmp_path):
    path, _, _ = image_prompts
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["generate", str(lora_dir), "--input", str(path), "--output", str(out)])
    assert result.exit_code == 1 and "prompts.jsonl: line 1: holds an image" in result.output
    assert "is a text model" in result.output and not out.exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "nowhere.png"}]}]}) + "\n")
    result = CliRunner().invoke(main, ["generate", str(lora_dir), "--input", str(broken), "--output", str(out)])
    assert result.exit_code == 1 and "broken.jsonl: line 2: image file" in result.output
    broken.write_text(json.dumps({"messages": [{"role": "user", "content": ["hi"]}]}) + "\n")
    result = CliRunner().invoke(main, ["generate", str(lora_dir), "--input", str(broken), "--output", str(out)])
    assert result.exit_code == 1 and "broken.jsonl: line 1: content parts must be objects" in result.output
    result = CliRunner().invoke(main, ["chat", str(lora_dir)], input=f"/image {path}\n/exit\n")
    assert result.exit_code == 0 and "is a text model: it takes no images" in result.stderr


def test_the_python_api_streams_an_answer_about_an_image(vision_base, image_prompts):
    _, absolute, references = image_prompts
    model, processor = ftengine.load_model(str(vision_base), max_seq_length=64, dtype="float32")
    pieces = list(ftengine.generate(model, processor, absolute[1], stream=True, temperature=0, max_new_tokens=4))
    assert "".join(pieces).strip() == references[1]
    assert ftengine.generate(model, processor, absolute, temperature=0, max_new_tokens=4) == references
