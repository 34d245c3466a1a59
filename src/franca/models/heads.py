"""Projection / clustering heads: the nested Matryoshka head of Franca and the single DINOv2 head.

Both heads map backbone tokens ``[..., d]`` to prototype logits and return a *list* of logit tensors, one per
nesting level (a one-element list for :class:`DINOHead`), so the training loop treats them alike.

Key layout (what official checkpoints hold, see the method document section 1):

- Matryoshka (``slice`` / ``project``): ``matryoshka_projections.{j}.{weight,bias}``,
  ``mlps.{j}.{0,2,4}.{weight,bias}`` and ``last_layers.{j}.weight_g [K_j, 1]`` / ``.weight_v [K_j, bottleneck]``.
- DINOv2 head: ``mlp.{0,2,4}.{weight,bias}`` and ``last_layer.weight_g`` / ``.weight_v``.

The modules here use the new ``torch.nn.utils.parametrizations.weight_norm`` API, whose parameters are named
``parametrizations.weight.original0`` (g) and ``.original1`` (v). That API installs a load_state_dict pre-hook that
renames the old ``weight_g`` / ``weight_v`` keys, so official state dicts load directly;
:func:`heads_state_dict_official` writes the old names back so a head round-trips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from franca.core.errors import CheckpointError, ConfigError
from franca.models.files import read_state_dict
from franca.models.state import check_tensors, warn_non_finite

__all__ = [
    "MATRYOSHKA_MODES",
    "DINOHead",
    "MatryoshkaHead",
    "default_matryoshka_levels",
    "head_from_state_dict",
    "heads_state_dict_official",
    "load_heads",
    "matryoshka_prototype_counts",
]

MATRYOSHKA_MODES = ("slice", "project", "tied")

# New-API parameter names of a weight-normalised layer and their old (official checkpoint) names.
_NEW_G, _NEW_V = "parametrizations.weight.original0", "parametrizations.weight.original1"
_OLD_G, _OLD_V = "weight_g", "weight_v"


# --------------------------------------------------------------------------------------------------------------
# Level / prototype helpers
# --------------------------------------------------------------------------------------------------------------
def default_matryoshka_levels(in_dim: int) -> list[int]:
    """Return the official nesting widths ``[d/16, d/8, d/4, d/2, d]`` for an embedding width ``d``.

    Raises ConfigError when ``d`` is not a positive multiple of 16 (the widths would not be integers).
    """
    if in_dim <= 0 or in_dim % 16 != 0:
        raise ConfigError(
            f"head in_dim={in_dim}: the default Matryoshka levels [d/16 .. d] need d to be a multiple of 16; "
            "pass explicit levels"
        )
    return [in_dim // 16, in_dim // 8, in_dim // 4, in_dim // 2, in_dim]


def _validate_levels(in_dim: int, levels: Sequence[int]) -> list[int]:
    """Check nesting widths: positive ints, strictly increasing, each at most ``in_dim`` and dividing it."""
    widths = [int(m) for m in levels]
    if not widths:
        raise ConfigError("head levels: the list of Matryoshka widths is empty; give at least one width")
    for m, raw in zip(widths, levels):
        if m != raw or m <= 0:
            raise ConfigError(f"head levels: width {raw!r} is not a positive integer")
        if m > in_dim:
            raise ConfigError(f"head levels: width {m} exceeds the embedding width d={in_dim}")
        if in_dim % m != 0:
            raise ConfigError(f"head levels: width {m} does not divide the embedding width d={in_dim}")
    if any(b <= a for a, b in zip(widths, widths[1:])):
        raise ConfigError(f"head levels: widths {widths} must be strictly increasing (smallest first)")
    return widths


def matryoshka_prototype_counts(levels: Sequence[int], n_prototypes: int) -> list[int]:
    """Prototype count per level: ``K_j = int(n_prototypes * (m_j / m_max))``, so the largest level gets all.

    This is the official expression (float ratio first, then ``int``), so counts match official checkpoints
    exactly; with the default levels it is ``n * m_j / d``. Computed without building any layer. Example:
    levels ``[48, 96, 192, 384, 768]`` and 131072 prototypes give ``[8192, 16384, 32768, 65536, 131072]``.
    Raises ConfigError when a level would get no prototype.
    """
    widths = [int(m) for m in levels]
    if not widths or n_prototypes <= 0:
        raise ConfigError(f"head: need at least one level and n_prototypes > 0 (got {n_prototypes})")
    largest = max(widths)
    counts = [int(n_prototypes * (m / largest)) for m in widths]
    if min(counts) < 1:
        raise ConfigError(
            f"head n_prototypes={n_prototypes}: level width {min(widths)} would get no prototype; "
            "raise n_prototypes"
        )
    return counts


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------
def _build_mlp(
    nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int, trailing_gelu: bool
) -> nn.Module:
    """DINOv2 ``_build_mlp``: Linear(in->hidden)-GELU-[Linear(hidden->hidden)-GELU]*(n-2)-Linear(hidden->bottleneck).

    ``nlayers == 1`` is a bare Linear(in->bottleneck) (key ``weight``, not ``0.weight``), as in DINOv2 and the
    official MRL head. ``trailing_gelu`` appends the GELU after the last Linear that the official MRL head has
    (only for ``nlayers >= 2``, as there).
    """
    if nlayers < 1:
        raise ConfigError(f"head nlayers={nlayers}: need at least 1 layer")
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    if trailing_gelu:
        layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _prototype_layer(bottleneck_dim: int, n_prototypes: int) -> nn.Linear:
    """Weight-normalised Linear(bottleneck -> K, no bias) (new parametrisation API), g filled with 1 later."""
    return weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False), name="weight", dim=0)


HEAD_INITS = ("official", "fan_in")


def _init_linear_weights(module: nn.Module, scheme: str = "official") -> None:
    """Trunc-normal init of every Linear weight (v for weight-normalised ones), zero biases, g left alone.

    ``official``: std 0.02 everywhere (the official code). ``fan_in``: std 1/sqrt(fan_in), which is what 0.02 amounts
    to for the official 2048-wide hidden layers, but keeps the logits of narrow (CPU-sized) heads from starting
    ~1e-5 wide, where the Sinkhorn-Knopp targets are exactly uniform and training stays at ln K.
    """
    if scheme not in HEAD_INITS:
        raise ConfigError(f"head init {scheme!r} is unknown; use one of {', '.join(HEAD_INITS)}")
    for sub in module.modules():
        if not isinstance(sub, nn.Linear):
            continue
        if hasattr(sub, "parametrizations") and "weight" in sub.parametrizations:
            weight = sub.parametrizations.weight.original1
        else:
            weight = sub.weight
        std = 0.02 if scheme == "official" else weight.shape[1] ** -0.5
        nn.init.trunc_normal_(weight, std=std)  # looked up at call time (meta-device builds record it)
        if sub.bias is not None:
            nn.init.zeros_(sub.bias)


def _fill_g_with_one(layer: nn.Linear) -> None:
    """Set the weight-norm magnitude g of every prototype to 1 (the official init)."""
    with torch.no_grad():
        layer.parametrizations.weight.original0.fill_(1.0)


# --------------------------------------------------------------------------------------------------------------
# Matryoshka head
# --------------------------------------------------------------------------------------------------------------
class MatryoshkaHead(nn.Module):
    """Nested Matryoshka projection + clustering head (Franca, method section 2.2).

    For each nesting width ``m_j`` (smallest first, ``levels`` as absolute widths, default ``[d/16..d]``) the head
    produces logits over ``K_j = int(n_prototypes * m_j / m_max)`` prototypes (``n_prototypes`` is the count of the
    largest level). Per level: projection -> MLP (Linear-GELU-Linear-GELU-Linear-GELU for ``nlayers=3``, the
    trailing GELU is official) -> weight-normalised prototypes (no bias, ``g`` initialised to 1 and trainable).
    There is **no** L2 normalisation of the bottleneck, so logits scale with it (official behaviour).

    Modes:

    - ``"slice"`` (default; paper and later official code): level j takes ``x[..., :m_j]`` and applies
      ``matryoshka_projections.{j}`` = Linear(m_j -> m_j), so level j only sees the first ``m_j`` dims.
    - ``"project"`` (v1.0.0 official code): ``matryoshka_projections.{j}`` = Linear(d -> m_j) on the full token.
    - ``"tied"`` (efficient-Matryoshka style; one head whose weights are nested sub-blocks of the largest level):

      * ``matryoshka_projection`` = Linear(m_max -> m_max) [weight P, bias b]; level j uses the top-left block
        ``P[:m_j, :m_j]`` and ``b[:m_j]`` on ``x[..., :m_j]``;
      * the MLP's first Linear(m_max -> hidden) [W1] is sliced by input columns: level j uses ``W1[:, :m_j]`` and
        the full bias; every later MLP layer is shared unchanged by all levels;
      * one prototype layer of ``n_prototypes`` rows (weight-normalised per row, so slicing rows does not change
        the normalisation); level j uses the first ``K_j`` normalised rows (``g[:K_j] * v[:K_j] / ||v[:K_j]||``).

      The largest level is therefore exactly a slice-mode level, and the head holds the parameters of a single
      level (about half of slice mode for the default five levels, dominated by the prototypes). Level j still
      only depends on ``x[..., :m_j]``. The widths are stored in the persistent buffer ``nesting_widths`` so
      that a saved tied head can be rebuilt from its state dict.

    Args:
        in_dim: backbone embedding width d.
        levels: nesting widths (absolute, strictly increasing, each dividing d); default ``[d/16, .., d]``.
        n_prototypes: prototype count of the largest level.
        hidden_dim / bottleneck_dim / nlayers: MLP shape (``nlayers=1`` is a single Linear(m -> bottleneck) with no
            GELU, the DINOv2 convention).
        mode: ``"slice"``, ``"project"`` or ``"tied"``.

    ``forward(x [..., d]) -> list[Tensor [..., K_j]]``, smallest level first. Parameter names contain
    ``last_layer`` for every prototype tensor, so a "freeze the last layer" rule matching that substring works.
    """

    def __init__(
        self,
        in_dim: int,
        levels: Sequence[int] | None = None,
        n_prototypes: int = 131072,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 384,
        nlayers: int = 3,
        mode: str = "slice",
        normalize_bottleneck: bool = False,
        init: str = "official",
    ) -> None:
        super().__init__()
        if mode not in MATRYOSHKA_MODES:
            raise ConfigError(f"head mode={mode!r} is unknown; use one of {', '.join(MATRYOSHKA_MODES)}")
        if in_dim <= 0:
            raise ConfigError(f"head in_dim={in_dim} must be positive")
        self.in_dim = int(in_dim)
        self.levels = _validate_levels(
            self.in_dim, default_matryoshka_levels(in_dim) if levels is None else levels
        )
        self.prototype_counts = matryoshka_prototype_counts(self.levels, n_prototypes)
        self.n_prototypes = self.prototype_counts[-1]
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.nlayers = int(nlayers)
        self.mode = mode
        # Not the official head: DINOv2's L2 normalisation of the bottleneck, per level (an option for small runs,
        # where the unbounded official logits start ~1e-3 wide and the predictions stay uniform).
        self.normalize_bottleneck = bool(normalize_bottleneck)

        if mode == "tied":
            widest = self.levels[-1]
            self.matryoshka_projection = nn.Linear(widest, widest)
            self.mlp = _build_mlp(nlayers, widest, hidden_dim, bottleneck_dim, trailing_gelu=True)
            self.last_layer = _prototype_layer(bottleneck_dim, self.n_prototypes)
            # filled in place from CPU data, so that a meta-device build records the values
            widths = torch.empty(len(self.levels), dtype=torch.long)
            self.register_buffer("nesting_widths", widths.copy_(torch.tensor(self.levels, device="cpu")))
            prototype_layers = [self.last_layer]
        else:
            self.matryoshka_projections = nn.ModuleList(
                nn.Linear(m if mode == "slice" else self.in_dim, m) for m in self.levels
            )
            self.mlps = nn.ModuleList(
                _build_mlp(nlayers, m, hidden_dim, bottleneck_dim, trailing_gelu=True) for m in self.levels
            )
            self.last_layers = nn.ModuleList(
                _prototype_layer(bottleneck_dim, k) for k in self.prototype_counts
            )
            prototype_layers = list(self.last_layers)
        _init_linear_weights(self, init)
        for layer in prototype_layers:
            _fill_g_with_one(layer)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Map tokens ``x [..., d]`` to per-level logits ``[..., K_j]`` (smallest level first)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"MatryoshkaHead expects tokens of width {self.in_dim}, got shape {tuple(x.shape)}"
            )
        if self.mode == "tied":
            return self._forward_tied(x)
        outputs = []
        for j, m in enumerate(self.levels):
            h = self.matryoshka_projections[j](x[..., :m] if self.mode == "slice" else x)
            outputs.append(self.last_layers[j](self._bottleneck(self.mlps[j](h))))
        return outputs

    def _bottleneck(self, h: Tensor) -> Tensor:
        if not self.normalize_bottleneck:
            return h
        return F.normalize(h, dim=-1, p=2, eps=1e-6 if h.dtype == torch.float16 else 1e-12)

    def _forward_tied(self, x: Tensor) -> list[Tensor]:
        """Tied mode: nested slices of one projection, one first MLP layer and one prototype matrix."""
        projection = self.matryoshka_projection
        first = self.mlp if isinstance(self.mlp, nn.Linear) else self.mlp[0]
        rest = None if isinstance(self.mlp, nn.Linear) else self.mlp[1:]
        prototypes = self.last_layer.weight  # [K_max, bottleneck], computed once: g * v / ||v|| per row
        outputs = []
        for m, k in zip(self.levels, self.prototype_counts):
            h = F.linear(x[..., :m], projection.weight[:m, :m], projection.bias[:m])
            h = F.linear(h, first.weight[:, :m], first.bias)
            if rest is not None:
                h = rest(h)
            outputs.append(F.linear(self._bottleneck(h), prototypes[:k]))
        return outputs

    def extra_repr(self) -> str:
        """Summary shown by ``print(head)``."""
        text = f"mode={self.mode}, in_dim={self.in_dim}, levels={self.levels}, prototypes={self.prototype_counts}"
        return text + (", normalize_bottleneck=True" if self.normalize_bottleneck else "")


# --------------------------------------------------------------------------------------------------------------
# DINOv2 head
# --------------------------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """Single DINOv2 head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    ``mlp`` = Linear(d->hidden)-GELU-Linear(hidden->hidden)-GELU-Linear(hidden->bottleneck) (no trailing GELU;
    ``nlayers=1`` is a bare Linear), then the bottleneck is L2-normalised (eps 1e-12, 1e-6 in fp16, as DINOv2),
    then ``last_layer`` = weight-normalised Linear(bottleneck -> n_prototypes, no bias) with ``g = 1``. With
    ``freeze_weight_g=True`` (default; "norm_last_layer") ``g`` stays 1 (requires_grad False), so logits are
    cosine similarities. Keys as DINOv2: ``mlp.{0,2,4}``, ``last_layer.weight_g/_v`` (old names via
    :func:`heads_state_dict_official`).

    ``forward(x [..., d]) -> [logits [..., n_prototypes]]`` (a one-element list, like :class:`MatryoshkaHead`).
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 384,
        nlayers: int = 3,
        freeze_weight_g: bool = True,
        init: str = "official",
    ) -> None:
        super().__init__()
        if in_dim <= 0 or n_prototypes <= 0:
            raise ConfigError(f"DINOHead: in_dim={in_dim} and n_prototypes={n_prototypes} must be positive")
        self.in_dim = int(in_dim)
        self.n_prototypes = int(n_prototypes)
        self.prototype_counts = [self.n_prototypes]
        self.hidden_dim = int(hidden_dim)
        self.bottleneck_dim = int(bottleneck_dim)
        self.nlayers = int(nlayers)
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim, trailing_gelu=False)
        self.last_layer = _prototype_layer(bottleneck_dim, n_prototypes)
        _init_linear_weights(self, init)
        _fill_g_with_one(self.last_layer)
        if freeze_weight_g:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Map tokens ``x [..., d]`` to ``[logits [..., n_prototypes]]``."""
        h = self.mlp(x)
        h = F.normalize(h, p=2, dim=-1, eps=1e-6 if h.dtype == torch.float16 else 1e-12)
        return [self.last_layer(h)]


# --------------------------------------------------------------------------------------------------------------
# State dicts and checkpoints
# --------------------------------------------------------------------------------------------------------------
def heads_state_dict_official(head: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """State dict of ``head`` with the official (old weight_norm) names ``*.weight_g`` / ``*.weight_v``.

    ``prefix`` (for example ``"dino_head."``) is prepended to every key. Tensors are detached copies on CPU, so
    ``{"teacher": {**heads_state_dict_official(h, "dino_head."), ...}}`` saved with torch.save reloads through
    :func:`load_heads`.
    """
    out: dict[str, Tensor] = {}
    for key, value in head.state_dict().items():
        key = key.replace(_NEW_G, _OLD_G).replace(_NEW_V, _OLD_V)
        out[prefix + key] = value.detach().cpu().clone()
    return out


def _to_new_weight_norm_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename old ``weight_g``/``weight_v`` keys to the new parametrisation names (``original0``/``original1``)."""
    renamed = {}
    for key, value in state.items():
        if key.endswith("." + _OLD_G) or key == _OLD_G:
            key = key[: -len(_OLD_G)] + _NEW_G
        elif key.endswith("." + _OLD_V) or key == _OLD_V:
            key = key[: -len(_OLD_V)] + _NEW_V
        renamed[key] = value
    return renamed


def _linear_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Sorted Sequential indices ``i`` for which ``{prefix}{i}.weight`` exists."""
    indices = []
    for key in state:
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is not None and rest.endswith(".weight") and rest[: -len(".weight")].isdigit():
            indices.append(int(rest[: -len(".weight")]))
    return sorted(indices)


def _mlp_shape(state: Mapping[str, Tensor], prefix: str, source: str) -> tuple[int, int, int, int]:
    """Infer (in_dim, hidden_dim, bottleneck_dim, nlayers) of an MLP stored under ``prefix``."""
    if f"{prefix}weight" in state:  # nlayers == 1: bare Linear
        weight = state[f"{prefix}weight"]
        return int(weight.shape[1]), 0, int(weight.shape[0]), 1
    indices = _linear_indices(state, prefix)
    if not indices or indices != list(range(0, 2 * len(indices), 2)):
        raise CheckpointError(
            f"{source}: MLP under '{prefix}' has Linear layers at {indices or 'no index'}, expected 0, 2, 4, ...; "
            "unsupported head layout (batch-norm heads are not supported)"
        )
    first, last = state[f"{prefix}0.weight"], state[f"{prefix}{indices[-1]}.weight"]
    return int(first.shape[1]), int(first.shape[0]), int(last.shape[0]), len(indices)


def _infer_embed_dim(state: Mapping[str, Tensor]) -> int | None:
    """Backbone width from backbone tensors (``cls_token [1,1,d]`` or ``norm.weight [d]``) when present."""
    for key in ("backbone.cls_token", "cls_token"):
        if key in state and state[key].ndim == 3:
            return int(state[key].shape[-1])
    for key in ("backbone.norm.weight", "norm.weight"):
        if key in state and state[key].ndim == 1:
            return int(state[key].shape[0])
    return None


def head_from_state_dict(
    state: Mapping[str, Tensor],
    source: str = "<state dict>",
    embed_dim: int | None = None,
    key_prefix: str = "",
) -> nn.Module:
    """Build a head (MatryoshkaHead or DINOHead) from its un-prefixed state dict, inferring every size from shapes.

    Layouts recognised: ``matryoshka_projections.{j}`` (slice if each weight is ``[m_j, m_j]``, project if
    ``[m_j, d]``), ``matryoshka_projection`` + ``nesting_widths`` (tied) and ``mlp`` + ``last_layer`` (DINOHead).
    Old (``weight_g``/``weight_v``) and new weight-norm names are both accepted. ``embed_dim`` sets d for a
    slice or tied head (default: the largest width). Raises CheckpointError naming ``source`` on an unknown or
    inconsistent layout, and the tensor (as ``key_prefix`` + its name in ``state``) of a wrong rank or shape.
    """
    renamed = _to_new_weight_norm_names(state)
    # the names the file uses, for messages
    names = {new: key_prefix + old for old, new in zip(state, renamed)}
    _check_ranks(renamed, source, names)
    try:
        if "matryoshka_projections.0.weight" in renamed:
            head = _matryoshka_from_state(renamed, source, embed_dim)
        elif "matryoshka_projection.weight" in renamed:
            head = _tied_from_state(renamed, source, embed_dim)
        elif f"last_layer.{_NEW_V}" in renamed:
            in_dim, hidden, bottleneck, nlayers = _mlp_shape(renamed, "mlp.", source)
            n_prototypes = int(renamed[f"last_layer.{_NEW_V}"].shape[0])
            head = DINOHead(in_dim, n_prototypes, hidden or 2048, bottleneck, nlayers)
        else:
            raise CheckpointError(
                f"{source}: no head tensors found (expected matryoshka_projections.*, matryoshka_projection.* or "
                "mlp.* + last_layer.*)"
            )
    except ConfigError as exc:
        raise CheckpointError(f"{source}: head shapes are inconsistent: {exc}") from exc
    missing_names = {key: _official_name(key) for key in head.state_dict() if key not in names}
    expected = {key: tuple(value.shape) for key, value in head.state_dict().items()}
    check_tensors(renamed, expected, source, "the inferred head", {**missing_names, **names})
    head.load_state_dict(renamed, strict=True)  # keys and shapes were checked above
    return head


def _expected_rank(key: str) -> int | None:
    """Dimensions of a head tensor by its (new weight-norm) name: Linear weights and prototypes 2, biases and
    ``nesting_widths`` 1; ``None`` for a name no head has."""
    if key.endswith((".weight", _NEW_G, _NEW_V)):
        return 2
    if key.endswith(".bias") or key == "nesting_widths":
        return 1
    return None


def _check_ranks(state: Mapping[str, Tensor], source: str, names: Mapping[str, str]) -> None:
    """One CheckpointError line naming the first tensor whose number of dimensions no head layer has."""
    for key, value in state.items():
        rank = _expected_rank(key)
        if rank is not None and value.ndim != rank:
            raise CheckpointError(
                f"{source}: tensor {names.get(key, key)!r} has shape {list(value.shape)}, expected {rank} dimensions; "
                "the heads file is corrupt or edited: save or download it again"
            )


def _official_name(key: str) -> str:
    """``key`` with the old weight-norm names (``weight_g``/``weight_v``) that official files use."""
    return key.replace(_NEW_G, _OLD_G).replace(_NEW_V, _OLD_V)


def _matryoshka_from_state(state: Mapping[str, Tensor], source: str, embed_dim: int | None) -> MatryoshkaHead:
    """Infer a slice/project MatryoshkaHead from ``matryoshka_projections.{j}`` / ``mlps.{j}`` / ``last_layers.{j}``."""
    level_indices = _linear_indices(state, "matryoshka_projections.")
    if level_indices != list(range(len(level_indices))):
        raise CheckpointError(f"{source}: matryoshka_projections indices {level_indices} are not 0..n-1")
    projections = [state[f"matryoshka_projections.{j}.weight"] for j in level_indices]
    levels = [int(w.shape[0]) for w in projections]
    inputs = {int(w.shape[1]) for w in projections}
    mode = "slice" if all(w.shape[0] == w.shape[1] for w in projections) else "project"
    if mode == "project":
        if len(inputs) != 1:
            raise CheckpointError(
                f"{source}: matryoshka_projections take different input widths {sorted(inputs)}"
            )
        in_dim = inputs.pop()
    else:
        in_dim = embed_dim if embed_dim is not None else max(levels)
    if embed_dim is not None and in_dim != embed_dim:
        raise CheckpointError(
            f"{source}: head input width {in_dim} differs from the backbone width {embed_dim}"
        )
    shapes = [_mlp_shape(state, f"mlps.{j}.", source) for j in range(len(levels))]
    if len({s[1:] for s in shapes}) != 1:
        raise CheckpointError(f"{source}: per-level MLPs differ in hidden/bottleneck/depth: {shapes}")
    _, hidden, bottleneck, nlayers = shapes[0]
    counts = []
    for j in range(len(levels)):
        key = f"last_layers.{j}.{_NEW_V}"
        if key not in state:
            raise CheckpointError(f"{source}: missing 'last_layers.{j}.weight_v' for Matryoshka level {j}")
        counts.append(int(state[key].shape[0]))
    expected = matryoshka_prototype_counts(levels, counts[-1])
    if counts != expected:
        raise CheckpointError(
            f"{source}: prototype counts {counts} are not proportional to widths {levels} (expected {expected})"
        )
    return MatryoshkaHead(in_dim, levels, counts[-1], hidden or 2048, bottleneck, nlayers, mode=mode)


def _tied_from_state(state: Mapping[str, Tensor], source: str, embed_dim: int | None) -> MatryoshkaHead:
    """Infer a tied MatryoshkaHead (widths from its ``nesting_widths`` buffer; d = embed_dim or the widest)."""
    if "nesting_widths" not in state:
        raise CheckpointError(f"{source}: tied Matryoshka head without its 'nesting_widths' tensor")
    levels = [int(m) for m in state["nesting_widths"].tolist()]
    _, hidden, bottleneck, nlayers = _mlp_shape(state, "mlp.", source)
    if f"last_layer.{_NEW_V}" not in state:
        raise CheckpointError(f"{source}: tied Matryoshka head without 'last_layer.weight_v'")
    n_prototypes = int(state[f"last_layer.{_NEW_V}"].shape[0])
    in_dim = embed_dim if embed_dim is not None else levels[-1]
    return MatryoshkaHead(in_dim, levels, n_prototypes, hidden or 2048, bottleneck, nlayers, mode="tied")


def _read_state_dict(source: Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Flat tensor dict via ``franca.models.files.read_state_dict``."""
    return dict(read_state_dict(source))


def _warn_non_finite(state: Mapping[str, Tensor], source: str) -> None:
    """``franca.models.state.warn_non_finite`` for head tensors, with the consequence for a head."""
    warn_non_finite(state, source, consequence="the head outputs will be NaN")


def _strip_wrapping_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.``/``_orig_mod.`` (DDP, torch.compile); keep only ``teacher.*`` of a flat student+teacher dict."""
    if any(k.startswith("teacher.") for k in state):
        state = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
    return {k.replace("module.", "").replace("_orig_mod.", ""): v for k, v in state.items()}


def load_heads(
    source: str | Path | Mapping[str, Tensor],
    heads: Sequence[str] = ("dino_head", "ibot_head"),
) -> dict[str, nn.Module]:
    """Build the training heads stored in a Franca (or DINOv2) checkpoint: ``{"dino_head": .., "ibot_head": ..}``.

    ``source`` is a checkpoint path or an in-memory state dict, either ``{"teacher": {...}}`` / ``{"model": {...}}``
    or flat (read with ``franca.models.files.read_state_dict``). ``module.`` / ``_orig_mod.`` are stripped. Each head is
    inferred from tensor shapes alone (levels, widths, slice/project mode, hidden/bottleneck widths, prototype
    counts, depth; DINOv2 ``mlp``/``last_layer`` heads become :class:`DINOHead`) and loaded strictly.
    ``heads`` names the families required; a missing one raises CheckpointError naming the file. Tensors holding NaN
    or inf values are loaded, with one logged warning naming them.
    """
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    state = _strip_wrapping_prefixes(
        _read_state_dict(source if isinstance(source, Mapping) else Path(source))
    )
    embed_dim = _infer_embed_dim(state)
    result: dict[str, nn.Module] = {}
    for family in heads:
        prefix = f"{family}."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise CheckpointError(
                f"{name}: no '{prefix}*' tensors; this checkpoint does not hold the {family}"
            )
        result[family] = head_from_state_dict(
            sub, source=f"{name} [{family}]", embed_dim=embed_dim, key_prefix=prefix
        )
    _warn_non_finite({k: v for k, v in state.items() if k.startswith(tuple(f"{f}." for f in heads))}, name)
    return result
