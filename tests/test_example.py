"""The example training script runs as a user would run it, and trains."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def test_plain_training_loop_with_the_pretrained_optimizer_learns(seed):
    pytest.importorskip("sklearn")
    import train_digits

    (result,) = train_digits.main(["--steps", "60", "--seed", str(seed % 1000)])
    assert result["last_loss"] < 0.5 * result["first_loss"], result
    assert result["test_accuracy"] > 0.6, result  # chance is 0.1
    assert result["skipped_coordinates"] == 0
