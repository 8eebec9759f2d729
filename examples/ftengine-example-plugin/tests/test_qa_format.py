import pytest
from ftengine_example_plugin import QAFormat

from ftengine.core.plugins import get_registry
from ftengine.plugin import RowError


def test_is_installed():
    assert isinstance(get_registry("formats")["qa"], QAFormat)


def test_convert():
    sample = QAFormat().convert({"question": "Why?", "answer": "Because.", "context": "Ctx"})
    assert sample.messages == [{"role": "user", "content": "Ctx\n\nWhy?"}, {"role": "assistant", "content": "Because."}]


def test_bad_row():
    with pytest.raises(RowError) as err:
        QAFormat().convert({"question": "Why?", "answer": 3})
    assert err.value.field == "answer"
