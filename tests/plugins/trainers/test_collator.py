"""The pad collator's batches from the row forms ``datasets`` yields: Python lists, numpy arrays, tensors."""

import numpy as np
import torch

from ftengine.plugins.trainers.collator import PadCollator
from ftengine.plugins.trainers.collator import long_tensor


def test_ids_convert_to_int64_as_torch_converts_them():
    ids = [0, 5, -100, 151_935]
    expected = torch.as_tensor(ids, dtype=torch.long)
    for form in (ids, np.array(ids, dtype=np.int32), np.array(ids), torch.tensor(ids, dtype=torch.int32)):
        got = long_tensor(form)
        assert got.dtype == torch.long and torch.equal(got, expected)
    assert long_tensor([2**40]).item() == 2**40


def test_rows_as_lists_or_arrays_give_the_same_batch():
    rows = [{"input_ids": [3, 4, 5], "labels": [-100, 4, 5], "position_ids": [0, 1, 0]},
            {"input_ids": [7], "labels": [7], "position_ids": [0]}]
    as_arrays = [{k: np.asarray(v) for k, v in row.items()} for row in rows]
    collate = PadCollator(pad_token_id=1)
    lists, arrays = collate(rows), collate(as_arrays)
    assert lists.keys() == arrays.keys() == {"input_ids", "labels", "position_ids"}
    assert all(torch.equal(lists[k], arrays[k]) for k in lists)
    assert lists["input_ids"].tolist() == [[3, 4, 5], [7, 1, 1]]
    assert lists["labels"].tolist() == [[-100, 4, 5], [7, -100, -100]]
    assert lists["position_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
