"""Data parallelism for the student and teacher: DDP or FSDP2, and state dicts that move across world sizes.

- ``ddp``: the student is wrapped in ``DistributedDataParallel``; the teacher is replicated.
- ``fsdp``: ``fully_shard`` (FSDP2) on every transformer block, on each head and on the root, for both networks (the
  teacher is sharded like the student so that the EMA update is a local, shard-by-shard operation). On CUDA the
  parameters are gathered in bf16 and gradients reduced in fp32.

State dicts are keyed by parameter names in two forms: *full* (consolidated on the CPU: single-file checkpoints, the
exports) and *sharded* (each rank's DTensor shards, for ``torch.distributed.checkpoint``, which reshards on load).
Either way a run saved on N ranks resumes on M ranks with either strategy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from franca.core import distributed as dist_utils
from franca.core.errors import ConfigError
from franca.models.meta_init import InitRecorder

STRATEGIES = ("ddp", "fsdp")


def _fsdp_api() -> tuple[Any, Any]:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def shard_network(
    network: nn.Module,
    device: torch.device,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = False,
) -> nn.Module:
    """Apply FSDP2 to an :class:`~franca.train.ssl_model.SSLNetwork` in place: blocks, heads, then the root.

    Each block asks FSDP2 to gather the next block's parameters while it computes (and, in the backward, the
    previous block's), so that the all-gathers overlap compute instead of waiting for it.
    """
    fully_shard, MixedPrecisionPolicy = _fsdp_api()
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype,
        reduce_dtype=torch.float32 if param_dtype is not None else None,
    )
    blocks = list(network.backbone.blocks)
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network.dino_head, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if network.ibot_head is not network.dino_head:
        fully_shard(network.ibot_head, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if hasattr(blocks[0], "set_modules_to_forward_prefetch"):  # torch >= 2.5 (explicit prefetching)
        for previous, block in zip(blocks, blocks[1:]):
            previous.set_modules_to_forward_prefetch([block])
            block.set_modules_to_backward_prefetch([previous])
    return network


def parallelize(
    student: nn.Module,
    teacher: nn.Module,
    strategy: str,
    device: torch.device,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = False,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    meta_init: InitRecorder | None = None,
) -> nn.Module:
    """Prepare both networks for training, in DINOv3's order; returns the module to call for the student forward.

    1. activation checkpointing of the student's blocks (recomputed in the backward instead of stored);
    2. ``torch.compile`` of every block and of the DINO and iBOT heads of both networks (each module's forward; a
       block's also takes the multi-crop lists), before sharding so that FSDP2's hooks stay outside the compiled
       graphs;
    3. data parallelism: FSDP2 per block and head with prefetching, or DDP (see :func:`wrap_for_training`).

    With ``meta_init`` (networks built on the meta device under that recorder), the networks are allocated on
    ``device`` and given the CPU build's weights: after sharding under FSDP (each rank allocates and writes only its
    shards), before wrapping otherwise. The teacher starts as a copy of the student, as in the CPU build.
    """
    if activation_checkpointing:
        student.backbone.set_grad_checkpointing(True)
    if compile_blocks:
        for network in (student, teacher):
            for module in (*network.backbone.blocks, network.dino_head, network.ibot_head):
                module.compile()
    sharded = strategy == "fsdp" and dist_utils.is_enabled()
    if meta_init is not None and not sharded:
        _materialize(student, teacher, meta_init, device)
    forward = wrap_for_training(student, teacher, strategy, device, param_dtype, reshard_after_forward)
    if meta_init is not None and sharded:
        _materialize(student, teacher, meta_init, device)
    return forward


def _materialize(
    student: nn.Module, teacher: nn.Module, recorder: InitRecorder, device: torch.device
) -> None:
    """Allocate both meta-built networks on ``device``, replay the student's initialisation, copy it to the teacher."""
    for network in (student, teacher):
        network.to_empty(device=device)
    recorder.materialize(student)
    with torch.no_grad():
        sources = dict((*student.named_parameters(), *student.named_buffers()))
        for name, tensor in (*teacher.named_parameters(), *teacher.named_buffers()):
            local_tensor(tensor).copy_(local_tensor(sources[name]))


def wrap_for_training(
    student: nn.Module,
    teacher: nn.Module,
    strategy: str,
    device: torch.device,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = False,
) -> nn.Module:
    """Parallelise the networks for the current process group; returns the module to call for the student forward.

    Without a process group (a plain single process) nothing is wrapped; under ``torchrun`` the strategy applies at
    every world size, one process included, so that a one-GPU run executes the same code as a cluster run.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"config key 'distributed.strategy' is {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    if not dist_utils.is_enabled():
        return student
    if strategy == "fsdp":
        shard_network(student, device, param_dtype, reshard_after_forward)
        # The teacher has no backward, which is where FSDP2 reshards modules kept gathered after forward: it must
        # reshard after every forward, or its next forward reuses the parameters gathered before the EMA update.
        shard_network(teacher, device, param_dtype, reshard_after_forward=True)
        return student
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in module.parameters())


def full_model_state(module: nn.Module) -> dict[str, Tensor]:
    """The consolidated state dict of a (possibly sharded) module on CPU; collective when sharded."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_model_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a consolidated state dict into a (possibly sharded) module."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(full_state_dict=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names, consolidated over shards (collective when sharded)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(
        module, optimizer, options=_options(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options(full_state_dict=True))


def sharded_model_state(module: nn.Module) -> dict[str, Tensor]:
    """The state dict as this rank holds it: DTensor shards under FSDP, the live tensors otherwise (no copy)."""
    if not is_sharded(module):
        return dict(module.state_dict())
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def load_sharded_model_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a :func:`sharded_model_state`-shaped dict (after ``torch.distributed.checkpoint`` filled it)."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state)


def sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names, with each rank's shards (states are created if empty)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def load_sharded_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state)
