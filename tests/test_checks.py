import pytest

from labs_lib.labs.checks import check


def test_check(capsys):
    assert check("x", 16.0, 16) is True
    assert "✅" in capsys.readouterr().out
    assert check("x", None, 16, hint="sum the bytes") is False
    assert "not answered" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="sum the bytes"):
        check("x", 12, 16, hint="sum the bytes")
    assert check("name", "gloo", "gloo")


def test_simulate_ranks_all_reduce_sums_over_ranks():
    import torch

    from labs_lib.labs.checks import simulate_ranks

    x = torch.arange(12.0).view(3, 4)
    outs = simulate_ranks(lambda rank, all_reduce: all_reduce(x.chunk(2, dim=1)[rank].sum(1)) * 1, 2)
    assert all(torch.equal(o, x.sum(1)) for o in outs)
    # two collectives in a row, and ranks that return without communicating
    assert simulate_ranks(lambda r, ar: ar(ar(torch.tensor(r + 1.0))), 3) == [torch.tensor(18.0)] * 3
    assert simulate_ranks(lambda r, ar: None, 2) == [None, None]


def test_simulate_ranks_reports_errors_and_mismatched_collectives():
    import torch

    from labs_lib.labs.checks import simulate_ranks

    def fails_on_rank_1(rank, all_reduce):
        if rank == 1:
            raise ValueError("rank 1 broke")
        return all_reduce(torch.ones(1))

    with pytest.raises(ValueError, match="rank 1 broke"):
        simulate_ranks(fails_on_rank_1, 2)
    with pytest.raises(RuntimeError, match="same collective"):
        simulate_ranks(lambda r, ar: ar(torch.ones(1)) if r == 0 else None, 2, timeout=0.5)
