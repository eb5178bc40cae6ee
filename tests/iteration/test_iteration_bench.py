"""benchmarks/iteration.py's in-process half (RPC count and shard balance) runs and measures
what its report says; the local-stack half runs in `make bench`."""

from __future__ import annotations

from benchmarks import iteration as bench


def test_rpcs_per_1000_entities_and_shard_balance_are_measured():
    rpcs, loop_rpcs, balance = bench._rpcs_and_balance(400)
    # 400 entities over 8 shards of one batch each: per batch a query and a transaction, per
    # shard task its spilled payload; the loop only pages through the query.
    assert 0 < loop_rpcs < 20 < rpcs < 1000
    assert balance == {"__scatter__": (0, None), "keys": (400, 1.0)}
