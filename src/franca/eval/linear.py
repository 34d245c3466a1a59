"""Linear probe on frozen features, the DINOv2 protocol: many (feature set, learning rate) heads trained at once.

Feature sets (as DINOv2's ``n_last_blocks`` x ``avgpool`` grid):

- ``cls1``: the final-normed CLS token of the last block [D];
- ``cls4``: the final-normed CLS tokens of the last 4 blocks concatenated, oldest first [4D] (any ``cls<n>`` works);
- ``cls1+avgpool`` / ``cls4+avgpool``: the same followed by the mean of the last block's normed patch tokens [+D].

One ``nn.Linear`` (weights N(0, 0.01), zero bias, as DINOv2) per (feature set, lr) pair; all are trained jointly in
one pass over the data with the sum of their cross-entropy losses, each in its own SGD parameter group (momentum
0.9, no weight decay, lr = base lr x batch / 256, cosine decay to 0 over all steps). DINOv2's 13 base lrs
(1e-5 ... 0.1) with 4 feature sets make 52 heads.

Differences from DINOv2, on purpose:

- The best (feature set, lr) is chosen on a seeded, class-stratified held-out part of the *training* set (default
  10%), not on the val set whose accuracy is then reported; ``holdout_fraction=0`` restores DINOv2's choice on val.
  The heads are trained on the remaining 90% and not re-fitted on the full train set.
- Features are extracted once without augmentation (fast, deterministic), while DINOv2 re-augments every step with
  RandomResizedCrop + horizontal flip. ``augment=True`` (``--augment``) does that: the backbone runs on freshly
  augmented train images every epoch (slower; the held-out and val features stay un-augmented).
- Features are not standardised (neither does DINOv2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from franca.core.errors import ConfigError
from franca.core.progress import ProgressBar
from franca.core.runtime import autocast_context
from franca.eval import defaults
from franca.eval.common import make_loader
from franca.eval.features import extract_features, forward_kinds, unpack_batch

DINOV2_LRS: tuple[float, ...] = defaults.DINOV2_LRS
DEFAULT_FEATURE_SETS: tuple[str, ...] = defaults.LINEAR_FEATURE_SETS
_FEATURE_SET = re.compile(r"^cls(\d+)(\+avgpool)?$")


# --------------------------------------------------------------------------------------------------- inputs
def parse_feature_set(name: str) -> tuple[int, bool]:
    """``"cls4+avgpool"`` -> (4, True): the number of last blocks whose CLS is used and whether avgpool is appended."""
    match = _FEATURE_SET.match(name.strip())
    if not match or int(match.group(1)) < 1:
        raise ConfigError(
            f"unknown linear feature set {name!r}; use cls<n> or cls<n>+avgpool, e.g. cls1, cls4+avgpool"
        )
    return int(match.group(1)), match.group(2) is not None


def linear_input(base: dict[str, Tensor], feature_set: str, embed_dim: int) -> Tensor:
    """Compose one feature set from the extracted ``base`` features, row-wise, as DINOv2's ``create_linear_input``.

    ``base["cls_concat"]`` [N, b*D] holds the CLS of the last b blocks, oldest first, so the last n blocks are its
    last n*D columns; ``base["avgpool"]`` [N, D] is the mean last-block patch token. Returns float32 [N, n*D (+D)].
    """
    n_blocks, avgpool = parse_feature_set(feature_set)
    cls_concat = base["cls_concat"]
    available = cls_concat.shape[1] // embed_dim
    if n_blocks > available:
        raise ConfigError(
            f"feature set {feature_set} needs {n_blocks} blocks but only {available} were extracted"
        )
    parts = [cls_concat[:, -n_blocks * embed_dim :]]
    if avgpool:
        parts.append(base["avgpool"])
    return torch.cat(parts, dim=1).float()


def holdout_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-stratified random split of row indices into (train part, held-out part), both sorted.

    Each class gives ``round(fraction * n_c)`` of its ``n_c`` rows to the held-out part (at least 1 when ``n_c >= 2``
    and ``fraction > 0``, never all of them), chosen with a generator seeded by ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"the held-out fraction must be in [0, 1), got {fraction}")
    labels = torch.as_tensor(labels).long().cpu()
    generator = torch.Generator().manual_seed(seed)
    held_out: list[Tensor] = []
    for cls in torch.unique(labels):
        rows = torch.nonzero(labels == cls).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        count = int(round(fraction * rows.numel()))
        if fraction > 0 and rows.numel() >= 2:
            count = min(max(count, 1), rows.numel() - 1)
        else:
            count = 0
        held_out.append(rows[:count])
    held = torch.cat(held_out) if held_out else torch.zeros(0, dtype=torch.long)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), torch.sort(held).values


# --------------------------------------------------------------------------------------------------- heads
class LinearHeads(nn.Module):
    """One ``nn.Linear(in_dim, num_classes)`` per (feature set, base lr); ``forward`` maps composed inputs to logits.

    ``specs`` lists dicts ``{"name", "feature_set", "lr", "scaled_lr"}`` in the order the heads were created.
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        learning_rates: Sequence[float],
        num_classes: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()
        self.specs: list[dict[str, Any]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for feature_set, in_dim in in_dims.items():
                for index, lr in enumerate(learning_rates):
                    name = f"{feature_set}_lr{index:02d}".replace("+", "_")
                    head = nn.Linear(in_dim, num_classes)
                    nn.init.normal_(head.weight, mean=0.0, std=0.01)
                    nn.init.zeros_(head.bias)
                    self.heads[name] = head
                    scaled = float(lr) * batch_size / 256.0
                    self.specs.append(
                        {"name": name, "feature_set": feature_set, "lr": float(lr), "scaled_lr": scaled}
                    )

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``inputs`` {feature set: [B, in_dim]} -> {head name: logits [B, C]}."""
        return {spec["name"]: self.heads[spec["name"]](inputs[spec["feature_set"]]) for spec in self.specs}

    def param_groups(self) -> list[dict[str, Any]]:
        """One SGD parameter group per head with its scaled learning rate."""
        return [
            {"params": list(self.heads[spec["name"]].parameters()), "lr": spec["scaled_lr"]}
            for spec in self.specs
        ]


class LinearProbeTrainer:
    """Trains :class:`LinearHeads` jointly: SGD (momentum 0.9, no dampening, wd 0) with each head's own lr, cosine
    schedule to 0 over ``total_steps`` steps, loss = sum over heads of the mean cross-entropy.

    The SGD update and the cosine factor are written out (``buf = 0.9 buf + grad; p -= lr_t buf`` with
    ``lr_t = lr (1 + cos(pi t / T)) / 2``, exactly ``torch.optim.SGD`` + ``CosineAnnealingLR(eta_min=0)``) because the
    first use of ``torch.optim`` imports TorchDynamo, which costs 5-15 s of CPU on the small machines this runs on.
    """

    def __init__(
        self,
        feature_sets: Sequence[str],
        embed_dim: int,
        learning_rates: Sequence[float],
        num_classes: int,
        batch_size: int,
        total_steps: int,
        device: torch.device,
        seed: int = 0,
        momentum: float = 0.9,
    ) -> None:
        self.feature_sets = list(dict.fromkeys(feature_sets))
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.device = device
        self.momentum = momentum
        self.total_steps = max(1, int(total_steps))
        self.step_count = 0
        in_dims = {}
        for feature_set in self.feature_sets:
            n_blocks, avgpool = parse_feature_set(feature_set)
            in_dims[feature_set] = (n_blocks + int(avgpool)) * embed_dim
        self.heads = LinearHeads(in_dims, learning_rates, num_classes, batch_size, seed).to(device)
        self.heads.requires_grad_(True)
        self.groups = self.heads.param_groups()
        self.buffers: dict[int, Tensor] = {}

    def current_lr_factor(self) -> float:
        """Cosine factor (1 + cos(pi t / T)) / 2 of the next step t (1 at the start, -> 0 at the end)."""
        return 0.5 * (1.0 + math.cos(math.pi * min(self.step_count, self.total_steps) / self.total_steps))

    @torch.no_grad()
    def _sgd_update(self) -> None:
        factor = self.current_lr_factor()
        for group in self.groups:
            lr = group["lr"] * factor
            for param in group["params"]:
                if param.grad is None:
                    continue
                buffer = self.buffers.get(id(param))
                if buffer is None:
                    buffer = self.buffers[id(param)] = param.grad.detach().clone()
                else:
                    buffer.mul_(self.momentum).add_(param.grad)
                param.add_(buffer, alpha=-lr)
                param.grad = None
        self.step_count += 1

    def _inputs(self, base: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            feature_set: linear_input(base, feature_set, self.embed_dim).to(self.device, non_blocking=True)
            for feature_set in self.feature_sets
        }

    def step(self, base: dict[str, Tensor], labels: Tensor) -> float:
        """One SGD step of every head on a batch of base features; returns the summed loss."""
        self.heads.train()
        labels = labels.to(self.device, non_blocking=True)
        logits = self.heads(self._inputs(base))
        loss = sum(F.cross_entropy(value, labels) for value in logits.values())
        loss.backward()
        self._sgd_update()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(
        self, base: dict[str, Tensor], labels: Tensor, batch_size: int = 1024
    ) -> dict[str, dict[str, float]]:
        """Top-1 / top-5 (percent; top-min(5, C)) of every head on ``base`` features [N, ...] with ``labels`` [N]."""
        self.heads.eval()
        labels = torch.as_tensor(labels).long()
        n = labels.numel()
        top_t = min(5, self.num_classes)
        hits1 = {spec["name"]: 0 for spec in self.heads.specs}
        hits5 = dict(hits1)
        for start in range(0, n, batch_size):
            chunk = {key: value[start : start + batch_size] for key, value in base.items()}
            target = labels[start : start + batch_size].to(self.device).view(-1, 1)
            for name, logits in self.heads(self._inputs(chunk)).items():
                top = logits.topk(top_t, dim=1).indices
                hits1[name] += int((top[:, :1] == target).any(dim=1).sum())
                hits5[name] += int((top == target).any(dim=1).sum())
        return {
            name: {"top1": 100.0 * hits1[name] / max(n, 1), "top5": 100.0 * hits5[name] / max(n, 1)}
            for name in hits1
        }


def _subset(base: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {key: value[rows] for key, value in base.items()}


def _select_and_report(
    trainer: LinearProbeTrainer,
    selection: dict[str, dict[str, float]],
    val_scores: dict[str, dict[str, float]],
    selected_on: str,
) -> dict[str, Any]:
    """Pick the head with the best selection top-1 (first one on ties) and build the results dict."""
    table = []
    for spec in trainer.heads.specs:
        name = spec["name"]
        table.append(
            {
                "name": name,
                "feature_set": spec["feature_set"],
                "lr": spec["lr"],
                "scaled_lr": spec["scaled_lr"],
                "selection_top1": selection[name]["top1"],
                "val_top1": val_scores[name]["top1"],
                "val_top5": val_scores[name]["top5"],
            }
        )
    best_index = max(range(len(table)), key=lambda index: (table[index]["selection_top1"], -index))
    best = table[best_index]
    return {
        "top1": best["val_top1"],
        "top5": best["val_top5"],
        "best": {
            "feature_set": best["feature_set"],
            "lr": best["lr"],
            "scaled_lr": best["scaled_lr"],
            "selection_top1": best["selection_top1"],
        },
        "selected_on": selected_on,
        "heads": table,
    }


def train_linear_probe(
    train_base: dict[str, Tensor],
    train_labels: Tensor,
    val_base: dict[str, Tensor],
    val_labels: Tensor,
    feature_sets: Sequence[str] = ("cls1",),
    learning_rates: Sequence[float] = DINOV2_LRS,
    epochs: int = 10,
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    num_classes: int | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train all (feature set, lr) heads on precomputed features, pick the best on a held-out split, report on val.

    ``train_base`` / ``val_base``: ``{"cls_concat": [N, b*D], "avgpool": [N, D]}`` as extracted by
    :func:`franca.eval.features.extract_features` (``cls_concat`` with ``b`` >= the largest ``cls<n>``);
    ``embed_dim`` defaults to ``avgpool``'s width. With ``holdout_fraction`` 0 the choice is made on val (DINOv2).

    Returns ``{"top1", "top5"`` (val, chosen head), ``"best"`` {feature_set, lr, scaled_lr, selection_top1},
    ``"selected_on"``, ``"heads"`` (one row per head), ``"num_train"``, ``"num_holdout"``, ``"num_val"``, ...}.
    """
    train_labels = torch.as_tensor(train_labels).long().cpu()
    val_labels = torch.as_tensor(val_labels).long().cpu()
    if embed_dim is None:
        if "avgpool" not in train_base:
            raise ConfigError(
                "train_linear_probe needs embed_dim or an 'avgpool' entry to know the token width"
            )
        embed_dim = int(train_base["avgpool"].shape[1])
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), val_labels.max().item()) + 1)
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    if not learning_rates:
        raise ConfigError("the linear probe needs at least one learning rate")
    device = torch.device(device) if device is not None else torch.device("cpu")
    train_rows, holdout_rows = holdout_split(train_labels, holdout_fraction, seed)
    fit_base, fit_labels = _subset(train_base, train_rows), train_labels[train_rows]
    steps_per_epoch = math.ceil(fit_labels.numel() / batch_size)
    trainer = LinearProbeTrainer(
        feature_sets,
        embed_dim,
        learning_rates,
        num_classes,
        batch_size,
        epochs * steps_per_epoch,
        device,
        seed,
    )
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterable[tuple[dict[str, Tensor], Tensor]]:
        order = torch.randperm(fit_labels.numel(), generator=generator)
        for start in range(0, order.numel(), batch_size):
            rows = order[start : start + batch_size]
            yield _subset(fit_base, rows), fit_labels[rows]

    _train_loop(trainer, batches, epochs, steps_per_epoch, progress)
    val_scores = trainer.evaluate(val_base, val_labels)
    if holdout_rows.numel():
        selection = trainer.evaluate(_subset(train_base, holdout_rows), train_labels[holdout_rows])
        selected_on = f"held-out {holdout_fraction:.0%} of train"
    else:
        selection, selected_on = val_scores, "val"
    results = _select_and_report(trainer, selection, val_scores, selected_on)
    results.update(
        num_train=int(train_rows.numel()),
        num_holdout=int(holdout_rows.numel()),
        num_val=int(val_labels.numel()),
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        augment=False,
    )
    return results


def _train_loop(
    trainer: LinearProbeTrainer,
    batches: Callable[[int], Iterable[tuple[dict[str, Tensor], Tensor]]],
    epochs: int,
    steps_per_epoch: int,
    progress: bool,
) -> None:
    bar = ProgressBar(
        total=epochs * steps_per_epoch, desc="linear probe", unit="step", disable=not progress, leave=False
    )
    try:
        for epoch in range(epochs):
            for base, labels in batches(epoch):
                loss = trainer.step(base, labels)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------- model level
def train_augmentation(size: int) -> Callable:
    """DINOv2's linear-probe train transform: RandomResizedCrop(size, bicubic) + horizontal flip + ImageNet norm."""
    from torchvision.transforms import v2

    from franca.data.augmentations import IMAGENET_MEAN, IMAGENET_STD

    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )


def augmented_train_dataset(train_root: str, size: int) -> Any:
    """The ImageFolder ``train_root`` under :func:`train_augmentation` (``evaluate_linear``'s ``augment_dataset``)."""
    from franca.data.datasets import ImageFolderDataset

    return ImageFolderDataset(train_root, transform=train_augmentation(size))


def evaluate_linear(
    model: nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    feature_sets: Sequence[str] = DEFAULT_FEATURE_SETS,
    learning_rates: Sequence[float] = DINOV2_LRS,
    epochs: int = 10,
    probe_batch_size: int = 256,
    holdout_fraction: float = 0.1,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    seed: int = 0,
    augment_dataset: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear probe of ``model`` on ImageFolder-like data sets (items ``(image tensor, label)``).

    Without ``augment_dataset`` the base features are extracted once and :func:`train_linear_probe` runs on them.
    With it (the same files as ``train_dataset`` under a random train transform, see :func:`train_augmentation`),
    the held-out split is made on the file list, its features and the val features are extracted once, and every
    training epoch re-runs the frozen backbone on freshly augmented training images (DINOv2's recipe).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_blocks = max(parse_feature_set(name)[0] for name in feature_sets)
    depth = len(getattr(model, "blocks", [])) or n_blocks
    if n_blocks > depth:
        raise ConfigError(f"feature set cls{n_blocks} needs {n_blocks} blocks but the model has {depth}")
    kinds = ("cls_concat", "avgpool")
    num_classes = len(getattr(train_dataset, "classes", [])) or None

    def extract(dataset: Any, description: str):
        loader = make_loader(dataset, batch_size, num_workers)
        return extract_features(
            model, loader, device, kinds, n_blocks, progress=progress, description=description
        )

    val = extract(val_dataset, "val features")
    if augment_dataset is None:
        train = extract(train_dataset, "train features")
        results = train_linear_probe(
            train.features,
            train.labels,
            val.features,
            val.labels,
            feature_sets=feature_sets,
            learning_rates=learning_rates,
            epochs=epochs,
            batch_size=probe_batch_size,
            holdout_fraction=holdout_fraction,
            num_classes=num_classes,
            embed_dim=int(model.embed_dim),
            seed=seed,
            device=device,
            progress=progress,
        )
        results.update(skipped_train=train.num_skipped, skipped_val=val.num_skipped)
        return results

    targets = torch.as_tensor(list(train_dataset.targets)).long()
    if num_classes is None:
        num_classes = int(max(targets.max().item(), val.labels.max().item()) + 1)
    train_rows, holdout_rows = holdout_split(targets, holdout_fraction, seed)
    subset = torch.utils.data.Subset
    fit_loader = make_loader(
        subset(augment_dataset, train_rows.tolist()), probe_batch_size, num_workers, shuffle=True, seed=seed
    )
    steps_per_epoch = len(fit_loader)
    trainer = LinearProbeTrainer(
        feature_sets,
        int(model.embed_dim),
        learning_rates,
        num_classes,
        probe_batch_size,
        epochs * steps_per_epoch,
        device,
        seed,
    )
    skipped_train = [0]

    def batches(epoch: int) -> Iterable[tuple[dict[str, Tensor], Tensor]]:
        for batch in fit_loader:
            images, labels, skipped = unpack_batch(batch)
            if epoch == 0:
                skipped_train[0] += skipped
            if images is None:
                continue
            with torch.no_grad(), autocast_context(device):
                outputs = forward_kinds(model, images.to(device, non_blocking=True), kinds, n_blocks)
            yield {key: value.float() for key, value in outputs.items()}, labels

    model.eval()
    _train_loop(trainer, batches, epochs, steps_per_epoch, progress)
    val_scores = trainer.evaluate(val.features, val.labels)
    if holdout_rows.numel():
        held = extract(subset(train_dataset, holdout_rows.tolist()), "held-out features")
        selection = trainer.evaluate(held.features, held.labels)
        selected_on = f"held-out {holdout_fraction:.0%} of train"
    else:
        selection, selected_on = val_scores, "val"
    results = _select_and_report(trainer, selection, val_scores, selected_on)
    results.update(
        num_train=int(train_rows.numel()),
        num_holdout=int(holdout_rows.numel()),
        num_val=int(val.labels.numel()),
        num_classes=num_classes,
        epochs=epochs,
        batch_size=probe_batch_size,
        augment=True,
        skipped_train=skipped_train[0] + (held.num_skipped if holdout_rows.numel() else 0),
        skipped_val=val.num_skipped,
    )
    return results


def linear_table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the per-head table (feature set, lr, selection top-1, val top-1/top-5), chosen head marked."""
    best = results["best"]
    rows = []
    for row in results["heads"]:
        chosen = row["feature_set"] == best["feature_set"] and row["lr"] == best["lr"]
        rows.append(
            {
                "feature_set": row["feature_set"],
                "lr": f"{row['lr']:g}",
                "selection_top1": row["selection_top1"],
                "val_top1": row["val_top1"],
                "val_top5": row["val_top5"],
                "chosen": "*" if chosen else "",
            }
        )
    return rows
