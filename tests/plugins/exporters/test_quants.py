"""Our GGUF quantizers: bytes decodable by gguf-py, errors at or below the reference algorithms'.

The legacy types must equal gguf-py's reference bytes; the K-quant and IQ types are compared with
ggml's own quantizer (the ``ggml_quantize`` fixture, llama-cpp-python's library), with and without an
importance matrix. Whole-file exports against llama.cpp are in ``test_gguf_llamacpp.py``.
"""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from ftengine.core.errors import ExportError
from ftengine.plugins.exporters.gguf import mixes
from ftengine.plugins.exporters.gguf.quants import quantize


def _matrix(kind: str, rows: int = 128, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(rows, cols, generator=generator)
    if kind == "student_t":  # heavy tails: a few outliers per block dominate its range
        torch.manual_seed(seed)
        return torch.distributions.StudentT(3.0).sample((rows, cols))
    if kind == "weights":  # bf16 weights of a real model's scale, with per-row magnitude differences
        scale = torch.rand(rows, 1, generator=generator) * 0.05 + 0.005
        return (torch.randn(rows, cols, generator=generator) * scale).to(torch.bfloat16)
    raise ValueError(kind)


def _roundtrip(x: torch.Tensor, qtype: T) -> torch.Tensor:
    data = quantize(x, qtype)
    assert data.dtype == np.uint8
    assert data.shape == (x.shape[0], x.shape[1] // GGML_QUANT_SIZES[qtype][0] * GGML_QUANT_SIZES[qtype][1])
    return torch.from_numpy(gguf_quants.dequantize(data, qtype)).reshape(x.shape)


def _relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.float()
    return float(((y - x) ** 2).sum() / (x**2).sum())


def _naive_affine(x: torch.Tensor, nmax: int, sub: int) -> torch.Tensor:
    """Min-max affine quantization per sub-block with exact float scales: no search."""
    blocks = x.float().reshape(-1, sub)
    lo = blocks.amin(-1, keepdim=True).clamp(max=0)
    step = ((blocks.amax(-1, keepdim=True) - lo) / nmax).clamp(min=1e-30)
    return (torch.round((blocks - lo) / step).clamp(0, nmax) * step + lo).reshape(x.shape)


def _naive_symmetric(x: torch.Tensor, nmax: int, sub: int) -> torch.Tensor:
    """Largest magnitude -> -nmax per sub-block with exact float scales: no search."""
    blocks = x.float().reshape(-1, sub)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True))
    step = torch.where(peak == 0, torch.ones_like(peak), peak / -nmax)
    return (torch.round(blocks / step).clamp(-nmax, nmax - 1) * step).reshape(x.shape)


NAIVE = {
    T.Q4_K: lambda x: _naive_affine(x, 15, 32),
    T.Q5_K: lambda x: _naive_affine(x, 31, 32),
    T.Q6_K: lambda x: _naive_symmetric(x, 32, 16),
}


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
@pytest.mark.parametrize("kind", ["normal", "student_t", "weights"])
def test_legacy_types_match_ggml_reference_bytes(qtype, kind):
    x = _matrix(kind, rows=64, cols=512)
    x[3] = 0  # an all-zero row: scale 0, no division by zero
    ours = quantize(x, qtype)
    reference = gguf_quants.quantize(x.float().numpy(), qtype)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
@pytest.mark.parametrize("kind", ["normal", "student_t", "weights"])
def test_k_quants_beat_naive_min_max(qtype, kind):
    x = _matrix(kind)
    ours = _relative_error(x, _roundtrip(x, qtype))
    naive = _relative_error(x, NAIVE[qtype](x))
    # the naive quantizer keeps float scales; ours stores 6-/8-bit scales yet must still do better
    assert ours < naive, (qtype.name, kind, ours, naive)


WEIGHTED_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def _importance(cols: int, seed: int = 3) -> torch.Tensor:
    """Mean squared activations of a real model's scale: a few columns far above the rest."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(cols, generator=generator) ** 4 * 10 + 1e-3


def _weighted_error(x: torch.Tensor, data: np.ndarray, qtype: T, importance: torch.Tensor) -> float:
    y = torch.from_numpy(gguf_quants.dequantize(data, qtype)).reshape(x.shape)
    return float((((y - x.float()) ** 2) * importance).sum() / ((x.float() ** 2) * importance).sum())


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES)
@pytest.mark.parametrize("kind", ["normal", "student_t", "weights"])
def test_error_at_most_llama_cpp_quantizer(ggml_quantize, qtype, kind):
    """Our bytes are as close to the weights as ggml's, without and with an importance matrix (then
    in the importance-weighted error both minimise)."""
    x = _matrix(kind, rows=32)
    plain = torch.ones(x.shape[1])
    ours = _weighted_error(x, quantize(x, qtype), qtype, plain)
    theirs = _weighted_error(x, ggml_quantize(x, qtype), qtype, plain)
    assert ours <= 1.01 * theirs, (ours, theirs)
    importance = _importance(x.shape[1])
    ours = _weighted_error(x, quantize(x, qtype, importance=importance), qtype, importance)
    theirs = _weighted_error(x, ggml_quantize(x, qtype, importance), qtype, importance)
    assert ours <= 1.02 * theirs, (ours, theirs)


@pytest.mark.parametrize("qtype", [T.Q3_K, T.IQ4_NL, T.IQ4_XS])
def test_same_bytes_as_llama_cpp_where_the_search_is_the_same(ggml_quantize, qtype):
    """Q3_K's level-by-level search and the IQ4 table searches are llama.cpp's own: the bytes agree
    except where float summation order breaks a near tie."""
    x = _matrix("normal", rows=64, cols=512, seed=5)
    type_size = GGML_QUANT_SIZES[qtype][1]
    ours = quantize(x, qtype).reshape(-1, type_size)
    theirs = ggml_quantize(x, qtype).reshape(-1, type_size)
    assert (ours == theirs).all(axis=-1).mean() > 0.98


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
@pytest.mark.parametrize("kind", ["normal", "weights"])
def test_legacy_types_with_importance_are_llama_cpps_bytes(ggml_quantize, qtype, kind):
    """With an importance matrix the legacy types run llama.cpp's own weighted search: most blocks get
    the same bytes, the others differ where two grids tie to within float32 summation order (our sums are
    vectorized, ggml's sequential, and how ggml's are rounded depends on how the library was compiled), so the
    weighted error of the whole tensor is ggml's to 0.2%."""
    x = _matrix(kind, rows=64, cols=512, seed=11)
    importance = _importance(x.shape[1])
    type_size = GGML_QUANT_SIZES[qtype][1]
    ours = quantize(x, qtype, importance=importance)
    theirs = ggml_quantize(x, qtype, importance)
    same = (ours.reshape(-1, type_size) == theirs.reshape(-1, type_size)).all(axis=-1).mean()
    assert same > 0.7, same
    ratio = _weighted_error(x, ours, qtype, importance) / _weighted_error(x, theirs, qtype, importance)
    assert abs(ratio - 1) < 2e-3, ratio


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES)
def test_importance_lowers_the_weighted_error(qtype):
    x = _matrix("weights", rows=16)
    importance = _importance(x.shape[1])
    plain = _weighted_error(x, quantize(x, qtype), qtype, importance)
    weighted = _weighted_error(x, quantize(x, qtype, importance=importance), qtype, importance)
    assert weighted < 0.95 * plain, (plain, weighted)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1])
def test_legacy_types_with_importance_degenerate_blocks(qtype):
    """The weighted legacy search on blocks that break naive fits: zeros, constants, an outlier, and
    columns of zero importance (fitted unweighted, not dropped to zero)."""
    x = torch.randn(5, 256)
    x[0] = 0
    x[1] = 0.25
    x[2] = -3.0
    x[3, 7] = 1e4
    importance = torch.rand(256) + 0.5
    importance[64:96] = 0  # a whole block of columns no calibration token reached
    y = torch.from_numpy(gguf_quants.dequantize(quantize(x, qtype, importance=importance), qtype)).reshape(x.shape)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all()
    torch.testing.assert_close(y[1], x[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(y[2], x[2], atol=2e-2, rtol=0)
    assert y[3, 7] == pytest.approx(1e4, rel=1e-2)
    step = x[4, 64:96].abs().max() / 7  # a 4-bit step of that block: the unweighted fit keeps it close
    assert (y[4, 64:96] - x[4, 64:96]).abs().max() <= step


def test_importance_must_match_the_columns():
    with pytest.raises(ValueError, match=r"expected \(512,\)"):
        quantize(torch.randn(2, 512), T.Q4_K, importance=torch.ones(256))


@pytest.mark.parametrize(
    ("qtype", "expected"),
    [(T.Q4_K, 5.2e-3), (T.Q5_K, 1.33e-3), (T.Q6_K, 3.2e-4), (T.Q8_0, 3.0e-5), (T.Q4_0, 7.5e-3)],
)
def test_gaussian_error_is_that_of_the_bit_width(qtype, expected):
    """Relative squared error on N(0, 1): about 4**-bits times a constant; pinned within 10%."""
    x = _matrix("normal", rows=256, cols=1024, seed=1)
    assert _relative_error(x, _roundtrip(x, qtype)) == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize(
    ("qtype", "noise"), [(T.Q2_K, 1.2), (T.Q3_K, 0.6), (T.Q4_K, 0.3), (T.Q5_K, 0.3), (T.Q6_K, 0.3), (T.IQ4_XS, 0.3)]
)
def test_k_quants_degenerate_blocks(qtype, noise):
    x = torch.randn(6, 512)
    x[0] = 0  # all zero
    x[1] = 0.25  # constant positive
    x[2] = -3.0  # constant negative
    x[3, :256] = 1e-20  # below every scale's resolution
    x[4, 7] = 1e4  # one huge outlier
    y = _roundtrip(x, qtype)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all()
    torch.testing.assert_close(y[1], x[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(y[2], x[2], atol=2e-2, rtol=0)
    assert y[4, 7] == pytest.approx(1e4, rel=1e-2)
    torch.testing.assert_close(y[5], x[5], atol=noise, rtol=0)


def test_every_sub_block_position_round_trips():
    """A ramp makes each value distinct: a packing mistake (nibble, high bit, scale index) is off by many steps.

    Each value must come back within one quantization step of its row (the format's offsets are
    non-positive, so an all-positive sub-block spans from 0 to its max).
    """
    row_max = torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    x = torch.linspace(-1, 1, 256 * 4).reshape(4, 256) * row_max
    for qtype, levels in [(T.Q4_K, 15), (T.Q5_K, 31), (T.Q6_K, 32)]:
        error = (_roundtrip(x, qtype) - x).abs()
        assert (error <= row_max / levels).all(), (qtype.name, float((error / row_max).max() * levels))


def test_float_types_and_shapes():
    x = torch.randn(3, 5, 64)
    for qtype, dtype in [(T.F32, np.float32), (T.F16, np.float16)]:
        data = quantize(x, qtype)
        assert data.shape == (3, 5, 64 * np.dtype(dtype).itemsize)
        np.testing.assert_array_equal(data.view(dtype), x.numpy().astype(dtype))
    bf16 = quantize(x, T.BF16).view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(bf16.view(np.float32), x.to(torch.bfloat16).float().numpy())
    assert quantize(x, T.Q8_0).shape == (3, 5, 68)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K])
def test_cuda_quantizers_agree_with_the_cpu(qtype):
    x = _matrix("weights", rows=512, cols=4096)
    on_gpu = quantize(x.cuda(), qtype, torch.device("cuda"))
    on_cpu = quantize(x, qtype, torch.device("cpu"))
    type_size = GGML_QUANT_SIZES[qtype][1]
    same = (on_gpu.reshape(-1, type_size) == on_cpu.reshape(-1, type_size)).all(axis=-1).mean()
    if qtype in (T.Q8_0, T.Q4_0):
        assert same == 1.0
    else:
        # The K-quant scale searches compare sums whose reduction order differs between devices, so
        # near-ties break differently in many blocks; what must agree is the error they reach.
        def error(data):
            return _relative_error(x, torch.from_numpy(gguf_quants.dequantize(data, qtype)).reshape(x.shape))

        assert same > 0.3
        assert error(on_gpu) == pytest.approx(error(on_cpu), rel=2e-3)


def test_row_not_a_multiple_of_the_block_is_refused():
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quantize(torch.randn(2, 320), T.Q4_K)


LLAMA_8B_Q4_K_M_MORE_BITS = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
"""Layers of a 32-layer model whose attn_v / ffn_down llama-quantize Q4_K_M writes as Q6_K."""


def test_q4_k_m_mix_follows_llama_quantize():
    def kind(name, shape=(4096, 4096), tied=False):
        return mixes.tensor_type(name, shape, "q4_k_m", 32, tied)

    assert [i for i in range(32) if kind(f"blk.{i}.attn_v.weight") == T.Q6_K] == LLAMA_8B_Q4_K_M_MORE_BITS
    assert [i for i in range(32) if kind(f"blk.{i}.ffn_down.weight", (4096, 14336)) == T.Q6_K] == (
        LLAMA_8B_Q4_K_M_MORE_BITS
    )
    assert {kind(f"blk.{i}.attn_q.weight") for i in range(32)} == {T.Q4_K}
    assert kind("output.weight", (128256, 4096)) == T.Q6_K
    assert kind("token_embd.weight", (128256, 4096)) == T.Q4_K
    assert kind("token_embd.weight", (128256, 4096), tied=True) == T.Q6_K
    assert kind("blk.0.attn_norm.weight", (4096,)) == T.F32
    assert kind("rope_freqs.weight", (64,)) == T.F32
    assert kind("blk.0.attn_q.bias", (4096,)) == T.F32


def test_mix_fallbacks_for_rows_that_do_not_fit():
    assert mixes.tensor_type("blk.5.attn_q.weight", (64, 320), "q4_k_m", 32, False) == T.Q5_0
    assert mixes.tensor_type("blk.5.attn_q.weight", (64, 320), "q5_k_m", 32, False) == T.Q5_1
    assert mixes.tensor_type("blk.0.attn_v.weight", (64, 320), "q4_k_m", 32, False) == T.Q8_0  # Q6_K -> Q8_0
    assert mixes.tensor_type("output.weight", (99, 64), "q6_k", 2, False) == T.Q8_0
    assert mixes.tensor_type("blk.0.attn_q.weight", (64, 100), "q4_k_m", 2, False) == T.F16
    assert mixes.tensor_type("blk.0.attn_q.weight", (64, 100), "q8_0", 2, False) == T.F16
    assert mixes.tensor_type("blk.0.attn_q.weight", (64, 64), "bf16", 2, False) == T.BF16


def test_q5_k_m_and_q6_k_mixes():
    assert mixes.tensor_type("blk.4.attn_v.weight", (256, 256), "q5_k_m", 32, False) == T.Q5_K
    assert mixes.tensor_type("blk.6.attn_v.weight", (256, 256), "q5_k_m", 32, False) == T.Q6_K
    assert mixes.tensor_type("blk.4.ffn_up.weight", (256, 256), "q6_k", 32, False) == T.Q6_K
    assert mixes.tensor_type("output.weight", (256, 256), "q4_0", 32, False) == T.Q6_K


def test_unknown_quantization_names_the_choices():
    with pytest.raises(ExportError, match="q4_k_m") as info:
        mixes.check_quantization("q3_k_xl")
    assert "q3_k_xl" in str(info.value)
    assert mixes.check_quantization("Q4_K_M") == "q4_k_m"


def test_aliases():
    assert mixes.check_quantization("not_quantized") == "f16"
    assert mixes.check_quantization("fast_quantized") == "q8_0"
    assert mixes.check_quantization("quantized") == "q4_k_m"
    assert mixes.check_quantization("Q4_K") == "q4_k_m"
