"""Learning-rate schedules against their formulas."""

import math

import pytest

from nmt.train import cosine_lr, inverse_sqrt_lr, linear_lr


def test_inverse_sqrt_warms_up_linearly_then_decays_as_one_over_root_step():
    assert inverse_sqrt_lr(50, 1e-3, 100) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(100, 1e-3, 100) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(400, 1e-3, 100) == pytest.approx(1e-3 * math.sqrt(100 / 400))


def test_cosine_warms_up_and_reaches_zero_when_the_budget_is_spent():
    assert cosine_lr(10, 1e-3, 100, 0.0) == pytest.approx(1e-4)
    assert cosine_lr(100, 1e-3, 100, 0.5) == pytest.approx(5e-4)
    assert cosine_lr(100, 1e-3, 100, 1.0) == pytest.approx(0.0, abs=1e-12)
    rates = [cosine_lr(200, 1e-3, 100, f / 10) for f in range(11)]
    assert rates == sorted(rates, reverse=True)


def test_linear_warms_up_then_falls_in_a_straight_line_to_zero():
    assert linear_lr(10, 1e-3, 100, 0.0) == pytest.approx(1e-4)
    assert linear_lr(100, 1e-3, 100, 0.25) == pytest.approx(7.5e-4)
    assert linear_lr(500, 1e-3, 100, 0.8) == pytest.approx(2e-4)
    assert linear_lr(500, 1e-3, 100, 1.2) == 0.0
    assert linear_lr(50, 1e-3, 100, 0.6) == pytest.approx(5e-4 * 0.4)  # a warm-up longer than the budget's share
