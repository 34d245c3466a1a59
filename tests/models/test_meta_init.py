"""Meta-device builds materialised by replaying their recorded initialisation equal the CPU build exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from franca.models.meta_init import InitRecorder, MetaInitError
from franca.train.config import load_config
from franca.train.ssl_model import build_student_teacher

TINY = [
    "data.path=unused",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=8",
    "model.img_size=32",
    "heads.n_prototypes=128",
    "heads.hidden_dim=64",
    "heads.bottleneck_dim=32",
]


def _meta_build(build, seed: int = 0):
    torch.manual_seed(seed)
    with InitRecorder() as recorder, torch.device("meta"):
        module = build()
    recorder.bind(module)
    return module, recorder


@pytest.mark.parametrize("mode", ["slice", "project", "tied", "dinov2"])
@pytest.mark.parametrize(
    "variant",
    [[], ["model.num_register_tokens=4", "model.ffn_layer=mlp", "heads.separate_ibot_head=false",
          "model.drop_path_uniform=false", "model.drop_path_rate=0.1", "heads.init=fan_in"]],
    ids=["swiglu", "mlp-registers-shared-head"],
)  # fmt: skip
def test_replayed_student_equals_the_cpu_build(mode: str, variant: list[str]) -> None:
    config = load_config("tiny_cpu", [*TINY, f"heads.mode={mode}", *variant])
    torch.manual_seed(0)
    expected, _ = build_student_teacher(config)
    student, recorder = _meta_build(lambda: build_student_teacher(config)[0])
    # something else draws random numbers between the build and the replay: the replay must not depend on it
    torch.rand(1000)
    student.to_empty(device="cpu")
    recorder.materialize(student)
    got = student.state_dict()
    assert got.keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(got[key], value), key


def test_values_that_come_from_data_are_refused() -> None:
    class FromData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.0, 2.0]))  # no in-place initialisation to record

    with InitRecorder() as recorder, torch.device("meta"):
        module = FromData()
    with pytest.raises(MetaInitError, match="scale"):
        recorder.bind(module)


def test_materialize_needs_allocated_tensors() -> None:
    module, recorder = _meta_build(lambda: nn.Linear(4, 3))
    with pytest.raises(MetaInitError, match="to_empty"):
        recorder.materialize(module)
    module.to_empty(device="cpu")
    recorder.materialize(module)
    torch.manual_seed(0)
    expected = nn.Linear(4, 3)
    assert torch.equal(module.weight, expected.weight) and torch.equal(module.bias, expected.bias)


def test_recorder_restores_torch_nn_init() -> None:
    original = nn.init.trunc_normal_
    with InitRecorder(), torch.device("meta"):
        assert nn.init.trunc_normal_ is not original
    assert nn.init.trunc_normal_ is original


def test_init_device_choice() -> None:
    from franca.core.errors import ConfigError
    from franca.train.trainer import use_meta_init

    config = load_config("tiny_cpu", [*TINY, "distributed.strategy=fsdp"])
    assert use_meta_init(config, world_size=2) and not use_meta_init(config, world_size=1)
    config.distributed.init_device = "meta"
    assert use_meta_init(config, world_size=1)
    pretrained = load_config(
        "tiny_cpu", [*TINY, "distributed.strategy=fsdp", "model.pretrained_backbone=b.pth"]
    )
    assert not use_meta_init(pretrained, world_size=2)  # auto: pretrained weights load into a CPU build
    with pytest.raises(ConfigError, match="distributed.init_device"):
        load_config("tiny_cpu", [*TINY, "distributed.init_device=meta", "model.pretrained_backbone=b.pth"])
