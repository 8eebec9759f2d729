"""The static-cache decoder against transformers' ``generate`` on tiny float64 models: greedy continuations of
left-padded batches token for token (sliding windows shorter than the sequence included), EOS and padding,
the sampling filters against transformers' warpers, the routing of ``model.generate``; on a GPU the CUDA
graph replay against the eager step and transformers."""

import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM
from transformers import Gemma3TextConfig
from transformers import GenerationConfig
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import MistralConfig
from transformers import MistralForCausalLM
from transformers import Phi3Config
from transformers import Phi3ForCausalLM
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM

from ftengine.engine import static_decode
from ftengine.engine.static_decode import Sampler
from ftengine.engine.static_decode import decode

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(sliding_window=4, head_dim=8)),  # alternating windows
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=5)),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}
NEW = 12


def tiny(family, attention="sdpa", dtype=torch.float64):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**SIZES, **extra)
    config._attn_implementation = attention
    return model_class(config).to(dtype).eval()


def left_padded(batch=3, length=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SIZES["vocab_size"], (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_greedy(model, ids, mask, **settings):
    settings = {"eos_token_id": None, **settings}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          **settings)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_greedy_batch_matches_transformers(family, attention):
    """transformers' eager attention mishandles left padding, so the reference is its sdpa batch, which the
    eager decoder must match as well."""
    ids, mask = left_padded()
    expected = hf_greedy(tiny(family, "sdpa"), ids, mask)
    got = decode(tiny(family, attention), ids, mask, max_new_tokens=NEW, sampler=Sampler(do_sample=False),
                 pad_token_id=0)
    assert torch.equal(got, expected)


def test_greedy_of_a_padded_row_is_the_row_alone():
    model = tiny("gemma3")
    ids, mask = left_padded()
    batch = decode(model, ids, mask, max_new_tokens=NEW, sampler=Sampler(do_sample=False))
    alone = hf_greedy(model, ids[:1, 3:], None)
    assert torch.equal(batch[0, -NEW:], alone[0, -NEW:])


def test_patched_model_with_lora_matches_transformers_and_peft():
    from peft import LoraConfig
    from peft import get_peft_model

    from ftengine.core import plugins
    from ftengine.core.kernels import get_op

    reference = tiny("llama", dtype=torch.float32)
    patched = copy.deepcopy(reference)
    plugins.adapter_for_model_type("llama").patch(patched, get_op)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights="gaussian")
    models = []
    for model in (reference, patched):
        torch.manual_seed(2)
        models.append(get_peft_model(model, copy.deepcopy(lora)).eval())
    ids, mask = left_padded(batch=4, length=9)
    expected = hf_greedy(models[0], ids, mask)
    assert torch.equal(decode(models[1], ids, mask, max_new_tokens=NEW, sampler=Sampler(do_sample=False)), expected)


@pytest.mark.parametrize("check_every", [16, 2])
def test_rows_end_at_eos_padded_and_the_output_as_long_as_transformers(check_every, monkeypatch):
    """Whether the loop stops at a read-back or runs to the limit, the output is cut where the last row ended."""
    monkeypatch.setattr(static_decode, "EOS_CHECK_EVERY", check_every)
    model = tiny("qwen2")
    ids, mask = left_padded()
    free = hf_greedy(model, ids, mask)[:, ids.shape[1]:]
    eos = [int(free[0, 2]), int(free[1, 5]), int(free[2, 4])]  # tokens each row draws early on
    for settings in ({}, {"min_new_tokens": 4}):
        expected = hf_greedy(model, ids, mask, eos_token_id=eos, **settings)
        got = decode(model, ids, mask, max_new_tokens=NEW, sampler=Sampler(do_sample=False), eos_token_ids=eos,
                     pad_token_id=0, min_new_tokens=settings.get("min_new_tokens", 0))
        assert torch.equal(got, expected)
    assert hf_greedy(model, ids, mask, eos_token_id=eos).shape[1] < ids.shape[1] + NEW  # every row ended early


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3),
                                      dict(min_p=0.1), dict(temperature=0.6, top_k=10, top_p=0.9, min_p=0.05)])
def test_sampling_distribution_matches_transformers_warpers(settings):
    from transformers import LogitsProcessorList
    from transformers import MinPLogitsWarper
    from transformers import TemperatureLogitsWarper
    from transformers import TopKLogitsWarper
    from transformers import TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.get("temperature", 1.0))])
    if "top_k" in settings:
        warpers.append(TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        warpers.append(TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        warpers.append(MinPLogitsWarper(settings["min_p"]))
    expected = warpers(None, logits.clone()).softmax(-1)
    got = Sampler(**settings).probabilities(logits)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert got.sum(-1).sub(1).abs().max() < 1e-5


def test_sampling_draws_only_kept_tokens_and_top_k_1_is_greedy():
    model = tiny("llama")
    ids, mask = left_padded()
    torch.manual_seed(0)
    one = decode(model, ids, mask, max_new_tokens=NEW, sampler=Sampler(top_k=1))
    assert torch.equal(one, hf_greedy(model, ids, mask))
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(top_k=3)
    kept = logits.topk(3).indices
    assert all(int(sampler.draw(logits)[b]) in kept[b] for _ in range(20) for b in range(4))


def test_routed_generate_decodes_supported_calls_and_hands_on_the_rest(monkeypatch):
    model = tiny("llama").train()
    ids, mask = left_padded()
    greedy = hf_greedy(model, ids, mask)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    calls = []
    real_decode = static_decode.decode
    monkeypatch.setattr(static_decode, "decode", lambda *a, **k: calls.append(k) or real_decode(*a, **k))
    static_decode.route_generate(model)
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, generation_config=config), greedy)
    assert len(calls) == 1 and model.training  # decoded in eval mode, the mode back afterwards
    beam_config = GenerationConfig(max_new_tokens=NEW, num_beams=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, generation_config=beam_config), beams)
    assert len(calls) == 1


def test_the_backend_choice_routes_generate_or_names_why_not():
    from ftengine.core.errors import ConfigError

    model = tiny("llama")
    assert static_decode.route_for_backend(model, "transformers") == "generation: transformers' generate"
    assert "generate" not in vars(model)
    assert static_decode.route_for_backend(model, "auto") == "generation: static KV cache"
    assert "generate" in vars(model)
    model = tiny("llama")
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in static_decode.route_for_backend(model, "auto") and "generate" not in vars(model)
    with pytest.raises(ConfigError, match="generation_backend: static cannot serve this model: attention"):
        static_decode.route_for_backend(model, "static")


def test_what_needs_transformers_generate_is_named():
    model = tiny("llama")
    assert static_decode.unsupported(model) is None
    assert "num_beams=2" in static_decode.unsupported(model, GenerationConfig(num_beams=2, max_new_tokens=4))
    assert "pixel_values" in static_decode.unsupported(model, None, ("pixel_values",))
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in static_decode.unsupported(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_graph_replay_matches_the_eager_step_and_transformers(family):
    from ftengine.core import plugins
    from ftengine.core.kernels import get_op

    model = tiny(family, dtype=torch.float32).cuda()
    patched = copy.deepcopy(model)
    plugins.adapter_for_model_type(model.config.model_type).patch(patched, get_op)
    ids, mask = (t.cuda() for t in left_padded(batch=8, length=16))
    expected = hf_greedy(model, ids, mask)
    eager, graphed = (decode(patched, ids, mask, max_new_tokens=NEW, sampler=Sampler(do_sample=False),
                             cuda_graph=cuda_graph) for cuda_graph in (False, True))
    assert torch.equal(graphed, eager)
    assert eager.shape == expected.shape and (eager == expected).float().mean() > 0.95  # fp32 kernels may tie-break


def test_a_streamer_gets_the_prompt_then_each_token_as_transformers_gives_them():
    class Recorder:
        def __init__(self):
            self.pieces, self.ended = [], False

        def put(self, value):
            self.pieces.append(value.tolist())

        def end(self):
            self.ended = True

    model = tiny("llama")
    ids = torch.randint(3, SIZES["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(1))
    eos = int(hf_greedy(model, ids, None)[0, ids.shape[1] + 4])  # the fifth token ends the row
    recorded = []
    for run in (lambda s: model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                                         pad_token_id=0, streamer=s),
                lambda s: decode(model, ids, None, max_new_tokens=NEW, sampler=Sampler(do_sample=False),
                                 eos_token_ids=[eos], streamer=s)):
        recorder = Recorder()
        out = run(recorder)
        assert recorder.ended and len(recorder.pieces) == 1 + out.shape[1] - ids.shape[1]
        recorded.append(recorder.pieces)
    assert recorded[1] == recorded[0]


def test_generate_keywords_as_notebooks_pass_them_go_to_the_decoder(monkeypatch):
    """``model.generate(**inputs, max_new_tokens=..., temperature=..., min_p=...)`` after Unsloth's
    ``for_inference``: settings given as keywords are resolved as transformers resolves them (no
    ``do_sample``: greedy), and the call is decoded, not handed on."""
    from ftengine.compat import FastLanguageModel

    model = tiny("llama").train()
    ids, mask = left_padded()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, use_cache=True,
                              temperature=1.5, min_p=0.1, pad_token_id=0, eos_token_id=None)
    calls = []
    real_decode = static_decode.decode
    monkeypatch.setattr(static_decode, "decode", lambda *a, **k: calls.append(k) or real_decode(*a, **k))
    FastLanguageModel.for_inference(model)
    FastLanguageModel.for_inference(model)  # a second call routes once
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, use_cache=True, temperature=1.5,
                         min_p=0.1, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, expected) and len(calls) == 1 and not calls[0]["sampler"].do_sample
