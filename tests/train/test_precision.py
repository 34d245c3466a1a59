"""The precision settings of a GPU run, tried on the CPU with tiny models so that a dtype bug shows up here first.

- bf16 autocast in one process: fp32 losses, Sinkhorn-Knopp targets and master weights, and gradients close to fp32.
- FSDP2 with its bf16 MixedPrecisionPolicy on 2 gloo ranks: bf16 gathers, fp32 shards, gradients and reduction.
- fp16 autocast with the gradient scaler: overflowing or injected non-finite gradients skip the step and lower the scale.
- ``Block.compile()`` (``train.compile=true``) gives the eager block's outputs and gradients for multi-crop lists.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

# Helpers of the 2-rank tests next to this file (pytest puts this folder on sys.path: tests/ has no __init__.py).
from test_distributed_training import PER_RANK, TINY, WORLD_SIZE, _batch, _full, _full_batch, _init

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compilers import needs_cpp_compiler  # noqa: E402  (tests/compilers.py, beside the test folders)
from franca.models.layers import Block
from franca.ssl import DinoLoss, IBotPatchLoss, TeacherTargets, koleo_loss, sinkhorn_knopp
from franca.train.config import load_config
from franca.train.trainer import Trainer

# TINY (the paper's official head init and teacher temperatures) plus three changes without which a precision
# comparison would compare nothing:
# - layerscale 1.0 instead of tiny_cpu's 1e-5: with 1e-5 the blocks barely touch the tokens, every image gets the same
#   CLS feature up to ~5e-6 (KoLeo loss 24, gradient ~700), and those distances are below bf16's resolution;
# - the fan-in head init: with the official 0.02 the logits are ~1e-5 wide and the DINO loss is exactly log K;
# - KoLeo weight 1.0: at 0.1 the KoLeo term is 1 % of the backbone gradient, as small as the bf16 rounding, so the
#   comparison could not see it go missing; at 1.0 it is 8 % of the largest entry (11 % in L2).
PRECISION = [
    *TINY,
    "model.layerscale_init=1.0",
    "heads.init=fan_in",
    "loss.koleo_weight=1.0",
    "optim.warmup_iterations=0",
    "optim.base_lr=0.05",
]

# bf16 gradients against the fp32 gradients of the same step, per module (backbone, dino_head, ibot_head). Measured on
# this configuration (torch 2.15 CPU): the largest entry error is 0.86 / 1.12 / 0.76 % of the module's largest
# gradient entry in one process and 1.41 / 0.83 / 1.65 % under FSDP2 on 2 ranks; the module's relative L2 error is
# 0.85 / 1.01 / 0.90 % and 0.98 / 0.92 / 1.07 %. What must fail, measured with fp32 against fp32: gradients scaled
# by 1.05 (5 % on both measures), the KoLeo term left out (backbone 7.8 % largest entry, 11.3 % L2), DINO or iBOT
# left out (54-100 %), the teacher temperature 0.06 instead of 0.04 (8-21 %).
BF16_MAX_ENTRY_ERROR = 0.04
BF16_L2_ERROR = 0.03


def _config(*overrides: str):
    return load_config("tiny_cpu", [*PRECISION, *overrides])


def _grads(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: _full(p.grad) for name, p in network.named_parameters() if p.grad is not None}


def _grad_errors(
    grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Per module: (largest entry error / the module's largest reference entry, relative L2 error of the module)."""
    assert grads.keys() == reference.keys()
    modules: dict[str, list[str]] = {}
    for name in reference:
        modules.setdefault(name.split(".")[0], []).append(name)
    errors = {}
    for module, names in modules.items():
        scale = max(float(reference[n].abs().max()) for n in names)
        largest = max(float((grads[n].float() - reference[n]).abs().max()) for n in names)
        l2_error = math.sqrt(sum(float((grads[n].float() - reference[n]).pow(2).sum()) for n in names))
        l2_norm = math.sqrt(sum(float(reference[n].pow(2).sum()) for n in names))
        assert scale > 0 and l2_norm > 0, f"{module}: the reference gradient is zero"
        errors[module] = (largest / scale, l2_error / l2_norm)
    return errors


def _bf16_mismatches(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The modules whose gradients are outside the bf16 tolerance, with their errors (empty when all agree)."""
    return {
        module: errors
        for module, errors in _grad_errors(grads, reference).items()
        if errors[0] > BF16_MAX_ENTRY_ERROR or errors[1] > BF16_L2_ERROR
    }


def _record_loss_calls(trainer: Trainer) -> list[tuple[tuple, Any]]:
    """Every FrancaLoss call of ``trainer``: its arguments (student out, teacher out, batch, temperature), its result."""
    calls: list[tuple[tuple, Any]] = []
    trainer.loss_fn.register_forward_hook(lambda module, args, output: calls.append((args, output)))
    return calls


def _logits(outputs: dict[str, Any]) -> list[torch.Tensor]:
    return [*outputs["cls"], *outputs["patch"]]


def _check_loss_call(call: tuple[tuple, Any], autocast_dtype: torch.dtype) -> None:
    """The heads ran in ``autocast_dtype`` (else nothing below tests a low precision) and every loss is fp32."""
    (student_out, teacher_out, *_), losses = call
    assert {t.dtype for t in _logits(student_out)} == {autocast_dtype}
    assert {t.dtype for t in _logits(teacher_out)} == {autocast_dtype}
    values = {
        "total": losses.total,
        "dino": losses.dino,
        "ibot": losses.ibot,
        "koleo": losses.koleo,
        **{f"dino_level{j}": v for j, v in enumerate(losses.dino_levels)},
        **{f"ibot_level{j}": v for j, v in enumerate(losses.ibot_levels)},
    }
    for name, value in values.items():
        assert value.dtype == torch.float32, f"{name} loss is {value.dtype}"
        assert torch.isfinite(value), f"{name} loss is {float(value)}"
    assert losses.total.requires_grad


def _master_dtypes(trainer: Trainer) -> None:
    for name, p in trainer.student.named_parameters():
        assert p.dtype == torch.float32, f"student {name} is {p.dtype}"
        assert p.grad is None or p.grad.dtype == torch.float32, f"gradient of {name} is {p.grad.dtype}"
    for name, p in trainer.teacher.named_parameters():
        assert p.dtype == torch.float32, f"teacher {name} is {p.dtype}"


def _snapshot(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in network.named_parameters()}


def _changed(network: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, p in network.named_parameters() if not torch.equal(p.detach(), before[name])]


# ----------------------------------------------------------------------------------------------------- bf16, 1 process
def test_bf16_step_keeps_fp32_losses_and_master_weights_and_matches_fp32(tmp_path: Path) -> None:
    batch = _batch(_full_batch(PER_RANK), slice(None))
    reference = Trainer(
        _config("train.precision=fp32", f"train.batch_size_per_device={PER_RANK}"), tmp_path / "fp32"
    )
    reference_logs, ok = reference.forward_backward(batch)
    assert ok and reference.autocast_dtype is None
    reference_grads = _grads(reference.student)
    assert len(reference_grads) > 50

    trainer = Trainer(
        _config("train.precision=bf16", f"train.batch_size_per_device={PER_RANK}"), tmp_path / "bf16"
    )
    assert trainer.autocast_dtype == torch.bfloat16
    calls = _record_loss_calls(trainer)
    logs, ok = trainer.forward_backward(batch)
    assert ok and len(calls) == 1
    _check_loss_call(calls[0], torch.bfloat16)
    # bf16 rounding moves these by at most 0.1 % (KoLeo; measured), a wrong term or weight by far more
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
        assert logs[key] == pytest.approx(reference_logs[key], rel=5e-3), key
    _master_dtypes(trainer)
    grads = _grads(trainer.student)
    assert grads.keys() == reference_grads.keys()
    assert not _bf16_mismatches(grads, reference_grads), _grad_errors(grads, reference_grads)

    # the tolerance is tight enough to see a 5 % scale error or the KoLeo term going missing
    assert _bf16_mismatches({n: 1.05 * g for n, g in reference_grads.items()}, reference_grads).keys() == {
        "backbone",
        "dino_head",
        "ibot_head",
    }
    no_koleo = Trainer(
        _config("train.precision=fp32", f"train.batch_size_per_device={PER_RANK}", "loss.koleo_weight=0.0"),
        tmp_path / "no_koleo",
    )
    assert no_koleo.forward_backward(batch)[1]
    assert "backbone" in _bf16_mismatches(_grads(no_koleo.student), reference_grads)

    # the whole step: clipping, AdamW and the EMA keep fp32 weights and optimizer state
    trainer.optimizer.zero_grad(set_to_none=True)
    student_before, teacher_before = _snapshot(trainer.student), _snapshot(trainer.teacher)
    logs = trainer.train_step(batch)
    assert not logs.get("skipped_nonfinite") and math.isfinite(logs["loss"])
    assert len(calls) == 2
    _check_loss_call(calls[1], torch.bfloat16)
    assert len(_changed(trainer.student, student_before)) == len(student_before)
    assert _changed(trainer.teacher, teacher_before)
    _master_dtypes(trainer)
    for state in trainer.optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32
            assert torch.isfinite(state[key]).all()


# ------------------------------------------------------------------------- Sinkhorn-Knopp and the losses under autocast
def _sinkhorn_reference(logits: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """The official Sinkhorn-Knopp (prototype rows, then sample columns) in float64."""
    q = torch.exp(logits.double() / temperature).t()
    q /= q.sum()
    n_prototypes, n_samples = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    return (q * n_samples).t()


def _cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum_k t_k log softmax(s / T)_k per row, in float64."""
    return -(teacher.double() * torch.log_softmax(student.double() / temperature, dim=-1)).sum(dim=-1)


def _koleo_reference(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = F.normalize(features.double(), dim=-1, eps=eps)
    similarity = x @ x.t()
    similarity.fill_diagonal_(-math.inf)
    neighbour = similarity.argmax(dim=1)
    return -torch.log((x - x[neighbour]).norm(dim=-1) + eps).mean()


def test_sinkhorn_targets_and_losses_compute_in_fp32_from_bf16_inputs() -> None:
    generator = torch.Generator().manual_seed(5)
    batch, n_local, prototypes, student_temp, teacher_temp = 6, 2, 48, 0.1, 0.04
    teacher_logits = (3 * torch.randn(2 * batch, prototypes, generator=generator)).bfloat16()
    patch_logits = (3 * torch.randn(10, prototypes, generator=generator)).bfloat16()
    student_global = (3 * torch.randn(2, batch, prototypes, generator=generator)).bfloat16()
    student_local = (3 * torch.randn(n_local, batch, prototypes, generator=generator)).bfloat16()
    student_patch = (3 * torch.randn(10, prototypes, generator=generator)).bfloat16()
    weights = torch.rand(10, generator=generator) + 0.1
    features = torch.randn(batch, 32, generator=generator).bfloat16()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        # autocast is on: a plain fp32 matmul here runs in bf16
        assert torch.mm(teacher_logits.float(), teacher_logits.float().t()).dtype == torch.bfloat16
        targets = sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3)
        (level_targets,) = TeacherTargets("sinkhorn", [prototypes], 0.9, 3)([teacher_logits], teacher_temp)
        patch_targets = sinkhorn_knopp(patch_logits, teacher_temp, n_iterations=3)
        dino = DinoLoss(student_temp)(student_global, student_local, targets.view(2, batch, prototypes))
        ibot = IBotPatchLoss(student_temp)(student_patch, patch_targets, weights, n_global_crops=2 * batch)
        koleo = koleo_loss(features)

    # fp32 targets whose rows sum to 1: bf16 arithmetic (8 bits of mantissa) would miss by ~1e-3
    for name, value in (
        ("targets", targets),
        ("level targets", level_targets),
        ("patch targets", patch_targets),
    ):
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.sum(dim=1), torch.ones(len(value)), rtol=0, atol=2e-6, msg=name)
    expected = _sinkhorn_reference(teacher_logits, teacher_temp, 3)
    torch.testing.assert_close(targets.double(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(level_targets, targets, rtol=0, atol=0)
    expected_patch = _sinkhorn_reference(patch_logits, teacher_temp, 3)
    torch.testing.assert_close(patch_targets.double(), expected_patch, rtol=1e-4, atol=1e-7)

    # the losses of the same bf16 values, in float64
    t = targets.view(2, batch, prototypes)
    dino_terms = sum(_cross_entropy(student_global[v], t[1 - v], student_temp).mean() for v in range(2))
    dino_terms += sum(
        _cross_entropy(student_local[i], t[v], student_temp).mean() for i in range(n_local) for v in range(2)
    )
    expected_dino = dino_terms / (2 + 2 * n_local)
    expected_ibot = (_cross_entropy(student_patch, patch_targets, student_temp) * weights.double()).sum() / (
        2 * batch
    )
    for name, value, reference in (
        ("dino", dino.total, expected_dino),
        ("ibot", ibot.total, expected_ibot),
        ("koleo", koleo, _koleo_reference(features)),
    ):
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), reference, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------- FSDP2 bf16, 2 gloo ranks
def _fsdp_config(batch: int, precision: str, strategy: str):
    return _config(
        f"train.precision={precision}",
        f"distributed.strategy={strategy}",
        f"train.batch_size_per_device={batch}",
        # KoLeo's neighbours are per rank: without it the 2-rank step is the single-process step of the doubled batch
        "loss.koleo_weight=0.0",
        # a teacher that moves half-way to the student, so that one EMA update shows in its bf16 logits
        "optim.teacher_momentum_start=0.5",
        "optim.teacher_momentum_end=0.5",
    )


def _record_collectives(records: list[tuple[str, torch.dtype]]) -> None:
    """Record the dtype of what FSDP2 gathers and reduce-scatters (it calls these through ``torch.distributed``)."""
    for name in (
        "all_gather_single",
        "all_gather_into_tensor",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
    ):
        original = getattr(dist, name, None)
        if original is None:
            continue

        def recording(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            tensor = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
            records.append((_name, tensor.dtype))
            return _original(*args, **kwargs)

        setattr(dist, name, recording)


def _teacher_cls_logits(trainer: Trainer, batch) -> torch.Tensor:
    """The teacher forward of :meth:`Trainer.forward_backward` (no grad, autocast, root resharded after it)."""
    with torch.no_grad(), trainer.autocast():
        logits = trainer.teacher(batch, teacher=True)["cls"][-1].float()
    trainer.teacher.reshard()
    return logits


def _reshard_everything(network: torch.nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:
        data = _full_batch(WORLD_SIZE * PER_RANK)
        mine = _batch(data, slice(rank * PER_RANK, (rank + 1) * PER_RANK))
        trainer = Trainer(_fsdp_config(PER_RANK, "bf16", "fsdp"), Path(out_dir) / "fsdp", progress=False)
        qkv = trainer.student.backbone.blocks[0].attn.qkv
        forward_weights: list[tuple[str, torch.dtype, tuple[int, ...], torch.dtype]] = []
        qkv.register_forward_pre_hook(
            lambda module, args: forward_weights.append(
                (type(module.weight).__name__, module.weight.dtype, tuple(module.weight.shape), args[0].dtype)
            )
        )
        collectives: list[tuple[str, torch.dtype]] = []
        _record_collectives(collectives)
        logs, ok = trainer.forward_backward(mine)
        parameters = dict(trainer.student.named_parameters())
        facts: dict[str, Any] = {
            "ok": ok,
            "loss": logs["loss"],
            "forward_weights": forward_weights,
            "collectives": collectives,
            "qkv_shard": (type(qkv.weight).__name__, tuple(qkv.weight.to_local().shape)),
            "param_types": {type(p).__name__ for p in parameters.values()},
            "shard_dtypes": {n: p.to_local().dtype for n, p in parameters.items()},
            "grad_dtypes": {n: p.grad.to_local().dtype for n, p in parameters.items() if p.grad is not None},
            "grads": _grads(trainer.student),
        }
        initial_teacher = _teacher_cls_logits(trainer, mine)
        trainer.optimizer.zero_grad(set_to_none=True)
        before = {n: p.to_local().clone() for n, p in parameters.items()}
        step_logs = trainer.train_step(mine)
        facts["step_loss"] = step_logs["loss"]
        facts["step_skipped"] = bool(step_logs.get("skipped_nonfinite"))
        facts["changed_shards"] = sum(not torch.equal(p.to_local(), before[n]) for n, p in parameters.items())
        facts["nonempty_shards"] = sum(p.to_local().numel() > 0 for p in parameters.values())
        facts["step_shard_dtypes"] = {p.to_local().dtype for p in trainer.student.parameters()}
        # the teacher after its EMA update: its next forward, then the same forward with every module resharded
        # first (so that FSDP2 gathers the current shards); then what its parameters are between steps
        teacher = _teacher_cls_logits(trainer, mine)
        facts["teacher_params_between_steps"] = {
            n: (type(p).__name__, p.dtype) for n, p in trainer.teacher.named_parameters()
        }
        _reshard_everything(trainer.teacher)
        current_teacher = _teacher_cls_logits(trainer, mine)
        facts["teacher_moved"] = float((current_teacher - initial_teacher).abs().max())
        facts["teacher_stale_error"] = float((teacher - current_teacher).abs().max())
        torch.save(facts, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_bf16_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """One FSDP2 bf16 step on 2 gloo ranks: what each rank saw (see _fsdp_worker)."""
    out = tmp_path_factory.mktemp("fsdp_bf16")
    mp.spawn(_fsdp_worker, args=(str(out / "init"), str(out)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)], out


def test_fsdp2_bf16_gathers_in_bf16_and_keeps_fp32_shards_and_gradients(
    fsdp_bf16_run: tuple[list[dict[str, Any]], Path],
) -> None:
    ranks, out = fsdp_bf16_run
    reference = Trainer(_fsdp_config(WORLD_SIZE * PER_RANK, "fp32", "ddp"), out / "single", progress=False)
    assert reference.forward_backward(_batch(_full_batch(WORLD_SIZE * PER_RANK), slice(None)))[1]
    reference_grads = _grads(reference.student)
    full_qkv = tuple(reference.student.backbone.blocks[0].attn.qkv.weight.shape)
    for rank, facts in enumerate(ranks):
        assert facts["ok"] and math.isfinite(facts["loss"]), rank
        # the block's linear layer computes with the whole weight, gathered in bf16, on bf16 inputs...
        assert facts["forward_weights"], f"rank {rank}: the hooked layer did not run"
        for kind, dtype, shape, input_dtype in facts["forward_weights"]:
            assert (dtype, shape, input_dtype) == (torch.bfloat16, full_qkv, torch.bfloat16), (rank, kind)
        assert facts["qkv_shard"] == ("DTensor", (full_qkv[0] // WORLD_SIZE, full_qkv[1]))
        # ...the all-gathers carry bf16 and the gradient reduce-scatters fp32 (the policy's reduce_dtype)...
        gathered = {dtype for name, dtype in facts["collectives"] if name.startswith("all_gather")}
        reduced = {dtype for name, dtype in facts["collectives"] if name.startswith("reduce_scatter")}
        assert gathered == {torch.bfloat16} and reduced == {torch.float32}, facts["collectives"]
        # ...while the stored shards and the sharded gradients stay fp32
        assert facts["param_types"] == {"DTensor"}
        assert set(facts["shard_dtypes"].values()) == {torch.float32}
        assert facts["grad_dtypes"].keys() == reference_grads.keys()
        assert set(facts["grad_dtypes"].values()) == {torch.float32}
        # a whole step (clipping over shards, AdamW, EMA) runs and updates the shards, which stay fp32
        assert not facts["step_skipped"] and math.isfinite(facts["step_loss"])
        assert facts["changed_shards"] == facts["nonempty_shards"] > 0.9 * len(facts["shard_dtypes"])
        assert facts["step_shard_dtypes"] == {torch.float32}
    # the averaged bf16 gradients are the fp32 gradients of the doubled batch in one process (bf16 tolerance)
    grads = ranks[0]["grads"]
    assert not _bf16_mismatches(grads, reference_grads), _grad_errors(grads, reference_grads)
    # full_tensor() of the shards: the same on both ranks
    torch.testing.assert_close(ranks[1]["grads"], grads, rtol=0, atol=0)


def test_fsdp2_teacher_forward_uses_the_ema_updated_shards(
    fsdp_bf16_run: tuple[list[dict[str, Any]], Path],
) -> None:
    for rank, facts in enumerate(fsdp_bf16_run[0]):
        # measured: the EMA step moves the teacher's logits by up to 0.72-0.76; its next forward misses 0.38-0.43
        assert facts["teacher_moved"] > 1e-2, f"rank {rank}: the EMA did not move the teacher"
        # the same FSDP2 bf16 computation on the same shards: exactly equal when the teacher gathers afresh
        assert facts["teacher_stale_error"] == 0.0, f"rank {rank}: {facts['teacher_stale_error']}"
        between_steps = set(facts["teacher_params_between_steps"].values())
        assert between_steps == {("DTensor", torch.float32)}, f"rank {rank}: {between_steps}"


# ---------------------------------------------------------------------------------------------------- fp16 + GradScaler
def _cpu_autocast_supports_fp16() -> bool:
    with torch.autocast("cpu", dtype=torch.float16):
        return torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float16


needs_cpu_fp16 = pytest.mark.skipif(
    not _cpu_autocast_supports_fp16(), reason=f"CPU autocast of torch {torch.__version__} has no float16"
)


def _steps_until_update(trainer: Trainer, batch, max_steps: int = 24) -> tuple[int, list[dict[str, Any]]]:
    """Train until the student changes (a scaler skips the steps whose scaled gradients overflow fp16)."""
    all_logs = []
    for step in range(max_steps):
        before = _snapshot(trainer.student)
        all_logs.append(trainer.train_step(batch))
        changed = _changed(trainer.student, before)
        if changed:
            assert len(changed) == len(before), "a step updates every parameter or none"
            return step, all_logs
    raise AssertionError(f"no optimizer step in {max_steps} iterations")


@needs_cpu_fp16
def test_fp16_step_keeps_fp32_losses_and_master_weights(tmp_path: Path) -> None:
    batch = _batch(_full_batch(PER_RANK), slice(None))
    reference_logs, _ = Trainer(
        _config("train.precision=fp32", f"train.batch_size_per_device={PER_RANK}"), tmp_path / "fp32"
    ).forward_backward(batch)
    trainer = Trainer(
        _config("train.precision=fp16", f"train.batch_size_per_device={PER_RANK}"), tmp_path / "fp16"
    )
    assert trainer.autocast_dtype == torch.float16 and trainer.scaler is not None
    calls = _record_loss_calls(trainer)
    logs, ok = trainer.forward_backward(batch)
    assert ok
    _check_loss_call(calls[0], torch.float16)
    for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):  # measured: within 2e-4 of fp32
        assert logs[key] == pytest.approx(reference_logs[key], rel=5e-3), key
    _master_dtypes(trainer)
    trainer.optimizer.zero_grad(set_to_none=True)
    _, all_logs = _steps_until_update(trainer, batch)
    assert all(math.isfinite(step_logs["loss"]) for step_logs in all_logs)
    _master_dtypes(trainer)
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    scale = trainer.scaler.get_scale()
    assert math.isfinite(scale) and scale > 0


@needs_cpu_fp16
def test_fp16_grad_scaler_skips_nonfinite_steps_and_backs_off(tmp_path: Path) -> None:
    trainer = Trainer(
        _config("train.precision=fp16", f"train.batch_size_per_device={PER_RANK}"), tmp_path / "fp16"
    )
    scaler = trainer.scaler
    assert scaler is not None and scaler.is_enabled(), "the trainer's gradient scaler is disabled"
    batch = _batch(_full_batch(PER_RANK), slice(None))
    initial_scale, backoff = scaler.get_scale(), scaler.get_backoff_factor()
    # every step whose scaled gradients overflow fp16 is skipped and halves the scale; then a step is taken
    skipped, all_logs = _steps_until_update(trainer, batch)
    assert all(math.isfinite(step_logs["loss"]) for step_logs in all_logs)
    assert scaler.get_scale() == initial_scale * backoff**skipped
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())

    # an inf in one gradient (the loss stays finite): no parameter moves, the scale backs off once more
    scale = scaler.get_scale()
    steps = {id(p): int(state["step"]) for p, state in trainer.optimizer.state.items()}
    weight = trainer.student.backbone.blocks[0].attn.qkv.weight
    handle = weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    before = _snapshot(trainer.student)
    logs = trainer.train_step(batch)
    handle.remove()
    assert math.isfinite(logs["loss"])
    assert _changed(trainer.student, before) == []
    assert scaler.get_scale() == scale * backoff
    assert {id(p): int(state["step"]) for p, state in trainer.optimizer.state.items()} == steps


# ------------------------------------------------------------------------------------------------------ torch.compile
@needs_cpp_compiler
def test_compiled_block_equals_eager_block_on_multi_crop_lists() -> None:
    """``Block.compile()`` as the trainer does (inductor): outputs and gradients of a global + local crop list."""
    import torch._dynamo

    block = Block(32, 2, 48, ffn_layer="swiglu", layerscale_init=1.0)  # tiny_cpu's SwiGLU FFN
    eager = copy.deepcopy(block)
    block.compile()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(3)
    # 32-px global crops and 16-px local crops with 8-px patches: 1 + 16 and 1 + 4 tokens
    tokens = [torch.randn(4, 17, 32, generator=generator), torch.randn(8, 5, 32, generator=generator)]
    weights = [torch.randn(t.shape, generator=generator) for t in tokens]
    outputs = {}
    for name, module in (("compiled", block), ("eager", eager)):
        inputs = [t.clone().requires_grad_() for t in tokens]
        out = module(inputs)
        assert isinstance(out, list) and [o.shape for o in out] == [t.shape for t in tokens]
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        outputs[name] = (
            [o.detach() for o in out],
            [t.grad for t in inputs],
            {n: p.grad for n, p in module.named_parameters()},
        )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    (out, input_grads, grads), (ref_out, ref_input_grads, ref_grads) = outputs["compiled"], outputs["eager"]
    # measured: outputs and input gradients within 4e-7, parameter gradients within 5e-7 of their largest entry
    # (kernel fusion reorders the fp32 sums); a wrong residual, scale or crop mix-up is O(1)
    for got, expected in zip(out, ref_out):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(input_grads, ref_input_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, expected in ref_grads.items():
        scale = float(expected.abs().max())
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


@needs_cpp_compiler
def test_compiled_matryoshka_head_equals_eager_head() -> None:
    """``MatryoshkaHead.compile()`` as ``train.compile`` does: every level's logits and every gradient, for two
    masked-patch counts (the iBOT head sees another count each step)."""
    import torch._dynamo

    from franca.models.heads import MatryoshkaHead

    torch.manual_seed(0)
    head = MatryoshkaHead(32, n_prototypes=64, hidden_dim=48, bottleneck_dim=16, mode="slice", init="fan_in")
    eager = copy.deepcopy(head)
    head.compile()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(4)
    for rows in (7, 11):
        tokens = torch.randn(rows, 32, generator=generator)
        results = []
        for module in (head, eager):
            module.zero_grad(set_to_none=True)
            inputs = tokens.clone().requires_grad_()
            logits = module(inputs)
            sum((level * torch.linspace(-1, 1, level.shape[-1])).sum() for level in logits).backward()
            results.append((logits, inputs.grad, {n: p.grad for n, p in module.named_parameters()}))
        (logits, input_grad, grads), (ref_logits, ref_input_grad, ref_grads) = results
        assert [level.shape for level in logits] == [level.shape for level in ref_logits]
        for got, expected in zip(logits, ref_logits):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-4, atol=1e-5)
        assert {n for n, g in grads.items() if g is None} == {n for n, g in ref_grads.items() if g is None}
        for name, expected in ref_grads.items():
            if expected is not None:
                scale = float(expected.abs().max())
                torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"


def test_train_compile_marks_every_block_and_head_for_compilation() -> None:
    """``parallelize(compile_blocks=True)`` (train.compile) compiles each block and both heads of both networks, and
    nothing without it (nn.Module.compile sets the module's compiled call; compilation itself waits for a call)."""
    from franca.train.parallel import parallelize
    from franca.train.ssl_model import build_student_teacher

    def compiled_modules(network: torch.nn.Module) -> list[bool]:
        modules = [*network.backbone.blocks, network.dino_head, network.ibot_head]
        return [getattr(module, "_compiled_call_impl", None) is not None for module in modules]

    for flag in (False, True):
        student, teacher = build_student_teacher(_config())
        parallelize(student, teacher, "ddp", torch.device("cpu"), None, compile_blocks=flag)
        assert (
            compiled_modules(student)
            == compiled_modules(teacher)
            == [flag] * (len(student.backbone.blocks) + 2)
        )


@pytest.mark.parametrize("compiled", [False, True])
def test_train_compile_reaches_the_loss_kernels(compiled: bool) -> None:
    """``train.compile`` compiles the blocks (above) and the DINO and iBOT cross-entropy kernels."""
    from franca.train.ssl_model import FrancaLoss

    config = _config(f"train.compile={str(compiled).lower()}")
    loss = FrancaLoss(config, [16, 32], [16, 32])
    assert loss.dino_loss.compiled is compiled and loss.ibot_loss.compiled is compiled
