"""Linear probe: input composition, held-out split, the SGD/cosine update, separable and random-label data, the typed
settings and result, scoring Features, and the model-level entry (with and without augmentation)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from franca.core.errors import ConfigError
from franca.eval.linear import (
    LinearProbeTrainer,
    LinearSettings,
    evaluate_linear,
    holdout_split,
    linear_input,
    parse_feature_set,
    score_linear,
    train_linear_probe,
)
from franca.features import Features

D = 8


def make_base(labels, generator, separable=True, num_blocks=2, num_classes=4):
    """Base features as extracted: cls_blocks [N, num_blocks*D] (oldest block first) and pooled [N, D]."""
    n = labels.numel()
    cls_blocks = torch.randn(n, num_blocks * D, generator=generator)
    if separable:
        means = 3.0 * torch.eye(num_classes, D)
        cls_blocks[:, -D:] = means[labels] + 0.3 * torch.randn(n, D, generator=generator)
    return {"cls_blocks": cls_blocks, "pooled": torch.randn(n, D, generator=generator)}


def test_feature_set_names_and_composition():
    assert parse_feature_set("cls1") == (1, False)
    assert parse_feature_set("cls4+avgpool") == (4, True)
    with pytest.raises(ConfigError):
        parse_feature_set("avgpool")
    blocks = [torch.full((3, D), float(i)) for i in range(4)]  # block i filled with i, oldest first
    pooled = torch.full((3, D), 9.0)
    base = {"cls_blocks": torch.cat(blocks, dim=1), "pooled": pooled}
    assert torch.equal(linear_input(base, "cls1", D), blocks[3])
    assert torch.equal(linear_input(base, "cls2", D), torch.cat(blocks[2:], dim=1))
    assert torch.equal(linear_input(base, "cls4+avgpool", D), torch.cat([*blocks, pooled], dim=1))
    with pytest.raises(ConfigError):
        linear_input(base, "cls5", D)
    # the older names (what the demo passes) and Features give the same inputs
    older = {"cls_concat": base["cls_blocks"], "avgpool": pooled}
    assert torch.equal(linear_input(older, "cls4+avgpool", D), torch.cat([*blocks, pooled], dim=1))
    features = Features(targets=torch.zeros(3), cls_blocks=base["cls_blocks"], pooled=pooled)
    assert torch.equal(linear_input(features, "cls2+avgpool", D), torch.cat([*blocks[2:], pooled], dim=1))
    # with no block stack, the CLS token is the one block; avgpool needs pooled tokens
    assert torch.equal(linear_input({"cls": blocks[1]}, "cls1", D), blocks[1])
    with pytest.raises(ConfigError, match="pooled"):
        linear_input({"cls": blocks[1]}, "cls1+avgpool", D)


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
        base = {"cls_blocks": torch.randn(16, D, generator=gen), "pooled": torch.zeros(16, D)}
        labels = torch.randint(0, 3, (16,), generator=gen)
        trainer.step(base, labels)
        logits = heads({"cls1": base["cls_blocks"]})
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


def test_older_token_names_give_the_same_probe():
    """The demo passes {"cls_concat", "avgpool"}: the same probe as with the vocabulary names."""
    gen = torch.Generator().manual_seed(6)
    labels = torch.arange(4).repeat(12)
    train, val = make_base(labels, gen), make_base(labels, gen)
    older = [{"cls_concat": base["cls_blocks"], "avgpool": base["pooled"]} for base in (train, val)]
    options = {"feature_sets": ("cls1+avgpool",), "learning_rates": (0.1,), "epochs": 2, "batch_size": 16}
    assert train_linear_probe(older[0], labels, older[1], labels, **options) == train_linear_probe(
        train, labels, val, labels, **options
    )


def test_score_linear_chooses_the_feature_set_that_carries_the_class():
    """The CLS tokens are noise and the pooled tokens separate the classes: every cls1+avgpool head that learns
    reaches 100% and is chosen; the cls1 heads stay near chance."""
    gen = torch.Generator().manual_seed(7)

    def split(labels, skipped):
        pooled = 3.0 * torch.eye(4, D)[labels] + 0.3 * torch.randn(labels.numel(), D, generator=gen)
        noise = torch.randn(labels.numel(), D, generator=gen)
        return Features(targets=labels, cls=noise, cls_blocks=noise, pooled=pooled, num_skipped=skipped)

    train, val = split(torch.arange(4).repeat(50), 3), split(torch.arange(4).repeat(25), 1)
    settings = LinearSettings(("cls1", "cls1+avgpool"), (0.05, 0.5), epochs=6, batch_size=32)
    result = score_linear(train, None, val, None, settings)
    assert result.best.feature_set == "cls1+avgpool" and result.to_dict()["top1"] == 100.0
    assert all(head.val_top1 < 50.0 for head in result.heads if head.feature_set == "cls1")
    assert [head.feature_set for head in result.heads] == ["cls1", "cls1", "cls1+avgpool", "cls1+avgpool"]
    assert (result.num_train, result.num_holdout, result.num_val) == (180, 20, 100)  # 10% of 50 per class
    as_dict = result.to_dict()
    assert list(as_dict)[-3:] == ["augment", "skipped_train", "skipped_val"]
    assert (as_dict["skipped_train"], as_dict["skipped_val"]) == (3, 1)
    assert as_dict["best"] == {
        key: getattr(result.best, key) for key in ("feature_set", "lr", "scaled_lr", "selection_top1")
    }


def test_linear_settings_are_checked_when_built():
    for bad in (
        {"feature_sets": ("avgpool",)},
        {"feature_sets": ()},
        {"learning_rates": ()},
        {"epochs": 0},
        {"batch_size": 0},
        {"holdout_fraction": 1.0},
    ):
        with pytest.raises(ConfigError):
            LinearSettings(**bad)
    assert LinearSettings(feature_sets=("cls1", "cls4+avgpool", "cls2")).n_blocks == 4


class _TinyImages(torch.utils.data.Dataset):
    """Random 16x16 images labelled index % 2 (``targets``, 2 ``classes``); index 3 plays an unreadable file."""

    classes = ("even", "odd")

    def __init__(self, count: int = 10) -> None:
        self.images = torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        self.targets = [index % 2 for index in range(count)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return None if index == 3 else (self.images[index], self.targets[index])


def _blocks_by_hand(model, images):
    """(CLS of the last two blocks, oldest first, [N, 2D]; mean last-block patch token [N, D]), block by block."""
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(images)
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(model.norm(tokens))
    first = 1 + model.num_register_tokens
    return torch.cat([outputs[-2][:, 0], outputs[-1][:, 0]], dim=1), outputs[-1][:, first:].mean(dim=1)


def test_evaluate_linear_equals_the_probe_on_features_computed_by_hand():
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    train, val = _TinyImages(10), _TinyImages(6)
    settings = LinearSettings(("cls1", "cls2+avgpool"), (0.1,), epochs=2, batch_size=4, holdout_fraction=0.25)
    result = evaluate_linear(model, train, val, settings, batch_size=3, progress=False)
    kept_train, kept_val = [i for i in range(10) if i != 3], [i for i in range(6) if i != 3]
    bases = []
    for dataset, kept in ((train, kept_train), (val, kept_val)):
        cls_blocks, pooled = _blocks_by_hand(model, dataset.images[kept])
        bases.append({"cls_blocks": cls_blocks, "pooled": pooled})
    labels = [torch.tensor(kept) % 2 for kept in (kept_train, kept_val)]
    expected = train_linear_probe(
        bases[0],
        labels[0],
        bases[1],
        labels[1],
        ("cls1", "cls2+avgpool"),
        (0.1,),
        epochs=2,
        batch_size=4,
        holdout_fraction=0.25,
        num_classes=2,
    )
    as_dict = result.to_dict()
    assert (as_dict.pop("skipped_train"), as_dict.pop("skipped_val")) == (1, 1)
    assert as_dict == expected


def test_evaluate_linear_with_augmentation_counts_the_unreadable_files():
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    train = _TinyImages(10)
    settings = LinearSettings(("cls1",), (0.1, 0.01), epochs=2, batch_size=4, holdout_fraction=0.2)
    result = evaluate_linear(model, train, _TinyImages(6), settings, augment_dataset=train, progress=False)
    as_dict = result.to_dict()
    assert as_dict["augment"] is True and len(as_dict["heads"]) == 2
    # 5 rows per class, 1 of each held out; the unreadable index 3 is in one of the two parts, counted once
    assert (as_dict["num_train"], as_dict["num_holdout"], as_dict["num_val"]) == (8, 2, 5)
    assert (as_dict["skipped_train"], as_dict["skipped_val"]) == (1, 1)
    assert as_dict["selected_on"] == "held-out 20% of train"
