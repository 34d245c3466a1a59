"""The torch.hub entry points: official file names, refused releases, and local files (no download in tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from franca.core.errors import ConfigError
from franca.hub import franca_vitb14, release_file_name
from franca.models import build_model
from franca.models.checkpoints import save_backbone


def test_official_file_names() -> None:
    assert release_file_name("vitb14", "IN21K") == "franca_vitb14_In21K.pth"
    assert release_file_name("vitl14", "LAION") == "franca_vitl14_Laion600M.pth"
    assert release_file_name("vitl14", "Dinov2_In21k") == "franca_vitl14_Dinov2_In21K.pth"  # README spelling
    assert release_file_name("vitl14", "LAION600m") == "franca_vitl14_Laion600M.pth"
    assert release_file_name("vitb14", "IN21K", rasa=True) == "franca_vitb14_In21K_rasa.pth"
    assert release_file_name("vitg14", "LAION") == "franca_vitg14_Laion600M.pth"


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
    model = build_model("vit_tiny", patch_size=14, img_size=56)
    path = save_backbone(model, tmp_path / "local.safetensors")
    loaded = franca_vitb14(weights=str(path))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    fresh = franca_vitb14(pretrained=False, depth=1)
    assert fresh.embed_dim == 768 and fresh.patch_size == 14 and fresh.config.ffn_layer == "swiglu"


def test_hubconf_exposes_the_entry_points() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", Path(__file__).parents[1] / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {"franca_vitb14", "franca_vitl14", "franca_vitg14"} <= set(dir(module))
