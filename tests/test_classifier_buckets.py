"""Length bucketing is a pure function of the token counts; serving must keep input order."""

from __future__ import annotations

import random

import pytest

from pointsman_classifier.buckets import length_buckets


def test_every_row_once_and_short_rows_never_padded_to_long_ones() -> None:
    lengths = [14, 120, 9, 15, 13, 118, 10, 16]
    chunks = length_buckets(lengths, max_rows=64, slack=1.2)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    long_rows = {1, 5}
    for chunk in chunks:
        assert not (set(chunk) & long_rows) or set(chunk) <= long_rows


@pytest.mark.parametrize("seed", range(5))
def test_padding_bound_and_row_cap_hold_on_random_batches(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(3, 30), rng.randint(3, 128)]) for _ in range(300)]
    chunks = length_buckets(lengths, max_rows=32, slack=1.1)
    assert sorted(i for c in chunks for i in c) == list(range(300))
    for chunk in chunks:
        assert len(chunk) <= 32
        if len(chunk) > 1:
            padded = len(chunk) * max(lengths[i] for i in chunk)
            assert padded <= 1.1 * sum(lengths[i] for i in chunk)


def test_equal_lengths_fill_chunks_to_the_cap() -> None:
    assert [len(c) for c in length_buckets([20] * 100, max_rows=40)] == [40, 40, 20]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        length_buckets([1, 2], max_rows=0)
    with pytest.raises(ValueError, match="slack"):
        length_buckets([1, 2], slack=0.9)
    assert length_buckets([]) == []
