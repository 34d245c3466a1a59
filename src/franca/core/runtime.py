"""Where and how computations run: device choice, autocast and seeding (the same rules for every command)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from franca.core.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``; ``cuda``/``cuda:N`` (ConfigError when no GPU is visible)."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {name}: no CUDA device is visible; use --device cpu or --device auto"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    raise ConfigError(f"--device {name!r}: unknown device; use auto, cpu, cuda or cuda:N")


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (as the official evaluations), a no-op elsewhere (bf16 on CPU is ~20x slower here)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible protocol choices."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_floats(values: list[torch.Tensor]) -> list[float]:
    """Scalar tensors (0-dim or one element, on one device) as Python floats, read in one device-to-host copy: one
    host synchronisation for all of them where ``float()`` of each would wait for the device once per value."""
    if not values:
        return []
    return torch.stack([value.detach().reshape(()).double() for value in values]).tolist()
