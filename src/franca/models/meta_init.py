"""Build networks on the meta device and materialise them later, shard by shard, with the weights a CPU build gives.

A ViT-g with the paper's heads is 1.4 B parameters; building the student and the teacher on every rank's CPU before
sharding them needs ~11 GB per rank (8 ranks per node: ~90 GB). Instead the networks are built on the ``meta`` device
(shapes only) while :class:`InitRecorder` writes down every in-place initialisation applied to their parameters and
buffers (``torch.nn.init.trunc_normal_``, ``kaiming_uniform_``, ``zeros_``, ..., and in-place Tensor methods such as
``fill_`` or ``copy_``), in order. After sharding (and ``to_empty``), :meth:`InitRecorder.materialize` replays that list on the CPU from the same
random state: one full tensor at a time, written into each rank's own shard and freed. The random numbers are drawn in
the same order and amounts as in the CPU build (writes that a later full overwrite makes dead are still drawn, then
dropped), so the weights equal the CPU build's exactly.

Every parameter and buffer must get its value from recorded operations starting with a full overwrite; anything else
(a tensor created from data, an operation with a tensor argument on the meta device) stops with a
:class:`MetaInitError` naming it, rather than leaving uninitialised memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from franca.core.errors import FrancaError

__all__ = ["InitRecorder", "MetaInitError"]

# in-place functions (torch.nn.init's and Tensor methods) that set every element of the tensor they are given; every
# other in-place function on a meta tensor is recorded as a modification of the current value
_OVERWRITE = (
    "uniform_", "normal_", "fill_", "zero_", "copy_", "trunc_normal_", "constant_", "ones_", "zeros_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_", "eye_", "dirac_",
)  # fmt: skip
_NOT_VALUES = ("requires_grad_", "share_memory_", "retain_grad_")  # in-place, but they change no value
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


class MetaInitError(FrancaError):
    """A network cannot be materialised from its meta-device build (the message names the tensor)."""


@dataclass
class _Op:
    storage: int  # the meta tensor's storage, which identifies the parameter or buffer (views share it)
    view: tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, size, stride of the tensor written
    dtype: torch.dtype
    func: Any  # called again as func(tensor, *args, **kwargs), or func(tensor=tensor, **kwargs)
    args: tuple
    kwargs: dict
    by_keyword: bool

    @property
    def overwrites(self) -> bool:
        return getattr(self.func, "__name__", "") in _OVERWRITE


class InitRecorder(TorchFunctionMode):
    """Records in-place initialisations of meta tensors; use around the build, then :meth:`bind` and
    :meth:`materialize`.

    Example::

        torch.manual_seed(0)
        with InitRecorder() as recorder, torch.device("meta"):
            model = build()
        recorder.bind(model)          # names every parameter and buffer while they are still the meta tensors
        ...                           # shard the model (FSDP2), model.to_empty(device=...)
        recorder.materialize(model)   # the CPU build's weights, written shard by shard
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.rng_state = torch.get_rng_state()
        self._names: dict[int, tuple[str, torch.Size, torch.dtype]] = {}
        self._live_from: dict[int, int] = {}  # per bound tensor, the index of its last full overwrite
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> InitRecorder:
        # Some torch.nn.init functions return at once for meta tensors without any tensor operation (trunc_normal_
        # in recent torch), so they are wrapped while recording; callers must look them up as torch.nn.init.<name>.
        for name in _INIT_FUNCTIONS:
            original = getattr(torch.nn.init, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(torch.nn.init, name, self._recording(original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(torch.nn.init, name, original)
        self._originals.clear()
        super().__exit__(*exc)

    def _recording(self, original: Any) -> Any:
        def init(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if not tensor.is_meta:
                return original(tensor, *args, **kwargs)
            self._record(original, tensor, args, kwargs, by_keyword=False)
            return tensor

        init.__name__ = original.__name__
        return init

    def _record(self, func: Any, target: Tensor, args: tuple, kwargs: dict, by_keyword: bool) -> None:
        name = getattr(func, "__name__", "")
        rest = tuple(_recordable(value, name) for value in args)
        recorded = {key: _recordable(value, name) for key, value in kwargs.items()}
        view = (target.storage_offset(), tuple(target.shape), tuple(target.stride()))
        storage = target.untyped_storage()._cdata
        self.ops.append(_Op(storage, view, target.dtype, func, rest, recorded, by_keyword))

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # torch.nn.init's functions arrive here whole, their tensor passed by keyword; Tensor methods positionally
        by_keyword = not args and "tensor" in kwargs
        target = kwargs["tensor"] if by_keyword else (args[0] if args else None)
        if (
            isinstance(target, Tensor)
            and target.is_meta
            and name.endswith("_")
            and not name.startswith("_")
            and name not in _NOT_VALUES
        ):
            others = {key: value for key, value in kwargs.items() if key != "tensor"}
            self._record(func, target, () if by_keyword else args[1:], others, by_keyword)
        return func(*args, **kwargs)

    def bind(self, module: nn.Module) -> None:
        """Name the meta tensors of ``module`` (parameters and buffers); call before anything replaces them."""
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if not tensor.is_meta:
                raise MetaInitError(f"{name} was not built on the meta device")
            self._names[tensor.untyped_storage()._cdata] = (name, tensor.shape, tensor.dtype)
        self._live_from = self._live_chains()
        missing = set(self._names) - set(self._live_from)
        if missing:
            names = sorted(self._names[key][0] for key in missing)
            raise MetaInitError(f"no recorded initialisation gives a value to {', '.join(names[:5])}")

    def materialize(self, module: nn.Module) -> None:
        """Write the CPU build's values into ``module``'s (already allocated, possibly sharded) tensors."""
        if not self._names:
            raise MetaInitError("InitRecorder.materialize needs bind() first")
        targets = dict((*module.named_parameters(), *module.named_buffers()))
        last = {op.storage: index for index, op in enumerate(self.ops)}
        values: dict[int, Tensor] = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.set_rng_state(self.rng_state)
            for index, op in enumerate(self.ops):
                if op.storage not in self._names or index < self._live_from[op.storage]:
                    # a tensor outside the module, or a write that a later full overwrite kills: run it on a
                    # scratch tensor all the same, so that it draws the random numbers the build drew
                    _apply(torch.empty(op.view[1], dtype=op.dtype), op)
                    continue
                name, shape, dtype = self._names[op.storage]
                full = values.setdefault(op.storage, torch.empty(shape, dtype=dtype))
                _apply(full.as_strided(op.view[1], op.view[2], op.view[0]), op)
                if index == last[op.storage]:
                    _write(targets[name], values.pop(op.storage), name)

    def _live_chains(self) -> dict[int, int]:
        """For each bound tensor, the index of its last overwrite of every element: earlier writes cannot reach its
        value (a tensor without one has no recorded value)."""
        live: dict[int, int] = {}
        for index, op in enumerate(self.ops):
            name_shape = self._names.get(op.storage)
            covers_all = name_shape is not None and op.view[1] == tuple(name_shape[1]) and op.view[0] == 0
            if op.overwrites and covers_all:
                live[op.storage] = index
        return live


def _recordable(value: Any, op_name: str) -> Any:
    if isinstance(value, Tensor):
        if value.is_meta:
            raise MetaInitError(f"{op_name} with a meta tensor argument cannot be replayed")
        return value.detach().clone()
    return value


def _apply(tensor: Tensor, op: _Op) -> None:
    if op.by_keyword:
        op.func(tensor=tensor, **op.kwargs)
    else:
        op.func(tensor, *op.args, **op.kwargs)


def _write(target: Tensor, full: Tensor, name: str) -> None:
    """Copy ``full`` (the whole tensor) into ``target``: its local shard when it is a DTensor, else all of it."""
    if target.is_meta:
        raise MetaInitError(
            f"{name} is still on the meta device: call to_empty(device=...) before materialize()"
        )
    if hasattr(target, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            full.shape, target.device_mesh, target.placements
        )
        local = target.to_local()
        if local.numel():
            local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
        return
    target.data.copy_(full)
