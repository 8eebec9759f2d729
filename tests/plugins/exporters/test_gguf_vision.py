"""GGUF export of vision-language models: the language model in llama.cpp gives transformers' logits
on a text prompt; the mmproj file holds every key llama.cpp's clip loader reads and every vision tensor,
named, shaped, typed and valued as derived here from the merged model (qkv split, the two-frame patch
embedding split, Gemma's ``1 + w`` projector norm); unsupported families are refused before training.

llama-cpp-python is built without its mtmd (clip) library here, so the mmproj file is checked by
reading it back with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoConfig
from transformers import Gemma3Config
from transformers import Gemma3ForConditionalGeneration
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers import Qwen2VLForConditionalGeneration
from transformers import SiglipVisionConfig

from ftengine.core.config import ExportEntry
from ftengine.core.errors import ConfigError
from ftengine.core.errors import ExportError
from ftengine.engine import preflight
from ftengine.plugins.exporters.gguf.exporter import GGUFExporter

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = [5, 17, 100, 33, 77, 12, 9, 250, 3]

QWEN_NAMES = [  # Hugging Face name -> llama.cpp's clip name (tools/mtmd/clip-impl.h, gguf-py's tensor map)
    (r"model\.visual\.patch_embed\.proj\.", "v.patch_embd."),
    (r"model\.visual\.blocks\.(\d+)\.norm1\.", r"v.blk.\1.ln1."),
    (r"model\.visual\.blocks\.(\d+)\.norm2\.", r"v.blk.\1.ln2."),
    (r"model\.visual\.blocks\.(\d+)\.attn\.qkv\.", r"v.blk.\1.attn_qkv."),
    (r"model\.visual\.blocks\.(\d+)\.attn\.proj\.", r"v.blk.\1.attn_out."),
    (r"model\.visual\.blocks\.(\d+)\.mlp\.(fc1|up_proj)\.", r"v.blk.\1.ffn_up."),
    (r"model\.visual\.blocks\.(\d+)\.mlp\.(fc2|down_proj)\.", r"v.blk.\1.ffn_down."),
    (r"model\.visual\.blocks\.(\d+)\.mlp\.gate_proj\.", r"v.blk.\1.ffn_gate."),
    (r"model\.visual\.merger\.ln_q\.", "v.post_ln."),
    (r"model\.visual\.merger\.mlp\.(\d)\.", r"mm.\1."),
]
GEMMA_NAMES = [
    (r"model\.vision_tower\.embeddings\.patch_embedding\.", "v.patch_embd."),
    (r"model\.vision_tower\.embeddings\.position_embedding\.", "v.position_embd."),
    (r"model\.vision_tower\.encoder\.layers\.(\d+)\.layer_norm1\.", r"v.blk.\1.ln1."),
    (r"model\.vision_tower\.encoder\.layers\.(\d+)\.layer_norm2\.", r"v.blk.\1.ln2."),
    (r"model\.vision_tower\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"v.blk.\1.attn_\2."),
    (r"model\.vision_tower\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"v.blk.\1.attn_out."),
    (r"model\.vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"v.blk.\1.ffn_up."),
    (r"model\.vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"v.blk.\1.ffn_down."),
    (r"model\.vision_tower\.post_layernorm\.", "v.post_ln."),
    (r"model\.multi_modal_projector\.mm_input_projection_weight$", "mm.input_projection.weight"),
    (r"model\.multi_modal_projector\.mm_soft_emb_norm\.", "mm.soft_emb_norm."),
]


def expected_tensors(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """The mmproj tensors llama.cpp reads, derived from a merged state dict: names by ``rules``, fused qkv in
    three row blocks, a Conv3d patch embedding ``(C, 3, 2, P, P)`` as its two frames, Gemma's projector
    RMSNorm as ``1 + w``."""
    out = {}
    for hf_name, tensor in state.items():
        for pattern, replacement in rules:
            if re.match(pattern, hf_name):
                name = re.sub(pattern, replacement, hf_name)
                break
        else:
            continue
        if ".attn_qkv." in name:
            c = tensor.shape[0] // 3
            for i, part in enumerate("qkv"):
                out[name.replace("attn_qkv", f"attn_{part}")] = tensor[i * c: (i + 1) * c]
        elif name == "v.patch_embd.weight" and tensor.dim() == 5:
            out[name], out[name + ".1"] = tensor[:, :, 0], tensor[:, :, 1]
        elif name == "mm.soft_emb_norm.weight":
            out[name] = 1.0 + tensor
        else:
            out[name] = tensor
    return out


def as_float32(value):
    """A key's value as GGUF stores it: floats (alone or in a list) rounded to float32."""
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, list):
        return [as_float32(v) for v in value]
    return value


def check_mmproj(path, state, rules, keys: dict, f32: tuple[str, ...] = ()) -> None:
    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    fields.pop("general.name")
    assert fields == {k: as_float32(v) for k, v in keys.items()}
    expected = expected_tensors(state, rules)
    written = {t.name: t for t in reader.tensors}
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        f16 = tensor.dim() > 1 and name not in f32
        assert written[name].tensor_type.name == ("F16" if f16 else "F32"), name
        data = np.asarray(written[name].data)
        assert data.shape == tuple(tensor.shape), name
        want = tensor.float().numpy().astype(np.float16 if f16 else np.float32)
        np.testing.assert_array_equal(data, want, err_msg=name)


def llama_cpp_logits(path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)]).copy()
    llm.close()
    return scores


def assert_language_matches(model, gguf_path) -> None:
    with torch.no_grad():
        reference = model(torch.tensor([PROMPT])).logits[0].float().numpy()
    got = llama_cpp_logits(gguf_path, PROMPT)
    rel = np.sqrt(((got - reference) ** 2).mean() / (reference**2).mean())
    assert rel < 1e-3, rel
    assert (got.argmax(-1) == reference.argmax(-1)).all()


@pytest.fixture(scope="module")
def tokenizer():
    from ftengine.demo.vision import build_tokenizer

    return build_tokenizer()


def image_processor(mean, std):
    return SimpleNamespace(image_mean=mean, image_std=std)


def qwen2_vl(tokenizer, version: str = "2") -> Qwen2VLForConditionalGeneration:
    from transformers import Qwen2_5_VLConfig
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if version == "2":
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    else:  # window attention in 112-pixel windows (Qwen2.5-VL's), full attention every second block
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=32, window_size=112, fullatt_block_indexes=[1, 3])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def gemma3(tokenizer) -> Gemma3ForConditionalGeneration:
    # both layers local with one rope base: llama.cpp fixes Gemma 3's pattern at five local to one global
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                max_position_embeddings=64, sliding_window=32, layer_types=["sliding_attention"] * 2,
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                                                        mm_tokens_per_image=4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_qwen2_vl_language_model_and_mmproj(tmp_path, tokenizer):
    model = qwen2_vl(tokenizer)
    processor = SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]))
    lines = GGUFExporter().export(model, processor, tmp_path, {"quantization": "f32"})
    mmproj = tmp_path / "mmproj-model-f16.gguf"
    assert any(line.startswith("mmproj-model-f16.gguf: 40 tensors (F16 x16, F32 x24)") for line in lines), lines
    assert_language_matches(model, tmp_path / "model-f32.gguf")
    keys = {"general.architecture": "clip", "general.type": "mmproj", "general.file_type": 1,
            "clip.has_vision_encoder": True, "clip.projector_type": "qwen2vl_merger",
            "clip.vision.projection_dim": 32, "clip.vision.image_size": 560, "clip.vision.patch_size": 14,
            "clip.vision.embedding_length": 32, "clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2,
            "clip.vision.attention.head_count": 2, "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.spatial_merge_size": 2, "clip.vision.image_mean": [0.1, 0.2, 0.3],
            "clip.vision.image_std": [0.4, 0.5, 0.6]}  # no activation flag: quick GELU, llama.cpp's default
    check_mmproj(mmproj, model.state_dict(), QWEN_NAMES, keys)
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./model-f32.gguf\nFROM ./mmproj-model-f16.gguf\n")


def test_gemma3_language_model_and_mmproj(tmp_path, tokenizer):
    model = gemma3(tokenizer)
    lines = GGUFExporter().export(model, tokenizer, tmp_path, {"quantization": ["f32", "q8_0"]})
    assert "note: mmproj: no image processor given; wrote gemma3's usual image mean/std" in lines
    assert_language_matches(model, tmp_path / "f32" / "model-f32.gguf")
    keys = {"general.architecture": "clip", "general.type": "mmproj", "general.file_type": 1,
            "clip.has_vision_encoder": True, "clip.projector_type": "gemma3", "clip.use_gelu": True,
            "clip.vision.projection_dim": 64, "clip.vision.image_size": 56, "clip.vision.patch_size": 14,
            "clip.vision.embedding_length": 32, "clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2,
            "clip.vision.attention.head_count": 2, "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.projector.scale_factor": 2,  # 4x4 patches pooled to 2x2 image tokens
            "clip.vision.image_mean": [0.5] * 3, "clip.vision.image_std": [0.5] * 3}
    check_mmproj(tmp_path / "mmproj-model-f16.gguf", model.state_dict(), GEMMA_NAMES, keys,
                 f32=("v.position_embd.weight",))
    modelfile = (tmp_path / "q8_0" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\nFROM ../mmproj-model-f16.gguf\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f32", "mmproj-model-f16.gguf", "q8_0"]


@pytest.fixture(scope="module")
def vision_base(tmp_path_factory):
    os.environ.setdefault("FTENGINE_CACHE", str(tmp_path_factory.mktemp("ftengine-cache")))
    from ftengine.demo.vision import base_model_dir

    return base_model_dir()


def test_qwen2_5_vl_with_lora_on_both_towers_merges_into_both_files(tmp_path, vision_base):
    """The demo's Qwen2.5-VL with its real processor and LoRA on the language and vision towers: both
    files hold peft's own merge (``merge_and_unload``); q4_k_m language weights still load in llama.cpp."""
    from peft import LoraConfig
    from peft import get_peft_model

    from ftengine.core.plugins import adapter_for_model_type
    from ftengine.engine.vision import load_processor

    processor = load_processor(str(vision_base), AutoConfig.from_pretrained(str(vision_base)))
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(vision_base), dtype=torch.float32)
    targets = adapter_for_model_type("qwen2_5_vl").vision.target_modules()
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload().eval()
    lines = GGUFExporter().export(model, processor, tmp_path, {"quantization": ["f32", "q4_k_m"]})
    mmproj = tmp_path / "mmproj-demo-qwen2_5_vl-tiny-f16.gguf"
    assert lines[-1] == (f"llama.cpp: llama-mtmd-cli -m {tmp_path / 'f32' / 'model-f32.gguf'} --mmproj {mmproj} "
                         f"--image <image> -p <prompt>")
    assert_language_matches(merged, tmp_path / "f32" / "model-f32.gguf")
    quantized = llama_cpp_logits(tmp_path / "q4_k_m" / "model-q4_k_m.gguf", PROMPT)
    assert quantized.shape == (len(PROMPT), merged.config.text_config.vocab_size)
    vision = processor.image_processor
    v = merged.config.vision_config
    keys = {"general.architecture": "clip", "general.type": "mmproj", "general.file_type": 1,
            "clip.has_vision_encoder": True, "clip.projector_type": "qwen2.5vl_merger", "clip.use_silu": True,
            "clip.vision.projection_dim": merged.config.text_config.hidden_size, "clip.vision.image_size": 560,
            "clip.vision.patch_size": v.patch_size, "clip.vision.embedding_length": v.hidden_size,
            "clip.vision.feed_forward_length": v.intermediate_size, "clip.vision.block_count": v.depth,
            "clip.vision.attention.head_count": v.num_heads, "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.spatial_merge_size": 2, "clip.vision.n_wa_pattern": v.fullatt_block_indexes[0] + 1,
            "clip.vision.image_mean": list(vision.image_mean), "clip.vision.image_std": list(vision.image_std)}
    state = merged.state_dict()
    assert any("visual.blocks.0.attn.qkv" in n for n in state)
    lora_free = base.__class__.from_pretrained(str(vision_base), dtype=torch.float32).state_dict()
    assert not torch.equal(state["model.visual.blocks.0.attn.qkv.weight"],
                           lora_free["model.visual.blocks.0.attn.qkv.weight"])  # the vision LoRA was merged
    check_mmproj(mmproj, state, QWEN_NAMES, keys)


def test_a_vision_language_family_without_an_mmproj_layout_is_refused(tmp_path, monkeypatch, tokenizer):
    import dataclasses

    from ftengine.core.plugins import registries

    entry = registries().entries["models"]["qwen2_vl"]
    monkeypatch.setattr(entry, "obj", dataclasses.replace(entry.obj, gguf=dataclasses.replace(entry.obj.gguf,
                                                                                               mmproj=None)))
    with pytest.raises(ExportError, match=r"cannot export the 'qwen2_vl' vision-language model to GGUF: llama.cpp's "
                                          r"mmproj \(vision tower \+ projector\) file is written for gemma3, "
                                          r"qwen2_5_vl only"):
        GGUFExporter().export(qwen2_vl(tokenizer), tokenizer, tmp_path / "out", {"quantization": "f16"})
    assert not (tmp_path / "out").exists()


def test_preflight_refuses_gguf_export_of_an_unsupported_vision_language_model(tiny_config, demo_base, tmp_path):
    model_dir = tmp_path / "llava"
    shutil.copytree(demo_base, model_dir)
    text = json.loads((model_dir / "config.json").read_text())
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": text,
                                                       "vision_config": vision, "image_token_index": 5}))
    config = tiny_config()
    config.model.name_or_path = str(model_dir)
    config.export = [ExportEntry(format="lora"), ExportEntry(format="gguf")]
    with pytest.raises(ConfigError) as err:
        preflight.check(config)
    assert str(err.value) == ("export[1] (gguf): cannot export the 'llava' vision-language model to GGUF: llama.cpp's "
                              "mmproj (vision tower + projector) file is written for gemma3, qwen2_5_vl, qwen2_vl only")


@pytest.mark.slow
def test_cli_run_and_export_of_a_vision_run_write_both_files(vision_base, tmp_path):
    """``ftengine run config.yaml`` with a gguf export, then ``ftengine export`` of its checkpoint: both write the
    language model and the mmproj file with the run's image processor (no fallback note)."""
    import yaml
    from click.testing import CliRunner

    from ftengine.cli import main
    from ftengine.demo.vision import data_dir

    torch.set_num_threads(1)
    config = {"model": {"name_or_path": str(vision_base), "max_seq_length": 128, "dtype": "float32"},
              "lora": {"r": 4, "lora_alpha": 8},
              "data": {"path": str(data_dir() / "data.jsonl"), "format": "vision", "instruction": "LaTeX:",
                       "max_rows": 4},
              "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 1,
                           "gradient_checkpointing": False},
              "export": [{"format": "gguf", "quantization": "q8_0"}],
              "output": {"dir": str(tmp_path / "runs"), "name": "vision-gguf"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run_dir / "exports" / "gguf").glob("*.gguf")) == [
        "mmproj-demo-qwen2_5_vl-tiny-f16.gguf", "model-q8_0.gguf"]
    exported = CliRunner().invoke(main, ["export", str(run_dir), "--format", "gguf", "--quant", "q8_0",
                                         "--output", str(tmp_path / "again")])
    assert exported.exit_code == 0, exported.output
    assert "mmproj-demo-qwen2_5_vl-tiny-f16.gguf" in exported.output
    assert "no image processor" not in result.output + exported.output
    first, second = (GGUFReader(str(d / "mmproj-demo-qwen2_5_vl-tiny-f16.gguf"))
                     for d in (run_dir / "exports" / "gguf", tmp_path / "again" / "gguf"))
    for a, b in zip(first.tensors, second.tensors, strict=True):  # the checkpoint holds the trained vision LoRA
        assert a.name == b.name and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def mtmd_library():
    """llama-cpp-python's mtmd (clip) bindings, or a skip where its library was not built (``LLAVA_BUILD=OFF``;
    ``MTMD_CPP_LIB`` may name a directory holding a ``libmtmd.so`` of the same llama.cpp)."""
    try:
        from llama_cpp import mtmd_cpp
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        pytest.skip(f"llama.cpp's mtmd library is not available: {exc}")
    return mtmd_cpp


def clip_embeddings(model_gguf, mmproj, rgb: np.ndarray) -> np.ndarray:
    """llama.cpp's own image embeddings ``(tokens, text width)`` of an RGB image, through the mmproj file."""
    import ctypes

    mtmd = mtmd_library()
    llm = llama_cpp.Llama(str(model_gguf), n_ctx=256, verbose=False, n_threads=2)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx, "llama.cpp could not load the mmproj file"
    data = np.ascontiguousarray(rgb, dtype=np.uint8)
    bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    chunks = mtmd.mtmd_input_chunks_init()
    marker = mtmd.mtmd_default_marker()
    text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
    assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) == 0
    width = llm.n_embd()
    out = None
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * width,)).reshape(n, width).copy()
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    llm.close()
    assert out is not None, "no image chunk"
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_llama_cpp_clip_gives_the_image_embeddings_transformers_gives(tmp_path, tokenizer, family):
    """Where llama.cpp's mtmd library is built: it loads the mmproj file and embeds an image as transformers
    does (an image already of the processed size, so both resize nothing)."""
    mtmd_library()
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(0)
    if family.startswith("qwen"):
        model = qwen2_vl(tokenizer, "2" if family == "qwen2_vl" else "2.5")
        rgb = (rng.random((112, 224, 3)) * 255).astype(np.uint8)  # 8 x 16 patches: 32 image tokens, two windows
        processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 64, patch_size=14,
                                             merge_size=2, temporal_patch_size=2)
        batch = processor(images=[Image.fromarray(rgb)], return_tensors="pt")
        with torch.no_grad():
            expected = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    else:
        model = gemma3(tokenizer)
        rgb = (rng.random((56, 56, 3)) * 255).astype(np.uint8)
        processor = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
        batch = processor(images=[Image.fromarray(rgb)], return_tensors="pt")
        with torch.no_grad():
            expected = model.model.get_image_features(batch["pixel_values"]).pooler_output[0]
    GGUFExporter().export(model, SimpleNamespace(tokenizer=tokenizer, image_processor=processor), tmp_path,
                          {"quantization": "f32"})
    got = clip_embeddings(tmp_path / "model-f32.gguf", tmp_path / "mmproj-model-f16.gguf", rgb)
    expected = expected.float().numpy()
    assert got.shape == expected.shape
    rel = np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean())
    assert rel < 3e-3, rel  # F16 matrices
