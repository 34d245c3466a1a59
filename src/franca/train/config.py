"""The run configuration of Franca pre-training: nested dataclasses, YAML presets and dotlist overrides.

A run is described by one :class:`TrainConfig`. The dataclass defaults are the project defaults for ViT-B/14 on
ImageNet-21K (the paper's values where paper and official configs disagree; see ``docs/method.md`` §4 and §8).
Presets live as YAML files in the package (``franca/configs/*.yaml``) and are loaded by name::

    cfg = load_config("tiny_cpu", ["optim.base_lr=5e-4", "train.iterations=100"])

A YAML file given by path works the same way; it may start with ``base: <preset or path>`` to inherit from another
file and change only a few keys. Unknown keys, values of the wrong type and invalid choices raise
:class:`franca.core.errors.ConfigError` with one line that names the key and the closest valid key or value.

Every schedule length is in iterations. ``train.epoch_length`` (DINOv2's ``OFFICIAL_EPOCH_LENGTH`` = 1250) only
groups iterations into "epochs" for logging and for converting the official configs' epoch counts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from franca.core.errors import ConfigError
from franca.models.vision_transformer import ARCHITECTURES

logger = logging.getLogger(__name__)

PRESET_PACKAGE = "franca"
PRESET_FOLDER = "configs"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = None,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with its allowed values: ``choices`` for strings, bounds for numbers (each element of a list).

    :func:`validate_config` reads them from the dataclass, so a value's rule lives beside its type and default.
    Every float (lists included) must also be finite.
    """
    rules = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata = {name: rule for name, rule in rules.items() if rule is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Nesting levels used when ``heads.levels`` is null: the paper's five widths d/16 ... d.
DEFAULT_LEVELS: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


@dataclass
class ModelConfig:
    """Backbone. ``arch`` picks width/depth/heads; ``embed_dim``/``depth``/``num_heads`` override them when set."""

    arch: str = setting("vit_base", choices=("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"))
    patch_size: int = setting(14, gt=0)
    img_size: int = setting(
        224, gt=0
    )  # size the position embedding is built for (its grid is img_size // patch_size)
    ffn_layer: str = setting("swiglu", choices=("swiglu", "mlp"))
    embed_dim: int | None = setting(None, gt=0)
    depth: int | None = setting(None, gt=0)
    num_heads: int | None = setting(None, gt=0)
    num_register_tokens: int = setting(0, ge=0)
    drop_path_rate: float = setting(0.1, ge=0.0, lt=1.0)
    drop_path_uniform: bool = True
    # batch_subset: the official student's stochastic depth (each residual branch runs on floor(B(1-p)) random
    # samples of every crop batch, scaled by B / kept); per_sample: timm's DropPath (whole samples zeroed)
    drop_path_mode: str = setting("batch_subset", choices=("batch_subset", "per_sample"))
    layerscale_init: float = setting(1e-5, ge=0.0)  # 0: no LayerScale
    # Continued training / HRFT: a backbone checkpoint loaded into student and teacher before training.
    pretrained_backbone: str | None = None
    # Head weights (dino_head/ibot_head) to start from; null re-initialises the heads.
    pretrained_heads: str | None = None

    def vit_overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``franca.models.build_model(self.arch, **overrides)``."""
        overrides: dict[str, Any] = {
            "patch_size": self.patch_size,
            "img_size": self.img_size,
            "ffn_layer": self.ffn_layer,
            "num_register_tokens": self.num_register_tokens,
            "drop_path_rate": self.drop_path_rate,
            "drop_path_uniform": self.drop_path_uniform,
            "drop_path_mode": self.drop_path_mode,
            "layerscale_init": self.layerscale_init,
        }
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        return overrides


@dataclass
class HeadsConfig:
    """Matryoshka projection/clustering heads (method §2.2).

    ``mode``: ``slice`` (paper: per-level head on the first m_j dims), ``project`` (v1.0 code: Linear(d->m_j) on the
    full token), ``tied`` (one shared, sliced head) or ``dinov2`` (the single-head baseline, no nesting).
    ``levels``: nesting widths as fractions of d, ascending; null = [1/16, 1/8, 1/4, 1/2, 1].
    ``n_prototypes``: prototypes of the *largest* level; level j gets int(n_prototypes * m_j / d).
    """

    mode: str = setting("slice", choices=("slice", "project", "tied", "dinov2"))
    levels: list[float] | None = setting(None, gt=0.0, le=1.0)
    n_prototypes: int = setting(131072, gt=0)
    hidden_dim: int = setting(2048, gt=0)
    bottleneck_dim: int = setting(384, gt=0)
    nlayers: int = setting(3, gt=0)
    separate_ibot_head: bool = True
    # Not the official head: L2-normalise each level's bottleneck as DINOv2 does (see MatryoshkaHead).
    normalize_bottleneck: bool = False
    # official: trunc-normal 0.02 (the official code); fan_in: std 1/sqrt(fan_in), for narrow CPU-sized heads.
    init: str = setting("official", choices=("official", "fan_in"))

    def resolved_levels(self) -> list[float]:
        """The nesting fractions in use (``[1.0]`` for the single-head ``dinov2`` mode)."""
        if self.mode == "dinov2":
            return [1.0]
        return list(DEFAULT_LEVELS if self.levels is None else self.levels)

    def level_widths(self, embed_dim: int) -> list[int]:
        """The nested widths m_j of an ``embed_dim``-wide embedding, smallest first (d/16 ... d by default)."""
        return [int(round(fraction * embed_dim)) for fraction in self.resolved_levels()]


@dataclass
class CropsConfig:
    """Multi-crop augmentation (method §4.1). Scales are (min, max) area fractions for RandomResizedCrop.

    ``blur_probabilities``: ``effective`` = (0, 0.9, 0.5) for (global-1, global-2, local), what the released models
    were trained with because of the inherited DINOv2 bug; ``nominal`` = (1.0, 0.1, 0.5) as written in the configs.
    """

    global_size: int = setting(224, gt=0)
    global_scale: list[float] = setting(factory=lambda: [0.32, 1.0], gt=0.0, le=1.0)
    n_local: int = setting(8, ge=0)
    local_size: int = setting(98, gt=0)
    local_scale: list[float] = setting(factory=lambda: [0.05, 0.32], gt=0.0, le=1.0)
    blur_probabilities: str = setting("effective", choices=("effective", "nominal"))
    solarize_probability: float = setting(0.2, ge=0.0, le=1.0)  # on the second global crop only
    # Gaussian-blur sigma range in pixels of the crop (the paper's [0.1, 2] is meant for 224-px crops and is
    # relatively ~7x stronger on 32-px crops; scaling it down did not help the tiny demo, docs/demo-learning.md)
    blur_sigma: list[float] = setting(factory=lambda: [0.1, 2.0], gt=0.0)
    # ColorJitter strengths (brightness, contrast, saturation, hue in turns <= 0.5), applied with
    # color_jitter_probability, then grayscale with grayscale_probability (the paper's values are the defaults)
    color_jitter: list[float] = setting(factory=lambda: [0.4, 0.4, 0.2, 0.1], ge=0.0)
    color_jitter_probability: float = setting(0.8, ge=0.0, le=1.0)
    grayscale_probability: float = setting(0.2, ge=0.0, le=1.0)
    # data workers only crop and flip (uint8); colour, blur, solarisation and normalisation run batched on the
    # training device (franca.data.device_augment): for GPUs, whose CPU pipeline is otherwise the bottleneck
    augment_on_device: bool = False


@dataclass
class MaskingConfig:
    """CyclicMask on the student's global crops (method §3)."""

    probability: float = setting(0.5, ge=0.0, le=1.0)  # fraction of global crops that receive a mask
    ratio_min_max: list[float] = setting(factory=lambda: [0.1, 0.65], ge=0.0, le=1.0)
    min_aspect: float = setting(0.3, gt=0.0, le=1.0)
    roll: bool = True


@dataclass
class LossConfig:
    """Loss weights and temperatures (method §2.3-2.7). ``level_weights`` null = equal weights (1 per level)."""

    dino_weight: float = setting(1.0, ge=0.0)
    ibot_weight: float = setting(1.0, ge=0.0)
    koleo_weight: float = setting(0.1, ge=0.0)
    level_weights: list[float] | None = setting(None, ge=0.0)
    centering: str = setting("sinkhorn", choices=("sinkhorn", "centering"))
    sk_iterations: int = setting(3, gt=0)
    center_momentum: float = setting(
        0.9, ge=0.0, le=1.0
    )  # only for centering=centering (one EMA centre per level)
    student_temp: float = setting(0.1, gt=0.0)
    teacher_temp_start: float = setting(0.04, gt=0.0)
    teacher_temp: float = setting(0.07, gt=0.0)
    teacher_temp_warmup_iterations: int = setting(37500, ge=0)  # 30 official "epochs" of 1250 iterations


@dataclass
class OptimConfig:
    """AdamW and its schedules (method §4.2). The peak learning rate is ``base_lr`` scaled by ``lr_scaling_rule``.

    ``sqrt_wrt_1024``: base_lr * sqrt(global_batch / 1024) (official); ``linear_wrt_256``: base_lr * global_batch / 256;
    ``none``: base_lr as is. The learning rate warms up linearly from 0 over ``warmup_iterations``, then
    ``lr_schedule`` ``cosine`` (paper) decays it to ``min_lr`` and ``constant`` holds the peak (``min_lr`` unused; for
    runs far too short to converge, where any decay stops learning early, docs/demo-learning.md section 8). Weight decay
    and teacher momentum follow cosines over the whole run.
    """

    base_lr: float = setting(7.0711e-4, gt=0.0)  # 1e-3 at global batch 2048 with sqrt_wrt_1024 (paper, ViT-B)
    lr_scaling_rule: str = setting("sqrt_wrt_1024", choices=("sqrt_wrt_1024", "linear_wrt_256", "none"))
    lr_schedule: str = setting("cosine", choices=("cosine", "constant"))
    min_lr: float = setting(1e-6, ge=0.0)
    warmup_iterations: int = setting(100000, ge=0)
    weight_decay_start: float = setting(0.04, ge=0.0)
    weight_decay_end: float = setting(0.2, ge=0.0)
    teacher_momentum_start: float = setting(0.994, ge=0.0, le=1.0)
    teacher_momentum_end: float = setting(1.0, ge=0.0, le=1.0)
    clip_grad: float = 3.0  # per module (backbone, dino_head, ibot_head); <= 0 disables
    patch_embed_lr_mult: float = setting(0.2, ge=0.0)
    layerwise_decay: float = setting(1.0, gt=0.0)
    freeze_last_layer_iterations: int = setting(1250, ge=0)
    adamw_betas: list[float] = setting(factory=lambda: [0.9, 0.999], ge=0.0, lt=1.0)


@dataclass
class RunConfig:
    """Length, batch, precision and bookkeeping of the run (the ``train`` section).

    Batch precedence: when ``global_batch_size`` is set it wins and each device gets global_batch_size / world_size
    (which must divide); otherwise the global batch is batch_size_per_device * world_size.
    ``precision``: ``auto`` = bf16 autocast on CUDA devices that support it, fp32 otherwise (CPU always fp32).
    """

    batch_size_per_device: int = setting(32, gt=0)
    global_batch_size: int | None = setting(None, gt=0)
    iterations: int = setting(625000, gt=0)
    epoch_length: int = setting(1250, gt=0)
    seed: int = setting(0, ge=0)
    num_workers: int = setting(8, ge=0)
    precision: str = setting("auto", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = False  # torch.compile of every block and head and of the losses' cross-entropy kernels
    activation_checkpointing: bool = False
    output_dir: str = "runs/train"
    checkpoint_every: int = setting(12500, gt=0)
    log_every: int = setting(20, gt=0)
    keep_last: int = setting(3, ge=0)  # 0 keeps every checkpoint
    # single: one consolidated file per checkpoint, gathered on rank 0; sharded: a torch.distributed.checkpoint
    # folder that every rank writes its shards into; auto: sharded when the networks are sharded (FSDP)
    checkpoint_format: str = setting("auto", choices=("auto", "single", "sharded"))
    checkpoint_async: bool = False  # sharded only: write in a background thread while training goes on
    max_consecutive_nonfinite: int = setting(
        5, gt=0
    )  # stop after this many steps in a row with a non-finite loss
    tensorboard: bool = (
        False  # also write TensorBoard events to <run>/tensorboard (needs the tensorboard extra)
    )


@dataclass
class DataConfig:
    """Training images. ``kind=auto`` infers the layout from ``path`` (folder, ImageFolder tree, file list, shards)."""

    path: str | None = None
    kind: str = setting("auto", choices=("auto", "folder", "imagefolder", "filelist", "webdataset"))


@dataclass
class DistributedConfig:
    """Multi-process training. ``fsdp`` shards parameters (reshard_after_forward false = SHARD_GRAD_OP, official)."""

    strategy: str = setting("ddp", choices=("ddp", "fsdp"))
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"))  # nccl on CUDA, gloo on CPU
    fsdp_reshard_after_forward: bool = False
    # where the networks are built: meta = shapes only, then each rank materialises its shards with the CPU build's
    # exact weights (no rank holds the whole model); cpu = the whole networks on every rank; auto = meta under FSDP
    # on several ranks when no pretrained weights are loaded
    init_device: str = setting("auto", choices=("auto", "meta", "cpu"))


@dataclass
class EvalConfig:
    """k-NN monitoring during training (``franca train``; :mod:`franca.apps.monitor`); ``every`` = 0 disables it.

    Every ``every`` iterations and at the end of a fit, the teacher backbone's CLS features of two ImageFolder trees
    (``train_path``, ``val_path``: ``ROOT/<class>/<image>``, the same class folders) are extracted at ``image_size``
    (center crop; null: ``crops.global_size``) and the weighted k-NN top-1 / top-5 (percent) of the val images is
    logged: a ``metrics.jsonl`` record ``{"iteration", "knn_top1", "knn_top5", "knn_time_s"}`` and a log line.
    ``max_images_per_split`` (null: all) keeps an evenly spaced subset of each split, to bound the time of a pass.
    """

    every: int = setting(0, ge=0)
    train_path: str | None = None
    val_path: str | None = None
    knn_k: int = setting(20, gt=0)
    knn_temperature: float = setting(0.07, gt=0.0)
    image_size: int | None = setting(None, gt=0)
    max_images_per_split: int | None = setting(None, gt=0)
    batch_size: int = setting(64, gt=0)
    num_workers: int = setting(4, ge=0)


@dataclass
class TrainConfig:
    """The whole pre-training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------- schema


def _schema(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Map every full key ("optim.base_lr") to its annotated type, sections ("optim") to their dataclass."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        key = f"{prefix}{item.name}"
        kind = hints[item.name]
        keys[key] = kind
        if dataclasses.is_dataclass(kind):
            keys.update(_schema(kind, f"{key}."))
    return keys


SCHEMA: dict[str, Any] = _schema()


def _type_name(kind: Any) -> str:
    if dataclasses.is_dataclass(kind):
        return "section"
    if isinstance(kind, type):
        return kind.__name__
    return str(kind).replace("typing.", "")


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_keys(node: DictConfig | Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Raise ConfigError for keys absent from the schema and for sections given as plain values (or vice versa)."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
    for raw_key, value in items:
        key = f"{prefix}{raw_key}"
        if key not in SCHEMA:
            while isinstance(value, DictConfig | Mapping) and len(value) > 0:  # name the first leaf under it
                first = next(iter(value.keys()))
                key, value = f"{key}.{first}", value[first]
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, list(SCHEMA))} in {source}")
        kind = SCHEMA[key]
        is_mapping = isinstance(value, DictConfig | Mapping)
        if dataclasses.is_dataclass(kind):
            if value is None:
                continue  # "section: null" (an empty YAML section) changes nothing
            if not is_mapping:
                example = next(k for k in SCHEMA if k.startswith(f"{key}."))
                raise ConfigError(
                    f"config key '{key}' is a section, not a value: set its keys instead (e.g. '{example}=...') "
                    f"in {source}"
                )
            _check_keys(value, source, f"{key}.")
        elif is_mapping:
            raise ConfigError(f"config key '{key}' expects {_type_name(kind)}, got a mapping in {source}")


def _drop_null_sections(node: DictConfig) -> None:
    for key in [k for k in node if dataclasses.is_dataclass(SCHEMA.get(str(k))) and node[k] is None]:
        del node[key]


def _missing_keys(node: DictConfig) -> list[str]:
    """Full keys whose value is ``???`` (without resolving interpolations, unlike OmegaConf.missing_keys)."""

    def walk(value: Any, prefix: str) -> list[str]:
        if isinstance(value, dict):
            return [key for name, item in value.items() for key in walk(item, f"{prefix}{name}.")]
        return [prefix[:-1]] if value == MISSING else []

    return walk(OmegaConf.to_container(node, resolve=False), "")


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    """Merge ``update`` (from ``source``) into the structured config, turning OmegaConf errors into ConfigError."""
    _check_keys(update, source)
    _drop_null_sections(update)
    try:
        merged = typing.cast(DictConfig, OmegaConf.merge(base, update))
        # OmegaConf's merge keeps the old value where the update says "???"; a preset marking a key as required
        # must make it missing again so that the user is asked for it.
        for key in _missing_keys(update):
            OmegaConf.update(merged, key, MISSING, merge=False)
        return merged
    except OmegaConfBaseException as error:
        key = str(getattr(error, "full_key", None) or "")
        try:
            value = OmegaConf.select(update, key, default=None, throw_on_missing=False) if key else None
        except OmegaConfBaseException:
            value = None
        what = f"config key '{key}' expects {_type_name(SCHEMA[key])}" if key in SCHEMA else "invalid config"
        raise ConfigError(f"{what}, got {value!r} in {source}") from None


# ------------------------------------------------------------------------------------------------- sources


def list_presets() -> list[str]:
    """Names of the presets shipped with the package (``franca/configs/*.yaml``)."""
    folder = resources.files(PRESET_PACKAGE).joinpath(PRESET_FOLDER)
    if not folder.is_dir():
        return []
    return sorted(item.name[: -len(".yaml")] for item in folder.iterdir() if item.name.endswith(".yaml"))


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or os.sep in name_or_path


def _locate(name_or_path: str, relative_to: Path | None = None) -> tuple[Any, str]:
    """Return a readable resource for a preset name or YAML path, and how to name it in messages."""
    if _looks_like_path(name_or_path) or (relative_to is None and Path(name_or_path).is_file()):
        path = Path(name_or_path).expanduser()
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; give a YAML path or a preset name")
        return path, f"'{path}'"
    presets = list_presets()
    if name_or_path not in presets:
        close = difflib.get_close_matches(name_or_path, presets, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown config preset '{name_or_path}' ({hint}presets: {', '.join(presets)}; or give a YAML path)"
        )
    resource = resources.files(PRESET_PACKAGE).joinpath(PRESET_FOLDER, f"{name_or_path}.yaml")
    return resource, f"preset '{name_or_path}'"


def _read_yaml(resource: Any, source: str) -> DictConfig:
    try:
        loaded = OmegaConf.create(resource.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config {source}: {error.strerror or error}") from None
    except OmegaConfBaseException as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"config {source} is not valid YAML: {first_line}") from None
    except Exception as error:  # yaml.YAMLError and friends: report, never a stack trace
        first_line = " ".join(str(error).split())
        raise ConfigError(f"config {source} is not valid YAML: {first_line}") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(f"config {source} must be a mapping of sections (model:, optim:, ...), not a list")
    return loaded


def _file_chain(
    name_or_path: str, relative_to: Path | None = None, seen: tuple[str, ...] = ()
) -> list[tuple[DictConfig, str]]:
    """The YAML sources to merge, base first, following ``base:`` keys."""
    resource, source = _locate(name_or_path, relative_to)
    if source in seen:
        raise ConfigError(f"config {source} inherits from itself through 'base:' ({' -> '.join(seen)})")
    data = _read_yaml(resource, source)
    chain: list[tuple[DictConfig, str]] = []
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str):
            raise ConfigError(
                f"'base:' in config {source} must be a preset name or a YAML path, got {base!r}"
            )
        folder = resource.parent if isinstance(resource, Path) else None
        chain = _file_chain(base, folder, (*seen, source))
    return [*chain, (data, source)]


def _parse_override(item: str) -> DictConfig:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. 'optim.base_lr=5e-4')")
    try:
        return OmegaConf.from_dotlist([item])
    except Exception as error:  # a malformed YAML value
        raise ConfigError(f"cannot parse override '{item}': {' '.join(str(error).split())}") from None


# ---------------------------------------------------------------------------------------------------- public


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a preset (``"tiny_cpu"``) or YAML file, apply ``key=value`` overrides, validate, return a TrainConfig.

    Raises ConfigError (one line) for a missing file, unknown preset, unknown key, wrong type, invalid choice or
    a required value left as ``???``.
    """
    config = OmegaConf.structured(TrainConfig)
    for data, source in _file_chain(str(name_or_path)):
        config = _merge(config, data, source)
    return _finalise(config, overrides)


def config_from_dict(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Build a validated TrainConfig from a nested mapping (for example one stored in a checkpoint)."""
    config = _merge(OmegaConf.structured(TrainConfig), OmegaConf.create(dict(values)), "the given mapping")
    return _finalise(config, overrides)


#: Schedule lengths that follow ``train.iterations`` when an override changes it and leaves them alone:
#: (key, smallest scaled value unless the value was 0, capped at train.iterations).
SCHEDULE_LENGTHS: tuple[tuple[str, int, bool], ...] = (
    ("optim.warmup_iterations", 1, True),
    ("optim.freeze_last_layer_iterations", 0, True),
    ("loss.teacher_temp_warmup_iterations", 1, False),
)


def _scale_schedules(config: DictConfig, before: Any, overridden: set[str]) -> DictConfig:
    """Scale the schedule lengths by the new/old ``train.iterations`` ratio, keeping the preset's proportions.

    Only when an override changed ``train.iterations`` and did not set the length itself; logs one line naming
    every length it changed. A length set explicitly is left as given (and validated against the iterations).
    """
    after = OmegaConf.select(config, "train.iterations", throw_on_missing=False)
    if "train.iterations" not in overridden or not isinstance(before, int) or not isinstance(after, int):
        return config
    if after == before or before < 1 or after < 1:
        return config
    changed = []
    for key, floor, capped in SCHEDULE_LENGTHS:
        value = OmegaConf.select(config, key, throw_on_missing=False)
        if key in overridden or not isinstance(value, int) or value == 0:
            continue
        scaled = max(floor, round(value * after / before))
        scaled = min(after, scaled) if capped else scaled
        if scaled != value:
            OmegaConf.update(config, key, scaled)
            changed.append(f"{key} {value} -> {scaled}")
    if changed:
        logger.info(
            "train.iterations %d -> %d: schedule lengths scaled to keep their proportions (%s); set one "
            "explicitly to override",
            before,
            after,
            ", ".join(changed),
        )
    return config


def _finalise(config: DictConfig, overrides: Sequence[str]) -> TrainConfig:
    if isinstance(overrides, str):
        overrides = [overrides]
    iterations = OmegaConf.select(config, "train.iterations", throw_on_missing=False)
    for item in overrides:
        config = _merge(config, _parse_override(item), f"override '{item}'")
    config = _scale_schedules(config, iterations, {item.partition("=")[0].strip() for item in overrides})
    missing = sorted(_missing_keys(config))
    if missing:
        raise ConfigError(
            f"config key '{missing[0]}' is required: set it, e.g. with the override '{missing[0]}=...'"
        )
    try:
        result = OmegaConf.to_object(config)
    except MissingMandatoryValue as error:
        raise ConfigError(
            f"config key '{error.full_key}' is required: set it with '{error.full_key}=...'"
        ) from None
    except OmegaConfBaseException as error:  # a broken ${interpolation}
        key = getattr(error, "full_key", None) or "?"
        reason = (
            str(getattr(error, "msg", None) or error).strip().splitlines() or ["invalid interpolation"]
        )[0]
        raise ConfigError(f"cannot resolve config key '{key}': {reason}") from None
    assert isinstance(result, TrainConfig)
    validate_config(result)
    return result


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict of a TrainConfig (for logging and for storing in checkpoints)."""
    return typing.cast(dict, OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved configuration as YAML (``load_config(path)`` gives it back unchanged); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config)))
    path.write_text("# franca pre-training configuration (resolved)\n" + text, encoding="utf-8")
    return path


def resolve_batch_sizes(run: RunConfig, world_size: int = 1) -> tuple[int, int]:
    """Return (batch per device, global batch) for ``world_size`` processes; ``global_batch_size`` wins when set."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if run.global_batch_size is None:
        return run.batch_size_per_device, run.batch_size_per_device * world_size
    if run.global_batch_size % world_size:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({run.global_batch_size}) is not divisible by the "
            f"{world_size} processes; change it or set train.global_batch_size=null to use train.batch_size_per_device"
        )
    return run.global_batch_size // world_size, run.global_batch_size


# ------------------------------------------------------------------------------------------------ validation


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{key}' {message}")


def _rules(cls: type = TrainConfig, prefix: str = "") -> dict[str, dict[str, Any]]:
    """The :func:`setting` rules of every field, by full key ("train.checkpoint_every": {"gt": 0})."""
    rules: dict[str, dict[str, Any]] = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind):
            rules.update(_rules(kind, f"{prefix}{item.name}."))
        else:
            rules[f"{prefix}{item.name}"] = dict(item.metadata)
    return rules


_BOUNDS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def _check_value(key: str, value: Any, rules: Mapping[str, Any]) -> None:
    """Check one field's value (each element of a list) against its rules; floats must be finite."""
    for element in value if isinstance(value, (list, tuple)) else [value]:
        if element is None or isinstance(element, (bool, str)):
            if "choices" in rules and element not in rules["choices"]:
                allowed = rules["choices"]
                close = difflib.get_close_matches(str(element), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                _fail(key, f"must be one of {', '.join(allowed)}; got '{element}'{hint}")
            continue
        if isinstance(element, float) and not math.isfinite(element):
            _fail(key, f"must be a finite number, got {value}")
        for name, (holds, operator) in _BOUNDS.items():
            if name in rules and not holds(element, rules[name]):
                what = "have every value" if isinstance(value, (list, tuple)) else "be"
                _fail(key, f"must {what} {operator} {rules[name]}, got {value}")


# Value choices of the string fields, by full key (from the dataclasses' settings).
CHOICES: dict[str, tuple[str, ...]] = {
    key: rules["choices"] for key, rules in _rules().items() if "choices" in rules
}


def validate_config(config: TrainConfig) -> None:
    """Check every value against its field's :func:`setting` rules, then the rules between fields; raise
    ConfigError naming the first bad key."""
    for key, rules in _rules().items():
        section, name = key.split(".")
        _check_value(key, getattr(getattr(config, section), name), rules)
    for key in ("crops.global_scale", "crops.local_scale", "crops.blur_sigma", "masking.ratio_min_max"):
        section, name = key.split(".")
        pair = list(getattr(getattr(config, section), name))
        if len(pair) != 2 or pair[0] > pair[1]:
            _fail(key, f"must be a pair [min, max] with min <= max, got {pair}")
    jitter = list(config.crops.color_jitter)
    if len(jitter) != 4 or jitter[3] > 0.5:
        _fail(
            "crops.color_jitter",
            f"must be four strengths [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, got {jitter}",
        )
    if len(config.optim.adamw_betas) != 2:
        _fail("optim.adamw_betas", f"must be two numbers in [0, 1), got {list(config.optim.adamw_betas)}")

    patch = config.model.patch_size
    for key, size in {
        "model.img_size": config.model.img_size,
        "crops.global_size": config.crops.global_size,
        "crops.local_size": config.crops.local_size,
    }.items():
        if size % patch:
            _fail(key, f"({size}) must be a multiple of model.patch_size ({patch})")

    total = config.train.iterations
    for key, value in {
        "optim.warmup_iterations": config.optim.warmup_iterations,
        "optim.freeze_last_layer_iterations": config.optim.freeze_last_layer_iterations,
    }.items():
        if value > total:
            _fail(key, f"({value}) must not exceed train.iterations ({total})")

    if config.distributed.init_device == "meta" and (
        config.model.pretrained_backbone or config.model.pretrained_heads
    ):
        _fail(
            "distributed.init_device",
            "is meta, but model.pretrained_backbone/pretrained_heads are set (they load during a CPU build); "
            "use cpu or auto",
        )
    _validate_heads(config)
    _validate_eval(config)


def _validate_heads(config: TrainConfig) -> None:
    levels = config.heads.levels
    if levels is not None:
        if not levels:
            _fail("heads.levels", "must list at least one fraction of the embedding width, or be null")
        if any(not 0.0 < level <= 1.0 for level in levels) or any(a >= b for a, b in zip(levels, levels[1:])):
            _fail("heads.levels", f"must be strictly increasing fractions in (0, 1], got {list(levels)}")
    resolved = config.heads.resolved_levels()
    weights = config.loss.level_weights
    if weights is not None and (len(weights) != len(resolved) or any(w < 0 for w in weights)):
        _fail(
            "loss.level_weights",
            f"must give one non-negative weight per level ({len(resolved)}), got {weights}",
        )
    embed_dim = config.model.embed_dim or ARCHITECTURES[config.model.arch]["embed_dim"]
    num_heads = config.model.num_heads or ARCHITECTURES[config.model.arch]["num_heads"]
    if embed_dim % num_heads:
        _fail("model.embed_dim", f"({embed_dim}) must be divisible by the number of heads ({num_heads})")
    for level in resolved:
        width = level * embed_dim
        if not math.isclose(width, round(width), abs_tol=1e-6) or round(width) < 1:
            _fail(
                "heads.levels",
                f"fraction {level} of the embedding width {embed_dim} is not a whole number of dims",
            )
        if int(config.heads.n_prototypes * level) < 1:
            _fail(
                "heads.n_prototypes", f"({config.heads.n_prototypes}) leaves level {level} with no prototype"
            )


def _validate_eval(config: TrainConfig) -> None:
    """With monitoring on (``eval.every`` > 0), both folders are required and the image size must suit the patch."""
    monitor = config.eval
    if monitor.every == 0:
        return
    for key in ("train_path", "val_path"):
        if not getattr(monitor, key):
            _fail(
                f"eval.{key}",
                f"is required when eval.every > 0 ({monitor.every}): give an ImageFolder tree ROOT/<class>/<image> "
                f"(the override 'eval.{key}=PATH'), or set eval.every=0",
            )
    size = monitor.image_size
    if size is not None and size % config.model.patch_size:
        _fail(
            "eval.image_size", f"({size}) must be a multiple of model.patch_size ({config.model.patch_size})"
        )
