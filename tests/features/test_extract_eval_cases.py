"""franca.features as the evaluation protocols use it (moved from the checks of the deleted franca.eval.features): a
DataLoader over a data set with unreadable files, labels kept, and the CLS of several blocks next to the pooled
tokens, each against the backbone computed block by block."""

from __future__ import annotations

import torch

from franca.data.images import collate_skip_none
from franca.features import extract_features


class _TinyImages(torch.utils.data.Dataset):
    """Random 16x16 images labelled index % 2; index 3 plays an unreadable file (None)."""

    def __init__(self, count: int = 7) -> None:
        self.images = torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return None if index == 3 else (self.images[index], index % 2)


def test_loader_features_match_the_backbone_outputs_and_count_the_unreadable_file():
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    dataset = _TinyImages()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_skip_none)
    features = extract_features(model, loader, ("cls", "cls_blocks", "avgpool"), n_blocks=2, progress=False)
    kept = [i for i in range(len(dataset)) if i != 3]
    assert features.num_skipped == 1 and features.targets.tolist() == [i % 2 for i in kept]
    assert features.targets.dtype == torch.int64
    images = dataset.images[kept]
    with torch.no_grad():
        out = model.forward_features(images)
        tokens = model.prepare_tokens_with_masks(images)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        second_last_cls = model.norm(tokens)[:, 0]
    width = model.embed_dim
    assert features.cls_blocks.shape == (6, 2 * width)
    assert torch.allclose(features.cls, out["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(features.cls_blocks[:, width:], out["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(features.cls_blocks[:, :width], second_last_cls, atol=1e-5)
    assert torch.allclose(features["avgpool"], out["x_norm_patchtokens"].mean(dim=1), atol=1e-5)


def test_one_block_stack_is_the_cls_token():
    """With n_blocks = 1 the block stack is the last block's CLS (what ``cls1`` of the linear probe reads)."""
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    features = extract_features(model, [(images, torch.arange(4))], ("cls_concat", "pooled"), progress=False)
    with torch.no_grad():
        expected = model.forward_features(images)["x_norm_clstoken"]
    assert torch.allclose(features.cls_blocks, expected, atol=1e-5) and features.cls is None
