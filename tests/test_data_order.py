"""bench/data_order.py at toy size: its synthetic folder and the numbers it reports."""
import math

import pytest

import data


def test_bench_data_measures_the_three_orders(tmp_path, capsys):
    """bench/data_order.py at toy size: its synthetic folder is Pick-a-Pic's layout, and the numbers it reports are the
    orders' properties (one decode per row group for block and window; micro-batches from one group for block)."""
    from bench import data_order as bench_data
    bench_data.make(str(tmp_path), shards=2, groups=3, rows=8, size=32)
    pairs = data.Preferences(str(tmp_path))
    assert len(pairs) == 48 and len(pairs.files) == 2 and "2 train shard(s)" in pairs.read
    for order in ("block", "window", "uniform"):
        rate, decodes, micro, step = bench_data.measure(str(tmp_path), order, 48, 32)
        assert rate > 0 and math.isnan(step)  # fewer than 2048 pairs: no whole step
        if order != "uniform":
            assert decodes == pytest.approx(100 * 6 / 48)  # each of the 6 row groups once in an epoch
        if order == "block":
            assert micro <= 2.0
    assert micro > 2.0  # uniform: a micro-batch of 16 spans many of the 6 groups
    capsys.readouterr()
    bench_data.main([str(tmp_path), "--pairs", "8", "--resolution", "32"])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["order", "pairs/s", "decodes/100", "pairs", "groups/16", "pairs", "groups/2048", "pairs"]
    assert [line.split()[0] for line in out[2:5]] == ["block", "window", "uniform"]
