import pytest

from spd_lightning.core.stats import wilson_interval


def test_wilson_interval_matches_published_values():
    # 32/64, the real pair's share of solved GSM8K train problems: 38.1% to 61.9%.
    low, high = wilson_interval(32, 64)
    assert (round(low, 3), round(high, 3)) == (0.381, 0.619)


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 7)])
def test_wilson_interval_stays_in_range_and_contains_the_estimate(k, n):
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert high - low > 0.1  # ten trials cannot pin a proportion down


def test_no_trials_is_the_whole_range():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_is_one_without_discordant_pairs_and_small_when_one_sided():
    from spd_lightning.core.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert abs(mcnemar_exact(0, 6) - 2 / 64) < 1e-12  # all six discordant pairs one way
    assert mcnemar_exact(1, 9) < 0.05 < mcnemar_exact(3, 7)
