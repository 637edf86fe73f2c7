import math

import pytest

from elfctl.runs import mean_stderr


def test_mean_stderr_matches_a_hand_computation():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, se = sqrt(14/3 / 4)
    mean, se = mean_stderr([1.0, 2.0, 3.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(14 / 12))


def test_mean_stderr_of_one_value_has_no_error():
    assert mean_stderr([24.1]) == (24.1, 0.0)


def test_mean_stderr_refuses_no_values():
    with pytest.raises(ValueError):
        mean_stderr([])
