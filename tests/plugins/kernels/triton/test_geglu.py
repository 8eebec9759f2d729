import functools

import pytest
import torch

from ftengine.plugins.kernels import reference
from ftengine.plugins.kernels.triton.geglu import geglu

from ..helpers import DTYPES
from .test_swiglu import compare_gated


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("intermediates", [False, True])
def test_geglu_matches_reference(dtype, approximate, intermediates):
    op = functools.partial(geglu, approximate=approximate)
    ref = functools.partial(reference.geglu, approximate=approximate)
    compare_gated(op, ref, (3, 37, 129), dtype, intermediates)


def test_geglu_rejects_unknown_approximation():
    x = torch.randn(4)
    with pytest.raises(ValueError, match="approximate"):
        geglu(x, x, approximate="sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_real_shapes(approximate):
    op = functools.partial(geglu, approximate=approximate)
    ref = functools.partial(reference.geglu, approximate=approximate)
    compare_gated(op, ref, (8192, 14336), torch.bfloat16, True)
