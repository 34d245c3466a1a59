"""franca.features: the tokens of the one extractor against the backbone's own outputs, computed by hand."""

from __future__ import annotations

import pytest
import torch

from franca.core.errors import ConfigError, DataError
from franca.data.images import Batch
from franca.features import TensorImages, canonical_token, extract_features, forward_tokens, iterate_features


@pytest.fixture(scope="module")
def model():
    from franca.models import vit_tiny

    torch.manual_seed(0)
    return vit_tiny(patch_size=8, img_size=32, num_register_tokens=2).eval()


def test_tokens_equal_the_backbone_outputs(model):
    images = torch.randn(3, 3, 32, 24)
    with torch.no_grad():
        out = model.forward_features(images)
        tokens = forward_tokens(model, images, ["cls", "registers", "patch", "mean"])
    assert torch.equal(tokens["cls"], out["x_norm_clstoken"])
    assert torch.equal(tokens["registers"], out["x_norm_regtokens"])
    patch = out["x_norm_patchtokens"]  # [3, 4*3, D], row-major over a 4 x 3 grid
    assert tokens["patch"].shape == (3, 4, 3, patch.shape[-1])
    assert torch.equal(tokens["patch"][:, 1, 2], patch[:, 1 * 3 + 2])
    assert torch.allclose(tokens["pooled"], patch.sum(dim=1) / 12, atol=1e-6)


def test_several_blocks_concatenate_oldest_first(model):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = forward_tokens(model, images, ["cls_concat", "patch_blocks", "patch"], n_blocks=2)
        # by hand: run the blocks, normalise the outputs of the last two
        x = model.prepare_tokens_with_masks(images)
        outputs = []
        for block in model.blocks:
            x = block(x)
            outputs.append(model.norm(x))
    first = 1 + model.num_register_tokens
    expected_cls = torch.cat([outputs[-2][:, 0], outputs[-1][:, 0]], dim=-1)
    expected_patch = torch.cat([outputs[-2][:, first:], outputs[-1][:, first:]], dim=-1).reshape(2, 4, 4, -1)
    assert torch.allclose(tokens["cls_blocks"], expected_cls, atol=1e-5)
    assert torch.allclose(tokens["patch_blocks"], expected_patch, atol=1e-5)
    assert torch.allclose(tokens["patch"], outputs[-1][:, first:].reshape(2, 4, 4, -1), atol=1e-5)


def test_uint8_images_are_scaled_and_imagenet_normalised(model):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    by_hand = (images.float() / 255.0 - mean) / std
    with torch.no_grad():
        expected = model.forward_features(by_hand)["x_norm_clstoken"]
    assert torch.allclose(forward_tokens(model, images, ["cls"])["cls"], expected, atol=1e-5)


def test_extract_collects_targets_counts_skips_and_restores_training_mode(model):
    images = torch.randn(5, 3, 32, 32)
    batches = [
        Batch(inputs=images[:2], targets=torch.tensor([7, 8]), num_skipped=1),
        Batch(inputs=None, targets=None, num_skipped=2),
        Batch(inputs=images[2:], targets=torch.tensor([9, 10, 11]), num_skipped=0),
    ]
    model.train()
    features = extract_features(model, batches, ["cls", "avgpool"], progress=False)
    assert model.training
    assert features.targets.tolist() == [7, 8, 9, 10, 11]
    assert features.num_skipped == 3 and len(features) == 5
    with torch.no_grad():
        expected = model.eval().forward_features(images)["x_norm_clstoken"]
    assert torch.allclose(features["cls"], expected, atol=1e-5)
    assert features.patch is None and features.grid is None
    with pytest.raises(ConfigError, match="no 'patch'"):
        features["patch"]
    picked = features.subset([4, 0])
    assert picked.targets.tolist() == [11, 7] and torch.equal(picked.pooled[1], features.pooled[0])


def test_masks_are_stored_compactly_and_indices_stand_in_for_missing_targets(model):
    masks = torch.tensor([[[0, 255], [3, 1]]]).repeat(3, 1, 1)
    features = extract_features(model, [(torch.randn(3, 3, 32, 32), masks)], ["patch"], progress=False)
    assert features.targets.dtype == torch.uint8 and torch.equal(features.targets.long(), masks)
    assert features.grid == (4, 4)
    indexed = extract_features(
        model, TensorImages(torch.randn(5, 3, 32, 32), batch_size=2), ["cls"], progress=False
    )
    assert indexed.targets.tolist() == [0, 1, 2, 3, 4]


def test_iterate_streams_batches_on_the_device(model):
    loader = TensorImages(torch.randn(5, 3, 32, 32), batch_size=2)
    sizes = [
        tokens["patch"].shape[0] for tokens, _ in iterate_features(model, loader, ["patch"], progress=False)
    ]
    assert sizes == [2, 2, 1]


def test_errors_name_what_to_change(model):
    with pytest.raises(ConfigError, match="unknown token kind 'logits'"):
        canonical_token("logits")
    with pytest.raises(ConfigError, match="patch size 8"):
        forward_tokens(model, torch.randn(1, 3, 30, 32), ["cls"])
    with pytest.raises(ConfigError, match="no RASA head"):
        forward_tokens(model, torch.randn(1, 3, 32, 32), ["patch_rasa"])
    with pytest.raises(DataError, match="no readable image"):
        extract_features(model, [Batch(inputs=None, targets=None, num_skipped=4)], progress=False)


def test_rasa_tokens_apply_the_attached_projection():
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    dim = model.embed_dim
    direction = torch.nn.functional.normalize(torch.randn(1, dim), dim=-1)
    model.set_rasa(torch.eye(dim) - direction.T @ direction)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = forward_tokens(model, images, ["patch", "patch_rasa", "avgpool_rasa"])
    by_hand = tokens["patch"] - (tokens["patch"] @ direction.T) @ direction
    assert torch.allclose(tokens["patch_rasa"], by_hand, atol=1e-5)
    assert torch.allclose(tokens["pooled_rasa"], by_hand.mean(dim=(1, 2)), atol=1e-5)


def test_dict_batches_and_batches_of_several_image_sizes(model):
    images = torch.randn(3, 3, 32, 32)
    batches = [{"image": images[:2], "label": torch.tensor([4, 5])}, {"images": images[2:]}]
    features = extract_features(model, batches, ["cls"], progress=False)
    with torch.no_grad():
        expected = model.forward_features(images)["x_norm_clstoken"]
    assert torch.allclose(features.cls, expected, atol=1e-5)
    assert features.targets.tolist() == [4, 5, 2]  # the last batch has no labels: its running image index
    with pytest.raises(DataError, match="dict"):
        extract_features(model, [{"pixels": images}], progress=False)
    mixed = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 24, 32)]
    with pytest.raises(DataError, match=r"patch tokens of different shapes \(3, 4, 192\) and \(4, 4, 192\)"):
        extract_features(model, mixed, ["cls", "patch"], progress=False)


def test_several_blocks_stay_several_when_registers_are_asked_for_too(model):
    """The registers need a forward_features pass; it must not replace the blocks' tokens with the last block's."""
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        alone = forward_tokens(model, images, ["cls_blocks", "patch_blocks"], n_blocks=2)
        with_registers = forward_tokens(
            model, images, ["cls_blocks", "patch_blocks", "registers"], n_blocks=2
        )
    assert alone["cls_blocks"].shape[-1] == 2 * model.embed_dim
    assert torch.equal(with_registers["cls_blocks"], alone["cls_blocks"])
    assert torch.equal(with_registers["patch_blocks"], alone["patch_blocks"])
