"""The training data wrappers: per-sample seeding of the multi-crop augmentation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from franca.train.data import SeededSample, derived_seed


class RandomCrops(Dataset):
    """A data set whose 'augmentation' draws from torch's global generator, as the multi-crop transform does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3) + index, index


def test_seeded_sample_is_a_function_of_the_position_and_leaves_the_global_generator_alone() -> None:
    dataset = SeededSample(RandomCrops(), seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    crops, position = dataset[(5, 2)]
    assert position == 5
    assert torch.equal(torch.get_rng_state(), state)  # the process's own stream is untouched
    # the reference: seeding everything with torch.manual_seed(derived seed), then drawing
    torch.manual_seed(derived_seed(7, "sample", 5))
    assert torch.equal(crops, torch.rand(3) + 2)
    torch.manual_seed(999)  # any other global state gives the same sample
    assert torch.equal(dataset[(5, 2)][0], crops)
    assert not torch.equal(dataset[(6, 2)][0], crops)  # another position, other crops
