"""Linear probe on frozen features, the DINOv2 protocol: many (feature set, learning rate) heads trained at once.

Feature sets (as DINOv2's ``n_last_blocks`` x ``avgpool`` grid):

- ``cls1``: the final-normed CLS token of the last block [D];
- ``cls4``: the final-normed CLS tokens of the last 4 blocks concatenated, oldest first [4D] (any ``cls<n>`` works);
- ``cls1+avgpool`` / ``cls4+avgpool``: the same followed by the mean of the last block's normed patch tokens [+D].

They are composed from two tokens of :mod:`franca.features`: ``cls_blocks`` (the CLS of the last b blocks, oldest
first) and ``pooled`` (the mean patch token, DINOv2's ``avgpool``).

One ``nn.Linear`` (weights N(0, 0.01), zero bias, as DINOv2) per (feature set, lr) pair; all are trained jointly in
one pass over the data with the sum of their cross-entropy losses, each in its own SGD parameter group (momentum
0.9, no weight decay, lr = base lr x batch / 256, cosine decay to 0 over all steps). DINOv2's 13 base lrs
(1e-5 ... 0.1) with 4 feature sets make 52 heads.

Differences from DINOv2, on purpose:

- The best (feature set, lr) is chosen on a seeded, class-stratified held-out part of the *training* set (default
  10%), not on the val set whose accuracy is then reported; ``holdout_fraction=0`` restores DINOv2's choice on val.
  The heads are trained on the remaining 90% and not re-fitted on the full train set.
- Features are extracted once without augmentation (fast, deterministic), while DINOv2 re-augments every step with
  RandomResizedCrop + horizontal flip. ``augment_dataset`` (``--augment``) does that: the backbone runs on freshly
  augmented train images every epoch (slower; the held-out and val features stay un-augmented).
- Features are not standardised (neither does DINOv2).

:class:`LinearSettings` holds the settings, :func:`score_linear` trains and scores the heads on features (mappings of
tokens with labels, or :class:`~franca.features.Features`) into a :class:`LinearResult`, :func:`evaluate_linear`
extracts the features of two data sets with :mod:`franca.features` and scores them, and :func:`train_linear_probe` is
the scoring as a plain dict.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import ConfigError
from franca.core.progress import ProgressBar
from franca.data.datasets import ImageFolderDataset
from franca.data.images import SkipCounter
from franca.eval import defaults
from franca.eval.common import (
    Provenance,
    count_classes,
    dataset_classes,
    dataset_features,
    labels_of,
    make_loader,
    model_device,
    provenance_dict,
    split_features,
)
from franca.features import Features, canonical_token, iterate_features

DINOV2_LRS: tuple[float, ...] = defaults.DINOV2_LRS
DEFAULT_FEATURE_SETS: tuple[str, ...] = defaults.LINEAR_FEATURE_SETS
PROBE_TOKENS: tuple[str, ...] = ("cls_blocks", "pooled")
_FEATURE_SET = re.compile(r"^cls(\d+)(\+avgpool)?$")
Base = Features | Mapping[str, Tensor]
Batches = Callable[[int], Iterable[tuple[Base, Tensor]]]


# --------------------------------------------------------------------------------------------------- inputs
def parse_feature_set(name: str) -> tuple[int, bool]:
    """``"cls4+avgpool"`` -> (4, True): the number of last blocks whose CLS is used and whether avgpool is appended."""
    match = _FEATURE_SET.match(name.strip())
    if not match or int(match.group(1)) < 1:
        raise ConfigError(
            f"unknown linear feature set {name!r}; use cls<n> or cls<n>+avgpool, e.g. cls1, cls4+avgpool"
        )
    return int(match.group(1)), match.group(2) is not None


def probe_tokens(base: Base) -> dict[str, Tensor]:
    """The probe's tokens in ``base``: ``cls_blocks`` [N, b*D] (the ``cls`` token, b = 1, when no block stack was
    extracted) and ``pooled`` [N, D] when present. A mapping's keys may be token names or their aliases
    (``cls_concat``, ``avgpool``)."""
    if isinstance(base, Features):
        tokens = base.tokens
    else:
        tokens = {canonical_token(name): value for name, value in base.items()}
    cls_blocks = tokens.get("cls_blocks", tokens.get("cls"))
    if cls_blocks is None:
        raise ConfigError(
            "the linear probe needs the CLS tokens of the last blocks; extract tokens=['cls_blocks', 'pooled']"
        )
    pooled = {"pooled": tokens["pooled"]} if "pooled" in tokens else {}
    return {"cls_blocks": cls_blocks, **pooled}


def linear_input(base: Base, feature_set: str, embed_dim: int) -> Tensor:
    """Compose one feature set from the extracted ``base`` features, row-wise, as DINOv2's ``create_linear_input``.

    ``cls_blocks`` [N, b*D] holds the CLS of the last b blocks, oldest first, so the last n blocks are its last
    n*D columns; ``pooled`` [N, D] is the mean last-block patch token (see :func:`probe_tokens` for the names).
    Returns float32 [N, n*D (+D)].
    """
    n_blocks, avgpool = parse_feature_set(feature_set)
    tokens = probe_tokens(base)
    cls_blocks = tokens["cls_blocks"]
    available = cls_blocks.shape[1] // embed_dim
    if n_blocks > available:
        raise ConfigError(
            f"feature set {feature_set} needs {n_blocks} blocks but only {available} were extracted"
        )
    parts = [cls_blocks[:, -n_blocks * embed_dim :]]
    if avgpool:
        if "pooled" not in tokens:
            raise ConfigError(
                f"feature set {feature_set} needs the pooled (avgpool) tokens; extract them too"
            )
        parts.append(tokens["pooled"])
    return torch.cat(parts, dim=1).float()


def check_holdout_fraction(fraction: float) -> None:
    """ConfigError unless the held-out fraction is in [0, 1)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"the held-out fraction (--holdout) must be in [0, 1), got {fraction}")


def holdout_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-stratified random split of row indices into (train part, held-out part), both sorted.

    Each class gives ``round(fraction * n_c)`` of its ``n_c`` rows to the held-out part (at least 1 when ``n_c >= 2``
    and ``fraction > 0``, never all of them), chosen with a generator seeded by ``seed``.
    """
    check_holdout_fraction(fraction)
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


@dataclass(frozen=True)
class LinearSettings:
    """Settings of the linear probe.

    ``feature_sets``: ``cls<n>`` or ``cls<n>+avgpool`` names; ``learning_rates``: base lrs (scaled by batch / 256);
    ``epochs``: passes over the training part; ``batch_size``: rows per SGD step of the heads; ``holdout_fraction``:
    the share of train held out to choose the head (0: choose on val); ``seed``: of the split, the shuffling and
    the heads' initialisation. Checked when built.
    """

    feature_sets: Sequence[str] = DEFAULT_FEATURE_SETS
    learning_rates: Sequence[float] = DINOV2_LRS
    epochs: int = defaults.LINEAR_EPOCHS
    batch_size: int = defaults.LINEAR_BATCH_SIZE
    holdout_fraction: float = defaults.HOLDOUT_FRACTION
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.feature_sets:
            raise ConfigError("the linear probe needs at least one feature set (--features)")
        for name in self.feature_sets:
            parse_feature_set(name)
        if not self.learning_rates:
            raise ConfigError("the linear probe needs at least one learning rate (--lrs)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                f"--epochs and --probe-batch-size must be >= 1, got {self.epochs} and {self.batch_size}"
            )
        check_holdout_fraction(self.holdout_fraction)

    @property
    def n_blocks(self) -> int:
        """The number of last blocks whose CLS tokens the feature sets need."""
        return max(parse_feature_set(name)[0] for name in self.feature_sets)


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

    def _inputs(self, base: Base) -> dict[str, Tensor]:
        """{feature set: composed inputs [B, in_dim] on the trainer's device} of a batch of base features."""
        tokens = probe_tokens(base)
        return {
            feature_set: linear_input(tokens, feature_set, self.embed_dim).to(self.device, non_blocking=True)
            for feature_set in self.feature_sets
        }

    def step(self, base: Base, labels: Tensor) -> float:
        """One SGD step of every head on a batch of base features; returns the summed loss."""
        self.heads.train()
        labels = labels.to(self.device, non_blocking=True)
        logits = self.heads(self._inputs(base))
        loss = sum(F.cross_entropy(value, labels) for value in logits.values())
        loss.backward()
        self._sgd_update()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, base: Base, labels: Tensor, batch_size: int = 1024) -> dict[str, dict[str, float]]:
        """Top-1 / top-5 (percent; top-min(5, C)) of every head on ``base`` features [N, ...] with ``labels`` [N]."""
        self.heads.eval()
        labels = torch.as_tensor(labels).long()
        n = labels.numel()
        top_t = min(5, self.num_classes)
        hits1 = {spec["name"]: 0 for spec in self.heads.specs}
        hits5 = dict(hits1)
        tokens = probe_tokens(base)
        for start in range(0, n, batch_size):
            chunk = {key: value[start : start + batch_size] for key, value in tokens.items()}
            target = labels[start : start + batch_size].to(self.device).view(-1, 1)
            for name, logits in self.heads(self._inputs(chunk)).items():
                top = logits.topk(top_t, dim=1).indices
                hits1[name] += int((top[:, :1] == target).any(dim=1).sum())
                hits5[name] += int((top == target).any(dim=1).sum())
        return {
            name: {"top1": 100.0 * hits1[name] / max(n, 1), "top5": 100.0 * hits5[name] / max(n, 1)}
            for name in hits1
        }


# --------------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class HeadScore:
    """One head: its name, feature set, base and scaled lr, its top-1 on the selection split and its val top-1/5."""

    name: str
    feature_set: str
    lr: float
    scaled_lr: float
    selection_top1: float
    val_top1: float
    val_top5: float


@dataclass(frozen=True)
class LinearResult:
    """What :func:`score_linear` measured: every head's scores, the chosen one (best selection top-1, the first on
    ties), where it was chosen, the sizes, the training settings and, when Features were scored, their
    :class:`Provenance`."""

    heads: list[HeadScore]
    best_index: int
    selected_on: str
    num_train: int
    num_holdout: int
    num_val: int
    num_classes: int
    epochs: int
    batch_size: int
    augment: bool
    provenance: Provenance | None = None

    @property
    def best(self) -> HeadScore:
        """The chosen head."""
        return self.heads[self.best_index]

    @property
    def top1(self) -> float:
        """The chosen head's val top-1 (percent)."""
        return self.best.val_top1

    @property
    def top5(self) -> float:
        """The chosen head's val top-5 (percent; top-min(5, C))."""
        return self.best.val_top5

    def to_dict(self) -> dict[str, Any]:
        """``{"top1", "top5"`` (val, chosen head), ``"best": {feature_set, lr, scaled_lr, selection_top1},
        "selected_on", "heads": [one dict per head], "num_train", "num_holdout", "num_val", "num_classes",
        "epochs", "batch_size", "augment"}``, then ``"skipped_train", "skipped_val"`` when Features were scored."""
        best = self.best
        return {
            "top1": self.top1,
            "top5": self.top5,
            "best": {
                "feature_set": best.feature_set,
                "lr": best.lr,
                "scaled_lr": best.scaled_lr,
                "selection_top1": best.selection_top1,
            },
            "selected_on": self.selected_on,
            "heads": [dataclasses.asdict(head) for head in self.heads],
            "num_train": self.num_train,
            "num_holdout": self.num_holdout,
            "num_val": self.num_val,
            "num_classes": self.num_classes,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "augment": self.augment,
            **provenance_dict(self.provenance),
        }


# --------------------------------------------------------------------------------------------------- scoring
def _subset(base: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {key: value[rows] for key, value in base.items()}


def _trainer(
    settings: LinearSettings, embed_dim: int, num_classes: int, steps_per_epoch: int, device: torch.device
) -> LinearProbeTrainer:
    """The heads of every (feature set, lr) of ``settings``, scheduled over all their steps."""
    return LinearProbeTrainer(
        settings.feature_sets,
        embed_dim,
        settings.learning_rates,
        num_classes,
        settings.batch_size,
        settings.epochs * steps_per_epoch,
        device,
        settings.seed,
    )


def _train_loop(
    trainer: LinearProbeTrainer, batches: Batches, epochs: int, steps_per_epoch: int, progress: bool
):
    """Run ``trainer.step`` on every ``(base, labels)`` batch of ``batches(epoch)`` for each epoch."""
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


def _shuffled_batches(tokens: dict[str, Tensor], labels: Tensor, batch_size: int, seed: int) -> Batches:
    """``batches(epoch)``: the rows in a fresh seeded random order each epoch, ``batch_size`` at a time."""
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterable[tuple[Base, Tensor]]:
        order = torch.randperm(labels.numel(), generator=generator)
        for start in range(0, order.numel(), batch_size):
            rows = order[start : start + batch_size]
            yield _subset(tokens, rows), labels[rows]

    return batches


def _linear_result(
    trainer: LinearProbeTrainer,
    holdout: tuple[Base, Tensor] | None,
    val: tuple[Base, Tensor],
    settings: LinearSettings,
    *,
    num_train: int,
    num_classes: int,
    augment: bool,
    provenance: Provenance | None,
) -> LinearResult:
    """Score every trained head on val and on the held-out ``(base, labels)`` (val itself when there is none) and
    choose the best selection top-1, the first one on ties."""
    val_scores = trainer.evaluate(*val)
    if holdout is not None:
        selection = trainer.evaluate(*holdout)
        selected_on = f"held-out {settings.holdout_fraction:.0%} of train"
    else:
        selection, selected_on = val_scores, "val"
    heads = [
        HeadScore(
            spec["name"],
            spec["feature_set"],
            spec["lr"],
            spec["scaled_lr"],
            selection[spec["name"]]["top1"],
            val_scores[spec["name"]]["top1"],
            val_scores[spec["name"]]["top5"],
        )
        for spec in trainer.heads.specs
    ]
    best_index = max(range(len(heads)), key=lambda index: (heads[index].selection_top1, -index))
    return LinearResult(
        heads,
        best_index,
        selected_on,
        num_train=num_train,
        num_holdout=int(holdout[1].numel()) if holdout is not None else 0,
        num_val=int(val[1].numel()),
        num_classes=num_classes,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        augment=augment,
        provenance=provenance,
    )


def _embed_dim(tokens: dict[str, Tensor], embed_dim: int | None) -> int:
    """The token width D: ``embed_dim`` when given, else the width of the pooled tokens."""
    if embed_dim is not None:
        return int(embed_dim)
    if "pooled" not in tokens:
        raise ConfigError(
            "the linear probe needs embed_dim or the pooled (avgpool) tokens to know the token width"
        )
    return int(tokens["pooled"].shape[1])


def score_linear(
    train: Base,
    train_labels: Tensor | None,
    val: Base,
    val_labels: Tensor | None,
    settings: LinearSettings | None = None,
    *,
    num_classes: int | None = None,
    embed_dim: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> LinearResult:
    """Train all (feature set, lr) heads on precomputed features, pick the best on a held-out split, report on val.

    ``train`` / ``val``: Features or mappings ``{"cls_blocks": [N, b*D], "pooled": [N, D]}`` (aliases such as
    ``cls_concat`` / ``avgpool`` accepted; ``b`` >= the largest ``cls<n>``) with their labels [N] (Features: their
    targets unless labels are given; the result then records the skipped images). ``embed_dim`` defaults to the
    pooled width, ``num_classes`` to the largest label + 1; the heads train on ``device`` (default CPU). With
    ``settings.holdout_fraction`` 0 the head is chosen on val (DINOv2).
    """
    settings = settings if settings is not None else LinearSettings()
    train_tokens, val_tokens = probe_tokens(train), probe_tokens(val)
    train_labels, val_labels = labels_of(train, train_labels, "train"), labels_of(val, val_labels, "val")
    embed_dim = _embed_dim(train_tokens, embed_dim)
    if num_classes is None:
        num_classes = count_classes(train_labels, val_labels)
    device = torch.device(device) if device is not None else torch.device("cpu")
    train_rows, holdout_rows = holdout_split(train_labels, settings.holdout_fraction, settings.seed)
    fit_labels = train_labels[train_rows]
    steps_per_epoch = math.ceil(fit_labels.numel() / settings.batch_size)
    trainer = _trainer(settings, embed_dim, num_classes, steps_per_epoch, device)
    batches = _shuffled_batches(
        _subset(train_tokens, train_rows), fit_labels, settings.batch_size, settings.seed
    )
    _train_loop(trainer, batches, settings.epochs, steps_per_epoch, progress)
    holdout = (
        (_subset(train_tokens, holdout_rows), train_labels[holdout_rows]) if holdout_rows.numel() else None
    )
    return _linear_result(
        trainer,
        holdout,
        (val_tokens, val_labels),
        settings,
        num_train=int(train_rows.numel()),
        num_classes=num_classes,
        augment=False,
        provenance=Provenance.of(None, train, val),
    )


def train_linear_probe(
    train_base: Base,
    train_labels: Tensor,
    val_base: Base,
    val_labels: Tensor,
    feature_sets: Sequence[str] = ("cls1",),
    learning_rates: Sequence[float] = DINOV2_LRS,
    epochs: int = defaults.LINEAR_EPOCHS,
    batch_size: int = defaults.LINEAR_BATCH_SIZE,
    holdout_fraction: float = defaults.HOLDOUT_FRACTION,
    num_classes: int | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train all (feature set, lr) heads on precomputed features, pick the best on a held-out split, report on val.

    ``train_base`` / ``val_base``: ``{"cls_blocks": [N, b*D], "pooled": [N, D]}`` (or the older names
    ``cls_concat`` / ``avgpool``) as extracted by :func:`franca.features.extract_features` (``cls_blocks`` with
    ``b`` >= the largest ``cls<n>``); ``embed_dim`` defaults to ``pooled``'s width. With ``holdout_fraction`` 0 the
    choice is made on val (DINOv2).

    Returns ``{"top1", "top5"`` (val, chosen head), ``"best"`` {feature_set, lr, scaled_lr, selection_top1},
    ``"selected_on"``, ``"heads"`` (one row per head), ``"num_train"``, ``"num_holdout"``, ``"num_val"``, ...}:
    :func:`score_linear` as a dict.
    """
    settings = LinearSettings(
        tuple(feature_sets), tuple(learning_rates), epochs, batch_size, holdout_fraction, seed
    )
    result = score_linear(
        train_base,
        train_labels,
        val_base,
        val_labels,
        settings,
        num_classes=num_classes,
        embed_dim=embed_dim,
        device=device,
        progress=progress,
    )
    return result.to_dict()


# --------------------------------------------------------------------------------------------------- model level
def train_augmentation(size: int) -> Callable:
    """DINOv2's linear-probe train transform: RandomResizedCrop(size, bicubic) + horizontal flip + ImageNet norm."""
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
    return ImageFolderDataset(train_root, transform=train_augmentation(size))


def _blocks_needed(model: nn.Module, settings: LinearSettings) -> int:
    """The number of last blocks to extract; ConfigError when the model has fewer."""
    n_blocks = settings.n_blocks
    depth = len(getattr(model, "blocks", [])) or n_blocks
    if n_blocks > depth:
        raise ConfigError(f"feature set cls{n_blocks} needs {n_blocks} blocks but the model has {depth}")
    return n_blocks


@dataclass(frozen=True)
class _Extraction:
    """How :func:`evaluate_linear` runs the backbone: device, blocks, loader batch size and workers, progress."""

    device: torch.device
    n_blocks: int
    batch_size: int
    num_workers: int
    progress: bool

    def features(self, model: nn.Module, dataset: Any, desc: str) -> Features:
        """The probe's tokens of every image of ``dataset``."""
        return dataset_features(
            model,
            dataset,
            PROBE_TOKENS,
            self.batch_size,
            self.num_workers,
            self.device,
            self.n_blocks,
            desc,
            self.progress,
        )

    def stream(
        self, model: nn.Module, loader: Any, counter: SkipCounter, desc: str
    ) -> Iterable[tuple[Base, Tensor]]:
        """The probe's tokens of ``loader``, batch by batch on the device (no progress bar of its own)."""
        return iterate_features(
            model, loader, PROBE_TOKENS, self.device, self.n_blocks, True, counter, desc, progress=False
        )


def _train_augmented(
    model: nn.Module, trainer: LinearProbeTrainer, loader: Any, epochs: int, extraction: _Extraction
) -> int:
    """Train ``trainer`` for ``epochs`` passes over ``loader`` (freshly augmented images each time, through the
    frozen backbone); returns the number of unreadable images in one pass."""
    counters: list[SkipCounter] = []

    def batches(epoch: int) -> Iterable[tuple[Base, Tensor]]:
        counters.append(SkipCounter())
        return extraction.stream(model, loader, counters[-1], f"augmented features, epoch {epoch}")

    _train_loop(trainer, batches, epochs, len(loader), extraction.progress)
    return counters[0].num_skipped


def _augmented_probe(
    model: nn.Module,
    train_dataset: Any,
    augment_dataset: Any,
    val: Features,
    settings: LinearSettings,
    extraction: _Extraction,
    num_classes: int | None,
) -> LinearResult:
    """Hold out a split of the train files, train the heads on freshly augmented images of the rest every epoch
    (tokens streamed by :func:`franca.features.iterate_features`), choose and report as :func:`score_linear`."""
    targets = torch.as_tensor(list(train_dataset.targets)).long()
    num_classes = num_classes if num_classes is not None else count_classes(targets, val.targets)
    train_rows, holdout_rows = holdout_split(targets, settings.holdout_fraction, settings.seed)
    fit_part = torch.utils.data.Subset(augment_dataset, train_rows.tolist())
    fit_loader = make_loader(
        fit_part, settings.batch_size, extraction.num_workers, shuffle=True, seed=settings.seed
    )
    trainer = _trainer(settings, int(model.embed_dim), num_classes, len(fit_loader), extraction.device)
    skipped_train = _train_augmented(model, trainer, fit_loader, settings.epochs, extraction)
    held = None
    if holdout_rows.numel():
        held_part = torch.utils.data.Subset(train_dataset, holdout_rows.tolist())
        held = extraction.features(model, held_part, "held-out features")
        skipped_train += held.num_skipped
    return _linear_result(
        trainer,
        (held, held.targets) if held is not None else None,
        (val, val.targets),
        settings,
        num_train=int(train_rows.numel()),
        num_classes=num_classes,
        augment=True,
        provenance=Provenance(None, skipped_train, val.num_skipped),
    )


def evaluate_linear(
    model: nn.Module,
    train_dataset: Any,
    val_dataset: Any,
    settings: LinearSettings | None = None,
    *,
    augment_dataset: Any = None,
    batch_size: int = defaults.EXTRACT_BATCH_SIZE,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> LinearResult:
    """Linear probe of ``model`` on ImageFolder-like data sets (items ``(image tensor, label)``).

    Without ``augment_dataset`` the ``cls_blocks`` and ``pooled`` tokens are extracted once and :func:`score_linear`
    runs on them. With it (the same files as ``train_dataset`` under a random train transform, see
    :func:`train_augmentation`), the held-out split is made on the file list, its features and the val features
    are extracted once, and every training epoch re-runs the frozen backbone on freshly augmented training images
    (DINOv2's recipe). ``batch_size`` is the extraction's; the heads' is ``settings.batch_size``.
    """
    settings = settings if settings is not None else LinearSettings()
    device = model_device(model, device)
    n_blocks = _blocks_needed(model, settings)
    num_classes = dataset_classes(train_dataset)
    if augment_dataset is None:
        train, val = split_features(
            model,
            train_dataset,
            val_dataset,
            PROBE_TOKENS,
            batch_size,
            num_workers,
            device,
            n_blocks,
            progress,
        )
        return score_linear(
            train,
            None,
            val,
            None,
            settings,
            num_classes=num_classes,
            embed_dim=int(model.embed_dim),
            device=device,
            progress=progress,
        )
    extraction = _Extraction(device, n_blocks, batch_size, num_workers, progress)
    val = extraction.features(model, val_dataset, "val features")
    return _augmented_probe(model, train_dataset, augment_dataset, val, settings, extraction, num_classes)


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
