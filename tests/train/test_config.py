"""Run configuration: presets, overrides, one-line errors with suggestions, save/load round trip."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from franca.core.errors import ConfigError
from franca.train.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    resolve_batch_sizes,
    save_config,
)

REQUIRED = ["data.path=/data/images", "model.pretrained_backbone=/ckpt/backbone.pth"]
PRESETS = ["tiny_cpu", "vitb14_in21k", "vitl14_laion", "vitg14_laion", "vitb14_hrft364", "vitb14_hrft518"]


def effective_lr(cfg: TrainConfig) -> float:
    """The lr after the sqrt_wrt_1024 rule, computed here from the formula."""
    assert cfg.optim.lr_scaling_rule == "sqrt_wrt_1024"
    return cfg.optim.base_lr * math.sqrt(cfg.train.global_batch_size / 1024)


def test_presets_are_shipped_in_the_package() -> None:
    assert set(PRESETS) <= set(list_presets())
    package_folder = Path(__file__).resolve().parents[2] / "src" / "franca" / "configs"
    for name in PRESETS:
        assert (package_folder / f"{name}.yaml").is_file()


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name: str) -> None:
    cfg = load_config(name, REQUIRED)
    assert isinstance(cfg, TrainConfig)
    assert cfg.train.iterations > cfg.optim.warmup_iterations


def test_vitb14_in21k_has_the_paper_values() -> None:
    cfg = load_config("vitb14_in21k", ["data.path=x"])
    assert cfg.model.arch == "vit_base" and cfg.model.patch_size == 14
    assert cfg.model.drop_path_rate == pytest.approx(0.1)
    assert cfg.train.iterations == 625_000 and cfg.optim.warmup_iterations == 100_000
    assert cfg.train.global_batch_size == 2048
    assert effective_lr(cfg) == pytest.approx(1e-3, rel=0.01)
    assert cfg.crops.global_scale == [0.32, 1.0] and cfg.crops.local_scale == [0.05, 0.32]
    assert cfg.crops.n_local == 8 and cfg.crops.local_size == 98
    assert cfg.heads.n_prototypes == 131072 and cfg.heads.mode == "slice"
    assert cfg.optim.weight_decay_start == 0.04 and cfg.optim.weight_decay_end == 0.2
    assert cfg.optim.teacher_momentum_start == 0.994 and cfg.optim.freeze_last_layer_iterations == 1250
    assert cfg.loss.teacher_temp_warmup_iterations == 30 * 1250
    assert (
        cfg.optim.clip_grad == 3.0
        and cfg.optim.patch_embed_lr_mult == 0.2
        and cfg.optim.layerwise_decay == 1.0
    )


def test_large_presets_have_the_paper_values() -> None:
    large = load_config("vitl14_laion", ["data.path=x"])
    giant = load_config("vitg14_laion", ["data.path=x"])
    assert large.model.arch == "vit_large" and giant.model.arch == "vit_giant2"
    for cfg in (large, giant):
        assert cfg.train.global_batch_size == 3072
        assert effective_lr(cfg) == pytest.approx(3.5e-4, rel=0.01)
        assert cfg.model.drop_path_rate == pytest.approx(0.4)
        assert cfg.train.iterations == 625_000 and cfg.optim.warmup_iterations == 100_000
        assert cfg.heads.n_prototypes == 131072
    assert large.crops.global_scale == [0.48, 1.0]
    assert giant.crops.global_scale == [0.45, 1.0] and giant.crops.local_scale == [0.05, 0.45]


def test_hrft_presets_have_the_paper_values_and_require_a_backbone() -> None:
    stage1 = load_config("vitb14_hrft364", REQUIRED)
    stage2 = load_config("vitb14_hrft518", REQUIRED)
    assert (stage1.crops.global_size, stage1.crops.local_size, stage1.train.iterations) == (364, 112, 30_000)
    assert (stage2.crops.global_size, stage2.crops.local_size, stage2.train.iterations) == (518, 168, 10_000)
    for cfg in (stage1, stage2):
        assert cfg.train.global_batch_size == 1024
        assert effective_lr(cfg) == pytest.approx(1.25e-5, rel=1e-6)
        assert cfg.model.pretrained_heads is None  # heads re-initialised
    assert stage1.loss.teacher_temp_warmup_iterations == 10_000
    with pytest.raises(ConfigError, match=r"config key 'model\.pretrained_backbone' is required"):
        load_config("vitb14_hrft364", ["data.path=x"])


def test_tiny_cpu_fits_the_cpu_budget() -> None:
    cfg = load_config("tiny_cpu")
    assert cfg.model.arch == "vit_tiny" and cfg.model.patch_size == 8
    assert cfg.crops.global_size == 32 and cfg.crops.local_size == 16 and cfg.crops.n_local == 4
    assert cfg.train.batch_size_per_device == 16 and cfg.train.global_batch_size is None
    assert cfg.heads.n_prototypes <= 4096 and cfg.heads.init == "fan_in"
    # ~50 images/s on the 2-core machine at 32 px with the colour work batched in the main process: 8-10 minutes
    assert cfg.crops.augment_on_device and cfg.train.num_workers == 0
    images_seen = cfg.train.iterations * cfg.train.batch_size_per_device
    assert 20_000 <= images_seen <= 30_000
    lr = cfg.optim.base_lr * math.sqrt(16 / 1024)
    assert 1e-4 <= lr <= 2e-3


def test_unknown_key_names_the_closest_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["optim.base_lrr=1e-3"])
    message = str(info.value)
    assert "unknown config key 'optim.base_lrr' (did you mean 'optim.base_lr'?)" in message
    assert "\n" not in message


def test_unknown_section_names_the_closest_full_key() -> None:
    with pytest.raises(
        ConfigError, match=r"'optimizer\.warmup_iterations' \(did you mean 'optim\.warmup_iterations'"
    ):
        load_config("tiny_cpu", ["optimizer.warmup_iterations=3"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("base: tiny_cpu\ncrops:\n  n_locals: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "unknown config key 'crops.n_locals' (did you mean 'crops.n_local'?)" in str(info.value)
    assert str(path) in str(info.value)


def test_wrong_type_is_one_line_with_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", ["train.iterations=many"])
    message = str(info.value)
    assert "train.iterations" in message and "int" in message and "'many'" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="train.iterations"):
        load_config("tiny_cpu", ["train.iterations=1.5"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config("tiny_cpu", ["optim=3"])


def test_invalid_choice_suggests_the_closest_value() -> None:
    with pytest.raises(ConfigError, match=r"heads\.mode.*got 'slcie' \(did you mean 'slice'\?\)"):
        load_config("tiny_cpu", ["heads.mode=slcie"])


def test_invalid_ranges_are_rejected() -> None:
    with pytest.raises(ConfigError, match="crops.global_scale"):
        load_config("tiny_cpu", ["crops.global_scale=[0.5,0.2]"])
    with pytest.raises(ConfigError, match="crops.blur_sigma"):
        load_config("tiny_cpu", ["crops.blur_sigma=[0.0,0.2]"])
    with pytest.raises(ConfigError, match="optim.warmup_iterations"):
        load_config("tiny_cpu", ["train.iterations=10", "optim.warmup_iterations=11"])
    with pytest.raises(ConfigError, match="crops.local_size"):
        load_config("tiny_cpu", ["crops.local_size=30"])  # not a multiple of patch 8
    with pytest.raises(ConfigError, match="heads.levels"):
        load_config("tiny_cpu", ["heads.levels=[0.5,0.25]"])


def _leaf_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, str]:
    """Every leaf key of the config and its annotation, read from the dataclasses here (not from franca's rules)."""
    import typing

    keys: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            keys.update(_leaf_keys(hints[item.name], f"{prefix}{item.name}."))
        else:
            keys[f"{prefix}{item.name}"] = str(hints[item.name])
    return keys


FLOAT_KEYS = [key for key, kind in _leaf_keys().items() if kind in ("<class 'float'>", "float | None")]
FLOAT_LIST_KEYS = [key for key, kind in _leaf_keys().items() if "list[float]" in kind]
INT_KEYS = [key for key, kind in _leaf_keys().items() if "int" in kind and "list" not in kind]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_rejects_non_finite_values(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'.*finite"):
        load_config("tiny_cpu", [f"{key}={value}"])


@pytest.mark.parametrize("key", FLOAT_LIST_KEYS)
def test_every_float_list_key_rejects_non_finite_elements(key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'.*finite"):
        load_config("tiny_cpu", [f"{key}=[0.1,inf]"])


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_integer_key_rejects_negative_values(key: str) -> None:
    """No count, length, size or seed of the config means anything below zero."""
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("tiny_cpu", [f"{key}=-1"])


@pytest.mark.parametrize(
    "override",
    [
        "train.checkpoint_every=0",  # was a ZeroDivisionError at the first step
        "train.log_every=0",
        "optim.base_lr=inf",
        "loss.koleo_weight=nan",
        "crops.blur_sigma=[0.1,inf]",
        "model.drop_path_rate=1.0",  # every residual branch dropped
        "heads.init=kaiming",  # was accepted and failed when the heads were built
    ],
)
def test_values_that_crashed_or_diverged_later_are_one_line(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^config key '{key}' ") as caught:
        load_config("tiny_cpu", [override])
    assert "\n" not in str(caught.value)


def test_bad_override_syntax_and_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny_cpu", ["optim.base_lr"])
    with pytest.raises(ConfigError, match="did you mean 'tiny_cpu'"):
        load_config("tiny_cp")
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_dotlist_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny_cpu",
        [
            "optim.base_lr=5e-4",
            "train.iterations=100",
            "crops.global_scale=[0.4,1.0]",
            "heads.levels=[0.5,1.0]",
        ],
    )
    assert cfg.optim.base_lr == 5e-4 and isinstance(cfg.optim.base_lr, float)
    assert cfg.train.iterations == 100
    assert cfg.crops.global_scale == [0.4, 1.0]
    assert cfg.heads.levels == [0.5, 1.0]
    defaults = load_config("tiny_cpu")
    assert defaults.optim.base_lr == 1.13e-2  # the preset itself is unchanged (tiny_cpu.yaml)


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text("base: tiny_cpu\ntrain:\n  iterations: 200\n  seed: 7\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  seed: 9\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.train.iterations, cfg.train.seed, cfg.model.arch) == (200, 9, "vit_tiny")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(str(tmp_path / "loop.yaml"))


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        "vitl14_laion",
        ["data.path=/data/laion", "train.global_batch_size=1024", "loss.level_weights=[1,1,2,2,4]"],
    )
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(str(path))
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert again.loss.level_weights == [1.0, 1.0, 2.0, 2.0, 4.0]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_batch_size_precedence() -> None:
    cfg = load_config("tiny_cpu")
    assert resolve_batch_sizes(cfg.train, world_size=4) == (16, 64)  # per device x 4 when global is null
    big = load_config("vitb14_in21k", ["data.path=x"])
    assert resolve_batch_sizes(big.train, world_size=64) == (32, 2048)
    assert resolve_batch_sizes(big.train, world_size=16) == (128, 2048)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        resolve_batch_sizes(big.train, world_size=3)


def test_model_overrides_build_the_tiny_backbone() -> None:
    from franca.models import build_model

    cfg = load_config("tiny_cpu")
    model = build_model(cfg.model.arch, **cfg.model.vit_overrides())
    assert model.embed_dim == 192 and len(model.blocks) == 6 and model.patch_size == 8
    assert model.pos_embed.shape == (1, 1 + (32 // 8) ** 2, 192)


def test_interpolation_and_required_values_in_user_files(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("base: tiny_cpu\ntrain:\n  checkpoint_every: ${train.iterations}\ndata:\n  path: ???\n")
    with pytest.raises(ConfigError, match=r"config key 'data\.path' is required"):
        load_config(str(path))
    cfg = load_config(str(path), ["data.path=/images", "train.iterations=100"])
    assert cfg.train.checkpoint_every == 100 and cfg.data.path == "/images"


def test_broken_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert "not valid YAML" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(tmp_path / "list.yaml"))
