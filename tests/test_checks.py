import pytest

from labs_lib.checks import check


def test_check(capsys):
    assert check("x", 16.0, 16) is True
    assert "✅" in capsys.readouterr().out
    assert check("x", None, 16, hint="sum the bytes") is False
    assert "not answered" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="sum the bytes"):
        check("x", 12, 16, hint="sum the bytes")
    assert check("name", "gloo", "gloo")
