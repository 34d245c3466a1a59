"""``franca demo`` end to end on a tiny data set and model: data, training, every protocol, the report, resume.

The numbers a few training steps give are meaningless; what is checked is the plumbing: the k-NN and HummingBird
values in metrics.json are recomputed here by straightforward reference code from the exported backbone, the random
init equals the trainer's initial teacher, the report shows the measured values, and a re-run resumes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import math
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from franca.apps.demo import DemoSettings, EvalSettings, dino_plateau, run_demo, summary_text
from franca.cli import build_parser, main
from franca.core.errors import ConfigError
from franca.report import format_value
from franca.train.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser  # noqa: E402  (the helper sits beside this file; tests/ is not a package)

TINY_MODEL = [
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "heads.n_prototypes=128",
    "heads.hidden_dim=64",
    "heads.bottleneck_dim=32",
    "crops.n_local=2",
    "train.num_workers=0",
]
NUM_TRAIN, NUM_VAL, SIZE, ITERATIONS = 60, 30, 32, 2
LIGHT_EVAL = EvalSettings(
    linear_epochs=3,
    overcluster_ks=(12,),
    overcluster_seeds=(0,),
    kmeans_iterations=10,
    rasa_iterations=2,
    rasa_epochs=1,
    pca_images=3,
)
SUMMARY_HEADER = ["metric", "trained", "random init", "delta"]


def _settings(output: Path, **changes) -> DemoSettings:
    base = {
        "output_dir": output,
        "num_images": NUM_TRAIN,
        "val_images": NUM_VAL,
        "size": SIZE,
        "iterations": ITERATIONS,
        "batch_size": 8,
        "device": "auto",  # the CPU here; "cpu" would hide the GPUs of a GPU machine from later tests
        "overrides": list(TINY_MODEL),
        "workers": 1,
        "progress": False,
        "eval": LIGHT_EVAL,
    }
    base.update(changes)
    return DemoSettings(**base)


def _run(settings: DemoSettings) -> tuple[dict, str]:
    """Run the demo; returns its metrics and what a terminal shows: the phase lines (log records of the
    ``franca.demo`` logger, which the CLI writes to stdout) and the closing summary the CLI prints."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    logger = logging.getLogger("franca.demo")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(buffer):
            metrics = run_demo(settings)
            print(summary_text(metrics))  # what the CLI prints at the end
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return metrics, buffer.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One shortened demo with the ablation (3 training steps per mode), then a second, resumed invocation."""
    out = tmp_path_factory.mktemp("demo")
    metrics, stdout = _run(_settings(out, ablation=True, seeds=2))
    log_before = (out / "train" / "metrics.jsonl").read_text()
    report = out / "first_report.html"  # the re-run below rewrites report.html (without the ablation section)
    report.write_bytes((out / "report.html").read_bytes())
    again, stdout_again = _run(_settings(out))
    return {
        "out": out,
        "metrics": metrics,
        "stdout": stdout,
        "again": again,
        "stdout_again": stdout_again,
        "log_before": log_before,
        "report": report,
    }


class _Page(HTMLParser):
    """Tables (rows of cell texts) and <img> attributes of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        self.urls += [v for v in attributes.values() if v.lower().startswith(("http:", "https:", "//"))]
        if tag == "img":
            self.images.append(attributes)
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (ImageNet-normalised float [N, 3, S, S]), masks [N, S, S] and class ids, read with PIL in path order."""
    classes = json.loads((root / "classes.json").read_text())["classes"]
    images, masks, labels = [], [], []
    for class_id, name in enumerate(classes):
        for path in sorted((root / split / name).glob("*.png")):
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
            pixels = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
            images.append(torch.from_numpy(pixels.transpose(2, 0, 1)).float())
            masks.append(torch.from_numpy(np.array(Image.open(root / "masks" / split / name / path.name))))
            labels.append(class_id)
    return torch.stack(images), torch.stack(masks).long(), torch.tensor(labels)


def _reference_knn_top1(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor
) -> float:
    """Weighted k-NN (k=20, T=0.07, cosine) written out directly."""
    sims = F.normalize(val_x, dim=1) @ F.normalize(train_x, dim=1).T
    values, indices = sims.topk(20, dim=1)
    weights = torch.exp(values / 0.07)
    correct = 0
    for row in range(val_x.shape[0]):
        votes = torch.zeros(10, dtype=torch.float64)
        for weight, index in zip(weights[row], indices[row]):
            votes[train_y[index]] += float(weight)
        correct += int(int(votes.argmax()) == int(val_y[row]))
    return 100.0 * correct / val_x.shape[0]


def _reference_hummingbird_miou(
    train_patch: torch.Tensor, train_masks: torch.Tensor, val_patch: torch.Tensor, val_masks: torch.Tensor
) -> float:
    """HummingBird written out: every train patch in the bank, k=30, softmax(cos/0.02), bilinear upsampling, mIoU."""
    n, grid, _, dim = train_patch.shape
    patch = train_masks.shape[-1] // grid
    classes = 11
    labels = []
    for image in range(n):
        for row in range(grid):
            for col in range(grid):
                block = train_masks[image, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
                block = block[block != 255]
                labels.append(torch.bincount(block, minlength=classes).float() / max(block.numel(), 1))
    bank_labels = torch.stack(labels)
    keep = bank_labels.sum(dim=1) > 0
    bank = F.normalize(train_patch.reshape(-1, dim)[keep], dim=1)
    bank_labels = bank_labels[keep]
    queries = F.normalize(val_patch.reshape(-1, dim), dim=1)
    values, indices = (queries @ bank.T).topk(30, dim=1)
    predicted = (torch.softmax(values / 0.02, dim=1).unsqueeze(-1) * bank_labels[indices]).sum(dim=1)
    predicted = predicted.reshape(val_patch.shape[0], grid, grid, classes).permute(0, 3, 1, 2)
    upsampled = F.interpolate(predicted, size=val_masks.shape[-2:], mode="bilinear", align_corners=False)
    prediction, target = upsampled.argmax(dim=1).flatten(), val_masks.flatten()
    valid = target != 255
    ious = []
    for c in range(classes):
        intersection = int(((prediction == c) & (target == c) & valid).sum())
        union = int((((prediction == c) | (target == c)) & valid).sum())
        if union:
            ious.append(intersection / union)
    return 100.0 * sum(ious) / len(ious)


def test_metrics_match_reference_computations(demo: dict) -> None:
    from franca.models.checkpoints import load_backbone

    out, metrics = demo["out"], demo["metrics"]
    if metrics["settings"]["device"].startswith("cuda"):
        pytest.skip("on CUDA the demo's features are computed in bf16; the reference here is fp32")
    train_x, train_masks, train_y = _load_split(out / "data", "train")
    val_x, val_masks, val_y = _load_split(out / "data", "val")
    model = load_backbone(out / "train" / "teacher_backbone.safetensors")
    with torch.no_grad():
        train_out, val_out = model.forward_features(train_x), model.forward_features(val_x)
    knn = _reference_knn_top1(train_out["x_norm_clstoken"], train_y, val_out["x_norm_clstoken"], val_y)
    assert metrics["trained"]["knn"]["top1"] == pytest.approx(knn, abs=100.0 / NUM_VAL + 1e-6)
    grid = SIZE // 8
    shape = (-1, grid, grid, model.embed_dim)
    miou = _reference_hummingbird_miou(
        train_out["x_norm_patchtokens"].reshape(shape),
        train_masks,
        val_out["x_norm_patchtokens"].reshape(shape),
        val_masks,
    )
    assert metrics["trained"]["hummingbird"]["miou"] == pytest.approx(miou, abs=0.5)
    assert metrics["trained"]["hummingbird"]["memory_patches"] == NUM_TRAIN * grid * grid
    assert metrics["targets"]["knn_points"] == pytest.approx(
        metrics["trained"]["knn"]["top1"] - metrics["random_init"]["knn"]["top1"]
    )


def _pixels(root: Path, split: str) -> torch.Tensor:
    """The images of a split as uint8 [N, 3, S, S], read with PIL in class-then-path order."""
    classes = json.loads((root / "classes.json").read_text())["classes"]
    paths = [p for name in classes for p in sorted((root / split / name).glob("*.png"))]
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    )


def test_split_loading_matches_the_files(demo: dict) -> None:
    from franca.apps.demo import load_split

    root = demo["out"] / "data"
    _, masks, labels = _load_split(root, "val")
    split = load_split(root, "val", SIZE, progress=False)
    assert torch.equal(split.images, _pixels(root, "val"))
    assert torch.equal(split.masks.long(), masks) and torch.equal(split.labels, labels)
    subset = load_split(root, "train", SIZE, progress=False, max_images=10, seed=3)
    assert len(subset.labels) == 10 and len(set(subset.paths)) == 10
    everything = _pixels(root, "train")
    _, _, train_labels = _load_split(root, "train")
    for image, label, path in zip(subset.images, subset.labels, subset.paths):
        index = int(
            path.stem.split("_")[-1]
        )  # synthetic file names carry the sample index; class = index % 10
        assert int(label) == index % 10
        assert any(torch.equal(image, other) for other in everything[train_labels == label])


def test_hummingbird_adapter_with_oracle_features(demo: dict) -> None:
    """Patch features that encode each patch's majority label: HummingBird must segment well, as the reference."""
    from franca.apps.demo import DemoData, SplitData, run_hummingbird
    from franca.eval.hummingbird import label_bank

    root = demo["out"] / "data"
    _, train_masks, _ = _load_split(root, "train")
    _, val_masks, _ = _load_split(root, "val")
    generator = torch.Generator().manual_seed(0)

    def oracle(masks: torch.Tensor) -> torch.Tensor:
        grid = masks.shape[-1] // 8
        blocks = masks.reshape(-1, grid, 8, grid, 8).permute(0, 1, 3, 2, 4).reshape(-1, grid, grid, 64)
        majority = torch.mode(blocks, dim=-1).values.clamp(max=10)
        features = F.one_hot(majority, 16).float()
        return features + 0.05 * torch.randn(features.shape, generator=generator)

    def split(masks: torch.Tensor) -> SplitData:
        return SplitData(torch.zeros(0), masks.to(torch.uint8), torch.zeros(0, dtype=torch.long), [])

    train_patch, val_patch = oracle(train_masks), oracle(val_masks)
    bank = label_bank(train_masks.to(torch.uint8), 8, 11)
    data = DemoData(split(train_masks), split(val_masks), bank, 11, 8, root)
    result = run_hummingbird(train_patch, val_patch, data, LIGHT_EVAL, torch.device("cpu"))
    reference = _reference_hummingbird_miou(train_patch, train_masks, val_patch, val_masks)
    assert result["miou"] == pytest.approx(reference, abs=1e-3)
    assert result["miou"] > 40.0  # far above the ~6.5 of predicting background everywhere
    assert result["memory_patches"] == result["labelled_train_patches"] == int(bank.indices.numel())
    assert result["per_class_iou"]["background"] is not None and result["tokens"] == "patch"


def test_random_init_is_the_trainers_initial_teacher(demo: dict) -> None:
    from franca.apps.demo import random_init_backbone
    from franca.train.config import load_config
    from franca.train.trainer import Trainer

    config = load_config(demo["out"] / "train" / "config.yaml")
    trainer = Trainer(
        config, demo["out"] / "fresh", progress=False
    )  # builds the initial weights, trains nothing
    expected = {key: value.cpu() for key, value in trainer.teacher.backbone.state_dict().items()}
    built = random_init_backbone(config).state_dict()
    assert expected.keys() == built.keys()
    assert all(torch.equal(expected[key], built[key]) for key in expected)
    trained = demo["out"] / "train" / "teacher_backbone.safetensors"
    from franca.models.checkpoints import load_backbone

    assert not torch.equal(
        load_backbone(trained).state_dict()["blocks.0.attn.qkv.weight"], built["blocks.0.attn.qkv.weight"]
    )


def test_metrics_json_and_runs(demo: dict) -> None:
    out, metrics = demo["out"], demo["metrics"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["trained"]["knn"]["top1"] == pytest.approx(metrics["trained"]["knn"]["top1"])
    assert saved["training"]["iteration"] == ITERATIONS and saved["training"]["completed"] is True
    assert saved["data"]["num_train"] == NUM_TRAIN and saved["data"]["num_val"] == NUM_VAL
    for protocol in ("knn", "linear", "hummingbird", "overclustering", "sliced_knn"):
        assert protocol in saved["trained"] and protocol in saved["random_init"]
    assert saved["trained"]["sliced_knn"]["dims"] == [
        4,
        8,
        16,
        32,
        64,
    ]  # d/16 ... d of the 64-wide test model
    assert len(saved["rasa"]["iterations"]) == LIGHT_EVAL.rasa_iterations
    assert 0.0 <= saved["hummingbird_rasa"]["miou"] <= 100.0
    assert saved["timings"]["total"] > 0 and "train" in saved["timings"]
    ablation = json.loads((out / "ablation" / "ablation.json").read_text())
    assert ablation["seeds"] == [0, 1] and ablation["budgets"] == ["iterations", "time"]
    for mode in ("slice", "project", "tied", "dinov2"):
        for seed in (0, 1):
            run = out / ("train" if (mode, seed) == ("slice", 0) else f"ablation/{mode}/seed{seed}")
            assert (run / "teacher_backbone.safetensors").is_file()
            assert f"mode: {mode}" in (run / "config.yaml").read_text()
            assert f"seed: {seed}" in (run / "config.yaml").read_text()
    equal_iterations = [r for r in ablation["runs"] if r["budget"] == "iterations"]
    assert len(equal_iterations) == 8 and all(r["iteration"] == ITERATIONS for r in equal_iterations)
    # the demo's own run is the slice run of seed 0: its scores are the demo's
    (slice0,) = [r for r in equal_iterations if (r["mode"], r["seed"]) == ("slice", 0)]
    assert slice0["metrics"]["knn_top1"] == pytest.approx(metrics["trained"]["knn"]["top1"])
    assert slice0["metrics"]["linear_top1"] == pytest.approx(metrics["trained"]["linear"]["top1"])
    # the mean and sample std over the two seeds, by hand
    for mode in ("slice", "dinov2"):
        values = [r["metrics"]["hummingbird_miou"] for r in equal_iterations if r["mode"] == mode]
        entry = ablation["summary"]["iterations"][mode]["hummingbird_miou"]
        assert entry["mean"] == pytest.approx(sum(values) / 2)
        assert entry["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    # equal time: each mode trained round(n * t_slice / t_mode) iterations, from the measured step times
    steps = ablation["step_times"]
    for r in (r for r in ablation["runs"] if r["budget"] == "time"):
        assert (
            r["iterations"]
            == steps["iterations"][r["mode"]]
            == max(1, round(ITERATIONS * steps["step_seconds"]["slice"] / steps["step_seconds"][r["mode"]]))
        )
    assert (out / "ablation" / "report.html").is_file()
    assert not (out / "ablation" / "calibration").exists()  # the step-time runs are cleaned up
    # The printed summary: the table, the report's path and the total time.
    stdout = demo["stdout"]
    assert "metric" in stdout and "random init" in stdout and "k-NN top-1" in stdout
    assert f"report: {out / 'report.html'}" in stdout and "total time:" in stdout
    assert "phase 1/5" in stdout and "phase 5/5" in stdout
    # 128 prototypes at the widest of five levels: K = 8, 16, 32, 64, 128, so sum_j ln K_j = 25 ln 2. Two steps from
    # the official head init leave the DINO loss there, and the demo says so.
    training = saved["training"]
    assert training["uniform_dino_loss"] == pytest.approx(25 * math.log(2))
    assert training["dino_nats_below_uniform"] == pytest.approx(
        training["uniform_dino_loss"] - training["final_dino_loss"]
    )
    assert training["dino_on_plateau"] is True
    assert "has not started to learn image-level clusters" in stdout


def test_dino_plateau_reads_the_last_logged_losses(tmp_path: Path) -> None:
    config = load_config("tiny_cpu")  # 4096 prototypes at the widest level: K = 2^8 ... 2^12
    uniform = 50 * math.log(2)
    losses = [30.0, 20.0, 10.0, 12.0, 11.0, 9.0, 10.0]
    lines = [json.dumps({"iteration": i + 1, "dino_loss": v}) for i, v in enumerate(losses)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = dino_plateau(tmp_path, config)
    assert result["uniform_dino_loss"] == pytest.approx(uniform)
    assert result["final_dino_loss"] == pytest.approx(10.0)  # median of the last five
    assert result["dino_nats_below_uniform"] == pytest.approx(uniform - 10.0)
    assert result["dino_on_plateau"] is False
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "dino_loss": uniform - 0.1}) + "\n")
    assert dino_plateau(tmp_path, config)["dino_on_plateau"] is True
    baseline = load_config("tiny_cpu", ["heads.mode=dinov2", "heads.n_prototypes=1000"])
    assert dino_plateau(tmp_path, baseline)["uniform_dino_loss"] == pytest.approx(math.log(1000))
    assert dino_plateau(tmp_path / "missing", config)["final_dino_loss"] is None


def test_rerun_resumes_instead_of_retraining(demo: dict) -> None:
    out = demo["out"]
    assert "already trained" in demo["stdout_again"] and "reusing" in demo["stdout_again"]
    assert (out / "train" / "metrics.jsonl").read_text() == demo["log_before"]
    assert demo["again"]["trained"]["knn"]["top1"] == demo["metrics"]["trained"]["knn"]["top1"]
    assert "ablation" not in demo["again"]
    with pytest.raises(ConfigError, match="other settings"):
        _run(_settings(out, iterations=ITERATIONS + 1))
    with pytest.raises(ConfigError, match="holds a synthetic data set"):
        _run(_settings(out, num_images=NUM_TRAIN + 1))


def _check_page(page: _Page, metrics: dict) -> None:
    summary = page.tables[0]
    assert summary[0] == SUMMARY_HEADER
    for row, expected in zip(summary[1:], metrics["summary"]):
        assert row[0] == expected["metric"]
        assert row[1] == format_value(expected["trained"]) and row[2] == format_value(expected["random_init"])
    assert len(summary) == len(metrics["summary"]) + 1
    assert any(r[0] == "slice" for table in page.tables for r in table)  # the ablation table
    # loss curves, sliced k-NN, RASA, PCA maps (the ablation's plots are in its own report)
    assert len(page.images) == 4
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix) :]))) as decoded:
            assert decoded.format == "PNG" and decoded.width >= 100
    assert not page.urls


def test_report_html(demo: dict) -> None:
    text = demo["report"].read_text(encoding="utf-8")
    _check_page(_parse(text), demo["metrics"])
    assert "http://" not in text and "https://" not in text


def test_report_renders_in_chromium(demo: dict) -> None:
    executable = browser.find_or_install_chromium()
    if executable is None:
        pytest.skip(f"headless Chromium is not available: {browser.last_failure_reason}")
    _check_page(_parse(browser.render_dom(demo["report"], executable=executable)), demo["metrics"])


def test_cli_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(["demo", "--quick", "--iterations", "7", "optim.base_lr=1e-3"])
    assert args.quick and args.iterations == 7 and args.overrides == ["optim.base_lr=1e-3"]
    from franca.apps.demo import QUICK, apply_quick
    from franca.cli.demo import DEFAULT_QUICK_OUTPUT

    settings = apply_quick(DemoSettings(quick=True, iterations=7), {"iterations"})
    assert settings.iterations == 7 and settings.num_images == QUICK["num_images"]
    assert DEFAULT_QUICK_OUTPUT != "runs/demo"
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        status = main(["demo", "--output-dir", str(tmp_path), "--iterations", "0"])
    assert status == 2 and "--iterations must be >= 1" in buffer.getvalue()


def test_cli_shows_the_phase_lines_on_stdout(capsys) -> None:
    """``franca demo`` writes the library's ``franca.demo`` records as bare ``[demo 1.2s] ...`` stdout lines (not as
    ``franca: ...`` on stderr, where the other ``franca`` records go), and only while the demo runs."""
    from franca.apps.demo.progress import PhaseLog
    from franca.cli import configure_logging
    from franca.cli.demo import _phase_lines_on_stdout

    configure_logging()  # what `franca` does first
    with _phase_lines_on_stdout():
        PhaseLog()("phase 1/5: synthetic data set")
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[demo \d+\.\ds\] phase 1/5: synthetic data set\n", out), out
    assert err == ""
    logging.getLogger("franca.demo").info("later")
    out, err = capsys.readouterr()
    assert out == "" and err == "franca: later\n"


def test_training_overrides_scale_with_the_run_and_move_augmentation_to_the_gpu(tmp_path: Path) -> None:
    from franca.apps.demo import training_overrides

    preset = load_config("tiny_cpu")
    settings = DemoSettings(output_dir=tmp_path, iterations=2 * preset.train.iterations, size=64)
    cpu = load_config("tiny_cpu", training_overrides(settings, tmp_path / "data", tmp_path / "run", "cpu"))
    assert cpu.train.iterations == 2 * preset.train.iterations
    assert cpu.optim.warmup_iterations == 2 * preset.optim.warmup_iterations  # proportions kept
    assert cpu.crops.augment_on_device is True and cpu.train.num_workers == 0  # the preset's, on 2 cores
    cuda = load_config("tiny_cpu", training_overrides(settings, tmp_path / "data", tmp_path / "run", "cuda"))
    assert cuda.crops.augment_on_device is True and cuda.train.num_workers >= 1
