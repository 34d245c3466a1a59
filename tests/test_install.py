"""The install footprint: the core install (torch, torchvision, numpy, pillow, safetensors, tqdm) loads backbones and
embeds images; a command that needs an extra says which one in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# Packages the core install must not need; the blocker below makes them absent: ``import`` raises ModuleNotFoundError
# and ``importlib.util.find_spec`` returns None, as when they are not installed (torch._dynamo, which torchvision imports,
# probes for some of them with find_spec and must not see an error there).
OPTIONAL = (
    "omegaconf",
    "sklearn",
    "scipy",
    "matplotlib",
    "jinja2",
    "faiss",
    "webdataset",
    "tensorboard",
    "timm",
)
BLOCKER = f"""
import sys
sys.modules.update(dict.fromkeys({OPTIONAL!r}))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=ROOT)


def test_the_core_install_loads_backbones_and_embeds(tmp_path: Path) -> None:
    code = f"""
import franca, torch
from franca.features import embed_images
model = franca.build_model("vit_tiny", patch_size=8, img_size=32, depth=1)
franca.save_backbone(model, {str(tmp_path / "b.safetensors")!r})
loaded = franca.load_backbone({str(tmp_path / "b.safetensors")!r})
print(loaded(torch.zeros(1, 3, 32, 32)).shape)
from PIL import Image
Image.new("RGB", (40, 36), (10, 200, 30)).save({str(tmp_path / "a.png")!r})
result = embed_images(loaded, [{str(tmp_path / "a.png")!r}], size=32, tokens=["cls", "mean"], progress=False)
print("embedded", {{name: tuple(value.shape) for name, value in result.features.items()}})
"""
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 192])" in done.stdout
    assert "embedded {'cls': (1, 192), 'mean': (1, 192)}" in done.stdout


def test_a_command_that_needs_an_extra_names_it_in_one_line() -> None:
    done = _run("from franca.cli import main; raise SystemExit(main(['train', '--config', 'tiny_cpu']))")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "franca train: error: needs omegaconf, which the 'train' extra installs: pip install "
        "'franca[train]' (or 'franca[all]')"
    ]


def test_the_core_dependencies_are_the_documented_ones() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = sorted(requirement.split(">")[0].split("=")[0] for requirement in project["dependencies"])
    assert names == ["numpy", "pillow", "safetensors", "torch", "torchvision", "tqdm"]
    assert {"train", "eval", "report", "demo", "all"} <= set(project["optional-dependencies"])
