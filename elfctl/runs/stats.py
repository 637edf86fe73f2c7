"""Statistics over repeated runs (seeds): the mean and its standard error.

The paper reports Gen PPL as mean +- standard error over 6 seeds; the standard error is
the sample standard deviation (n - 1 in the denominator) over sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is 0.0 for a single value."""
    if not values:
        raise ValueError("mean_stderr needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
