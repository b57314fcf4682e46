"""benchmarks.dp_signal's estimate of the signal in a DP step."""

import math

import pytest
import torch

from benchmarks.dp_signal import snr, step_signal


def test_notes_that_disagree_carry_no_signal_and_notes_that_agree_carry_their_norm():
    opposite = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    assert step_signal(opposite, bound=1.0) == (0.0, 1.0)
    same = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.3, 0.4]])
    signal, clipped = step_signal(same, bound=1.0)
    assert signal == pytest.approx(0.5) and clipped == 0.0
    signal, clipped = step_signal(same, bound=0.1)
    assert signal == pytest.approx(0.1) and clipped == 1.0


def test_a_run_adds_signal_linearly_and_noise_as_the_square_root():
    step, run = snr(signal=0.1, bound=0.1, batch=16, sigma=0.5, d=10_000, steps=25)
    assert step == pytest.approx(16 * 0.1 / (0.5 * 0.1 * 100))
    assert run == pytest.approx(step * math.sqrt(25))
