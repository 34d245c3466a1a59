"""The torch.hub entry points: official file names, refused releases, local files and hubconf.py, all through the model
registry (no download in tests; the faked downloads are in tests/models/test_registry.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from franca.core.errors import CheckpointError, ConfigError
from franca.models import build_model
from franca.models.checkpoints import save_backbone
from franca.models.hub import franca_vitb14, franca_vitl14, registry_name, release_file_name
from franca.models.registry import model_info

ROOT = Path(__file__).parents[1]


def test_official_file_names() -> None:
    assert release_file_name("vitb14", "IN21K") == "franca_vitb14_In21K.pth"
    assert release_file_name("vitl14", "LAION") == "franca_vitl14_Laion600M.pth"
    assert release_file_name("vitl14", "Dinov2_In21k") == "franca_vitl14_Dinov2_In21K.pth"  # README spelling
    assert release_file_name("vitl14", "LAION600m") == "franca_vitl14_Laion600M.pth"
    assert release_file_name("vitb14", "IN21K", rasa=True) == "franca_vitb14_In21K_rasa.pth"
    assert release_file_name("vitg14", "LAION") == "franca_vitg14_Laion600M.pth"
    assert release_file_name("vitb14", "Dinov2_In21K") == "franca_vitb14_Dinov2_In21K.pth"


def test_entry_points_name_registry_entries() -> None:
    assert registry_name("vitb14", "IN21K") == "franca_vitb14.in21k"
    assert registry_name("vitl14", "LAION600m") == "franca_vitl14.laion600m"
    assert registry_name("vitl14", "dinov2_in21k") == "franca_vitl14.dinov2_in21k"
    assert registry_name("vitg14", "laion") == "franca_vitg14.laion600m"
    with pytest.raises(ConfigError, match="no RASA head file was released"):
        release_file_name("vitb14", "Dinov2_In21K", rasa=True)


@pytest.mark.parametrize(
    ("arch", "weights", "hint"),
    [
        ("vitl14", "IN21K", "DINOv2-L"),
        ("vitg14", "IN21K", "incomplete"),
        ("vitb14", "LAION", "not trained on LAION"),
    ],
)
def test_broken_releases_are_refused(arch: str, weights: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        release_file_name(arch, weights)


def test_unknown_weights() -> None:
    with pytest.raises(ConfigError, match="unknown weights"):
        release_file_name("vitb14", "imagenet")


def test_local_file_and_random_init(tmp_path: Path) -> None:
    model = build_model("vit_base", depth=1, patch_size=14, img_size=56)  # ViT-B/14, one block: a small file
    path = save_backbone(model, tmp_path / "local.safetensors")
    loaded = franca_vitb14(weights=str(path), depth=1)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    also = franca_vitb14(
        pretrained=False, checkpoint=path, depth=1
    )  # a checkpoint wins over pretrained=False
    assert all(torch.equal(also.state_dict()[k], v) for k, v in model.state_dict().items())
    fresh = franca_vitb14(pretrained=False, depth=1)
    assert fresh.embed_dim == 768 and fresh.patch_size == 14 and fresh.config.ffn_layer == "swiglu"
    assert fresh.grid_size == model_info("franca_vitb14.in21k").input_size // 14  # built at the weights' grid


def test_a_local_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = save_backbone(build_model("vit_tiny", patch_size=14, img_size=56), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="embed_dim=192 but embed_dim=1024"):
        franca_vitl14(weights=str(path))


def test_hubconf_exposes_the_entry_points() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {"franca_vitb14", "franca_vitl14", "franca_vitg14"} <= set(dir(module))


def test_torch_hub_load_from_the_repository() -> None:
    """torch.hub.load on this checkout (source='local': no network) builds through the registry."""
    model = torch.hub.load(
        str(ROOT), "franca_vitl14", source="local", pretrained=False, depth=2, trust_repo=True
    )
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (1024, 2, 16)
    assert model.grid_size == model_info("franca_vitl14.laion600m").input_size // 14
