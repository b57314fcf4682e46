"""benchmarks.pixel_cues: the classes' brightness inside the fundus, measured and put in place."""

import numpy as np
import pytest
import torch

from benchmarks.pixel_cues import BORDER, class_offsets, with_offsets


def fundus(levels: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One 8x8 image per level: a black border (-1) around a 4x4 fundus at that level."""
    images = torch.full((len(levels), 1, 8, 8), -1.0)
    for i, level in enumerate(levels):
        images[i, :, 2:6, 2:6] = level
    return images, torch.tensor([0, 0, 1, 1])


def test_offsets_are_the_classes_mean_brightness_inside_the_fundus_minus_the_overall_mean():
    images, labels = fundus([0.1, 0.3, -0.2, -0.4])
    # The border would pull every mean down by the same share; only the fundus counts.
    assert class_offsets(images, labels, 2) == pytest.approx([0.25, -0.25])


def test_with_offsets_puts_the_given_offsets_in_place_and_leaves_the_border_black():
    images, labels = fundus([0.1, 0.3, -0.2, -0.4])
    shifted, same_labels = with_offsets((images, labels), np.array([-0.1, 0.1]))
    assert class_offsets(shifted, same_labels, 2) == pytest.approx([-0.1, 0.1])
    assert torch.equal(shifted[images <= BORDER], images[images <= BORDER])
    assert torch.equal(same_labels, labels)
