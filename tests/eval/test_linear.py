"""Linear probe: input composition, held-out split, the SGD/cosine update, separable and random-label data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from franca.core.errors import ConfigError
from franca.eval.linear import (
    LinearProbeTrainer,
    holdout_split,
    linear_input,
    parse_feature_set,
    train_linear_probe,
)

D = 8


def make_base(labels, generator, separable=True, num_blocks=2, num_classes=4):
    """Base features as extracted: cls_concat [N, num_blocks*D] (oldest block first) and avgpool [N, D]."""
    n = labels.numel()
    cls_concat = torch.randn(n, num_blocks * D, generator=generator)
    if separable:
        means = 3.0 * torch.eye(num_classes, D)
        cls_concat[:, -D:] = means[labels] + 0.3 * torch.randn(n, D, generator=generator)
    return {"cls_concat": cls_concat, "avgpool": torch.randn(n, D, generator=generator)}


def test_feature_set_names_and_composition():
    assert parse_feature_set("cls1") == (1, False)
    assert parse_feature_set("cls4+avgpool") == (4, True)
    with pytest.raises(ConfigError):
        parse_feature_set("avgpool")
    blocks = [torch.full((3, D), float(i)) for i in range(4)]  # block i filled with i, oldest first
    base = {"cls_concat": torch.cat(blocks, dim=1), "avgpool": torch.full((3, D), 9.0)}
    assert torch.equal(linear_input(base, "cls1", D), blocks[3])
    assert torch.equal(linear_input(base, "cls2", D), torch.cat(blocks[2:], dim=1))
    assert torch.equal(linear_input(base, "cls4+avgpool", D), torch.cat([*blocks, base["avgpool"]], dim=1))
    with pytest.raises(ConfigError):
        linear_input(base, "cls5", D)


def test_holdout_split_is_disjoint_stratified_and_seeded():
    labels = torch.arange(5).repeat_interleave(20)
    train_rows, held_rows = holdout_split(labels, 0.1, seed=0)
    assert set(train_rows.tolist()).isdisjoint(held_rows.tolist())
    assert sorted(train_rows.tolist() + held_rows.tolist()) == list(range(100))
    assert torch.bincount(labels[held_rows], minlength=5).tolist() == [2, 2, 2, 2, 2]
    again_rows, again_held = holdout_split(labels, 0.1, seed=0)
    assert torch.equal(held_rows, again_held) and torch.equal(train_rows, again_rows)
    assert not torch.equal(held_rows, holdout_split(labels, 0.1, seed=1)[1])
    assert holdout_split(labels, 0.0)[1].numel() == 0


def test_trainer_matches_torch_sgd_with_cosine_schedule():
    torch.manual_seed(0)
    steps, lrs = 6, (0.5, 0.05)
    trainer = LinearProbeTrainer(
        ["cls1"], D, lrs, 3, batch_size=512, total_steps=steps, device=torch.device("cpu")
    )
    heads = copy.deepcopy(trainer.heads)
    groups = [
        {"params": list(heads.heads[s["name"]].parameters()), "lr": s["scaled_lr"]} for s in heads.specs
    ]
    assert [g["lr"] for g in groups] == [lr * 512 / 256 for lr in lrs]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        base = {"cls_concat": torch.randn(16, D, generator=gen), "avgpool": torch.zeros(16, D)}
        labels = torch.randint(0, 3, (16,), generator=gen)
        trainer.step(base, labels)
        logits = heads({"cls1": base["cls_concat"]})
        loss = sum(F.cross_entropy(value, labels) for value in logits.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    for ours, reference in zip(trainer.heads.parameters(), heads.parameters()):
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_separable_features_reach_full_accuracy():
    gen = torch.Generator().manual_seed(2)
    train_labels = torch.arange(4).repeat(60)
    val_labels = torch.arange(4).repeat(25)
    lrs = (1e-4, 1e-2, 1e-1)
    results = train_linear_probe(
        make_base(train_labels, gen),
        train_labels,
        make_base(val_labels, gen),
        val_labels,
        feature_sets=("cls1", "cls2+avgpool"),
        learning_rates=lrs,
        epochs=8,
        batch_size=32,
        seed=0,
    )
    assert results["top1"] == 100.0 and results["top5"] == 100.0
    assert results["best"]["feature_set"] in ("cls1", "cls2+avgpool")
    assert results["best"]["lr"] in lrs
    assert len(results["heads"]) == 6
    assert results["num_train"] == 216 and results["num_holdout"] == 24 and results["num_val"] == 100
    best_row = max(results["heads"], key=lambda row: row["selection_top1"])
    assert results["best"]["selection_top1"] == best_row["selection_top1"]


def test_random_labels_give_chance_accuracy():
    gen = torch.Generator().manual_seed(3)
    train_labels = torch.randint(0, 4, (240,), generator=gen)
    val_labels = torch.randint(0, 4, (400,), generator=gen)
    results = train_linear_probe(
        make_base(train_labels, gen, separable=False),
        train_labels,
        make_base(val_labels, gen, separable=False),
        val_labels,
        feature_sets=("cls1",),
        learning_rates=(1e-3, 1e-1),
        epochs=5,
        batch_size=32,
        num_classes=4,
    )
    assert 15.0 < results["top1"] < 35.0  # chance is 25%


def test_holdout_zero_selects_on_val():
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(4).repeat(10)
    results = train_linear_probe(
        make_base(labels, gen),
        labels,
        make_base(labels, gen),
        labels,
        learning_rates=(0.1,),
        epochs=2,
        batch_size=16,
        holdout_fraction=0.0,
    )
    assert results["selected_on"] == "val" and results["num_holdout"] == 0 and results["num_train"] == 40


class _TinyImages(torch.utils.data.Dataset):
    """Random 16x16 images with labels; index 3 plays an unreadable file (None)."""

    def __init__(self, count: int = 7) -> None:
        self.images = torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return None if index == 3 else (self.images[index], index % 2)


def test_extracted_features_match_the_backbone_outputs():
    from franca.eval.common import make_loader
    from franca.eval.features import extract_features
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    dataset = _TinyImages()
    result = extract_features(
        model,
        make_loader(dataset, batch_size=3),
        "cpu",
        ("cls", "cls_concat", "avgpool"),
        n_last_blocks=2,
        progress=False,
    )
    kept = [i for i in range(len(dataset)) if i != 3]
    assert result.num_skipped == 1 and result.labels.tolist() == [i % 2 for i in kept]
    images = dataset.images[kept]
    with torch.no_grad():
        out = model.forward_features(images)
        tokens = model.prepare_tokens_with_masks(images)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        second_last_cls = model.norm(tokens)[:, 0]
    width = model.embed_dim
    assert result.features["cls_concat"].shape == (6, 2 * width)
    assert torch.allclose(result.features["cls"], out["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(result.features["cls_concat"][:, width:], out["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(result.features["cls_concat"][:, :width], second_last_cls, atol=1e-5)
    assert torch.allclose(result.features["avgpool"], out["x_norm_patchtokens"].mean(dim=1), atol=1e-5)
