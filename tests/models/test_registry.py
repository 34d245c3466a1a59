"""The model registry: every name builds the architecture it states, names are listed and suggested, weights load
exactly from a local file and through the (faked) download, and the normalisation is the one the training uses.

The expected architectures are written out here from the README, docs/method.md §1.1 and the DINOv2 release (not read
from the registry), so that a wrong registry entry fails.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import franca
from franca.core.constants import IMAGENET_MEAN, IMAGENET_STD
from franca.core.errors import CheckpointError, ConfigError
from franca.models.layers import Mlp, SwiGLUFFN
from franca.models.registry import create_model, list_models, model_info
from franca.models.vision_transformer import DinoVisionTransformer, ViTConfig

# name: (width, depth, heads, registers, FFN, hidden width of the FFN, resolution of the position grid in px)
# Franca / presets: docs/method.md §1.1 (SwiGLU hidden 1024 / 2048 / 2736 / 4096; vit_tiny 512); README: B-IN21K and
# L-LAION files have a 518-px grid, g-LAION 224 (docs/method.md §1.2), the DINOv2 baselines of release v1.1.0 224.
# DINOv2 (facebookresearch/dinov2 hub): S/B/L plain GELU MLP (4d), g SwiGLU, all 518 px, "_reg" = 4 registers.
EXPECTED = {
    "vit_tiny": (192, 6, 3, 0, "swiglu", 512, 224),
    "vit_small": (384, 12, 6, 0, "swiglu", 1024, 224),
    "vit_base": (768, 12, 12, 0, "swiglu", 2048, 224),
    "vit_large": (1024, 24, 16, 0, "swiglu", 2736, 224),
    "vit_giant2": (1536, 40, 24, 0, "swiglu", 4096, 224),
    "franca_vitb14.in21k": (768, 12, 12, 0, "swiglu", 2048, 518),
    "franca_vitb14.dinov2_in21k": (768, 12, 12, 0, "swiglu", 2048, 224),
    "franca_vitl14.laion600m": (1024, 24, 16, 0, "swiglu", 2736, 518),
    "franca_vitl14.dinov2_in21k": (1024, 24, 16, 0, "swiglu", 2736, 224),
    "franca_vitg14.laion600m": (1536, 40, 24, 0, "swiglu", 4096, 224),
    "dinov2_vits14.lvd142m": (384, 12, 6, 0, "mlp", 1536, 518),
    "dinov2_vitb14.lvd142m": (768, 12, 12, 0, "mlp", 3072, 518),
    "dinov2_vitl14.lvd142m": (1024, 24, 16, 0, "mlp", 4096, 518),
    "dinov2_vitg14.lvd142m": (1536, 40, 24, 0, "swiglu", 4096, 518),
    "dinov2_vits14_reg.lvd142m": (384, 12, 6, 4, "mlp", 1536, 518),
    "dinov2_vitb14_reg.lvd142m": (768, 12, 12, 4, "mlp", 3072, 518),
    "dinov2_vitl14_reg.lvd142m": (1024, 24, 16, 4, "mlp", 4096, 518),
    "dinov2_vitg14_reg.lvd142m": (1536, 40, 24, 4, "swiglu", 4096, 518),
}
# the release files' names and hosts (official READMEs)
FILES = {
    "franca_vitb14.in21k": "franca_vitb14_In21K.pth",
    "franca_vitb14.dinov2_in21k": "franca_vitb14_Dinov2_In21K.pth",
    "franca_vitl14.laion600m": "franca_vitl14_Laion600M.pth",
    "franca_vitl14.dinov2_in21k": "franca_vitl14_Dinov2_In21K.pth",
    "franca_vitg14.laion600m": "franca_vitg14_Laion600M.pth",
    **{
        f"dinov2_vit{s}14{'_reg' if reg else ''}.lvd142m": f"dinov2_vit{s}14{'_reg4' if reg else ''}_pretrain.pth"
        for s in "sblg"
        for reg in (False, True)
    },
}


def test_the_registered_names_are_the_expected_ones() -> None:
    assert set(list_models()) == set(EXPECTED)
    assert set(list_models(pretrained=True)) == set(FILES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_builds_its_architecture_on_the_meta_device(name: str) -> None:
    width, depth, heads, registers, ffn, hidden, pixels = EXPECTED[name]
    with torch.device("meta"):
        model = create_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (width, depth, heads)
    assert {block.attn.num_heads for block in model.blocks} == {heads}
    assert model.patch_embed.proj.weight.shape == (width, 3, 14, 14)
    assert model.pos_embed.shape == (1, 1 + (pixels // 14) ** 2, width)
    assert model.num_register_tokens == registers
    assert (model.register_tokens is None) == (registers == 0)
    if registers:
        assert model.register_tokens.shape == (1, registers, width)
    mlp = model.blocks[0].mlp
    if ffn == "swiglu":
        assert isinstance(mlp, SwiGLUFFN) and mlp.w12.weight.shape == (2 * hidden, width)
    else:
        assert isinstance(mlp, Mlp) and mlp.fc1.weight.shape == (hidden, width)
    # DINOv2's register models interpolate positions with antialias and no 0.1 offset; every other one as DINOv2 does
    reg_interpolation = name.startswith("dinov2_") and registers > 0
    assert model.interpolate_offset == (0.0 if reg_interpolation else 0.1)
    assert model.interpolate_antialias is reg_interpolation
    info = model_info(name)
    assert info.input_size == pixels and info.config["img_size"] == pixels
    assert (info.file_name, bool(info.urls)) == (FILES.get(name), name in FILES)


def test_urls_point_at_the_official_releases() -> None:
    for name, file_name in FILES.items():
        info = model_info(name)
        host = (
            "https://dl.fbaipublicfiles.com/dinov2/"
            if name.startswith("dinov2")
            else "https://github.com/valeoai/Franca/releases/download/v1."
        )
        assert all(url.startswith(host) for url in info.urls), info.urls
        if name != "franca_vitg14.laion600m":
            assert info.urls == (info.urls[0],) and info.urls[0].endswith("/" + file_name)
    giant = model_info("franca_vitg14.laion600m").urls
    assert [url.rsplit("/", 1)[1] for url in giant] == [
        f"franca_vitg14_Laion600M_chunked.tar.gz.part_a{x}" for x in "abc"
    ]
    rasa = {name for name in FILES if model_info(name).rasa_url}
    assert rasa == {"franca_vitb14.in21k", "franca_vitl14.laion600m", "franca_vitg14.laion600m"}


def test_list_models_filters() -> None:
    plain = ["vit_base", "vit_giant2", "vit_large", "vit_small", "vit_tiny"]
    assert list_models(pretrained=False) == plain
    assert list_models("vit_*") == plain
    assert list_models("franca_*") == [
        "franca_vitb14.dinov2_in21k",
        "franca_vitb14.in21k",
        "franca_vitg14.laion600m",
        "franca_vitl14.dinov2_in21k",
        "franca_vitl14.laion600m",
    ]
    assert list_models("FRANCA_VITL14*", pretrained=True) == [
        "franca_vitl14.dinov2_in21k",
        "franca_vitl14.laion600m",
    ]
    assert list_models("*_reg.*") == [f"dinov2_vit{s}14_reg.lvd142m" for s in "bgls"]
    assert list_models("franca_*", pretrained=False) == []
    assert list_models("nothing*") == []
    assert franca.list_models is list_models and franca.create_model is create_model


def test_an_architecture_alone_means_its_default_weights() -> None:
    assert model_info("franca_vitb14").name == "franca_vitb14.in21k"
    assert model_info("franca_vitl14").name == "franca_vitl14.laion600m"
    assert model_info("Dinov2_ViTs14_reg").name == "dinov2_vits14_reg.lvd142m"
    assert model_info("vit_base").name == "vit_base" and not model_info("vit_base").has_weights


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("franca_vitb16.in21k", "franca_vitb14.in21k"),
        ("dinov2_vitl14.lvd142", "dinov2_vitl14.lvd142m"),
        ("vit_gaint2", "vit_giant2"),
    ],
)
def test_an_unknown_name_is_one_line_with_the_closest_names(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_model(name)
    message = str(caught.value)
    assert "\n" not in message and f"unknown model '{name}'" in message
    assert f"did you mean '{suggestion}'" in message


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("franca_vitl14.in21k", "DINOv2-L baseline"),
        ("franca_vitg14.in21k", "incomplete"),
        ("franca_vitb14.laion600m", "not trained on LAION"),
    ],
)
def test_broken_releases_are_refused_with_a_working_choice(name: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        create_model(name, pretrained=True)


def test_wrong_options_are_one_line() -> None:
    with pytest.raises(ConfigError, match="did you mean 'embed_dim'"):
        create_model("vit_tiny", embed_dims=64)
    with pytest.raises(ConfigError, match="no released weights"):
        create_model("vit_tiny", pretrained=True)
    with pytest.raises(ConfigError, match="rasa needs weights"):
        create_model("vit_tiny", rasa=True)


def test_overrides_change_the_random_build() -> None:
    model = create_model("franca_vitb14.in21k", depth=1, img_size=28, drop_path_rate=0.1)
    assert len(model.blocks) == 1 and model.grid_size == 2 and model.config.drop_path_rate == 0.1
    assert model.embed_dim == 768


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_pretrained_path_loads_a_saved_backbone_exactly(tmp_path: Path) -> None:
    reference = franca.vit_tiny(patch_size=14, img_size=56)
    path = franca.save_backbone(reference, tmp_path / "tiny.safetensors")
    model = create_model("vit_tiny", pretrained=path)
    _assert_same_weights(model, reference)
    assert model.config == reference.config and not model.training
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=0, atol=0)
    # a file of another architecture than the name states is refused, in one line naming the difference
    with pytest.raises(CheckpointError, match="embed_dim=192 but embed_dim=384") as caught:
        create_model("vit_small", pretrained=path)
    assert "\n" not in str(caught.value)


class _FakeDownloads:
    """torch.hub.download_url_to_file copying files registered by URL; records the URLs asked for."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.requested: list[str] = []

    def __call__(self, url: str, dst: str, progress: bool = True) -> None:
        self.requested.append(url)
        shutil.copyfile(self.files[url], dst)


@pytest.fixture
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _FakeDownloads:
    fake = _FakeDownloads()
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return fake


def test_pretrained_true_downloads_once_and_loads_exactly(tmp_path: Path, downloads: _FakeDownloads) -> None:
    """A DINOv2 register model (its official flat layout) at depth 1: the file lands in torch.hub's cache under its
    release name, loads exactly with the entry's interpolation settings, and is not downloaded again."""
    name = "dinov2_vits14_reg.lvd142m"
    reference = DinoVisionTransformer(
        ViTConfig(embed_dim=384, depth=1, num_heads=6, ffn_layer="mlp", num_register_tokens=4, img_size=28)
    )
    source = tmp_path / "served.pth"
    torch.save(reference.state_dict(), source)
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    downloads.files[url] = source
    model = create_model(name, pretrained=True, depth=1, progress=False)
    assert downloads.requested == [url]
    cached = tmp_path / "hub" / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth"
    assert cached.is_file() and not cached.with_name(cached.name + ".partial").exists()
    _assert_same_weights(model, reference)
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, True)
    again = create_model(name, pretrained=True, depth=1, progress=False)
    assert downloads.requested == [url]  # served from the cache
    _assert_same_weights(again, reference)


def test_pretrained_true_joins_the_giant_archive_and_attaches_rasa(
    tmp_path: Path, downloads: _FakeDownloads
) -> None:
    """ViT-g's three tar.gz parts are joined and unpacked; rasa=True downloads the released head. A narrow stand-in
    (width 192, depth 1, given as overrides) keeps the file small; it is in the official {"teacher": ...} layout."""
    info = model_info("franca_vitg14.laion600m")
    reference = DinoVisionTransformer(ViTConfig(embed_dim=192, depth=1, num_heads=3, img_size=28))
    teacher = {f"backbone.{key}": value for key, value in reference.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"teacher": teacher}, buffer)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        member = tarfile.TarInfo("franca_vitg14_Laion600M.pth")
        member.size = len(buffer.getvalue())
        tar.addfile(member, io.BytesIO(buffer.getvalue()))
    data = archive.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for index, url in enumerate(info.urls):
        part = tmp_path / f"part{index}"
        part.write_bytes(data[cut[index] : cut[index + 1]])
        downloads.files[url] = part
    head = {f"pre_pos_layers.{i}.weight": torch.randn(2, 192) for i in range(8)}
    head["pos_pred.weight"] = torch.randn(2, 192)
    torch.save(head, tmp_path / "rasa.pth")
    downloads.files[info.rasa_url] = tmp_path / "rasa.pth"

    model = create_model(
        info.name, pretrained=True, rasa=True, embed_dim=192, num_heads=3, depth=1, progress=False
    )
    assert downloads.requested == [*info.urls, info.rasa_url]
    assert sorted(p.name for p in (tmp_path / "hub" / "checkpoints").iterdir()) == [
        "franca_vitg14_Laion600M.pth",
        "franca_vitg14_Laion600M_rasa.pth",
    ]
    _assert_same_weights(model, _with_rasa(reference, tmp_path / "rasa.pth"))


def _with_rasa(model: DinoVisionTransformer, head: Path) -> DinoVisionTransformer:
    from franca.models.rasa import rasa_matrix_from

    model.set_rasa(rasa_matrix_from(head, embed_dim=model.embed_dim))
    return model


def test_no_rasa_head_was_released_for_the_baselines(downloads: _FakeDownloads) -> None:
    with pytest.raises(ConfigError, match="no RASA head"):
        create_model("franca_vitb14.dinov2_in21k", pretrained=True, rasa=True)
    assert downloads.requested == []


def test_normalisation_is_the_constants_everywhere() -> None:
    """The ImageNet statistics (written out here) are the constants, the registry's entries and the training and
    evaluation transforms all use them."""
    from franca.data.augmentations import MultiCropAugmentation, eval_transform
    from franca.train.config import load_config
    from franca.train.data import build_device_augmentation, build_multicrop

    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    for name in list_models():
        info = model_info(name)
        assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD), name
    config = load_config("tiny_cpu")
    for augmentation in (build_multicrop(config), build_device_augmentation(config), MultiCropAugmentation()):
        assert (augmentation.mean, augmentation.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # what the evaluation transform computes: a uniform grey image normalises to (v - mean) / std
    grey = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    out = eval_transform(size=28)(grey)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0], expected)
