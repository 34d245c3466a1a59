"""Sliced / PCA-truncated k-NN: slices equal k-NN on feats[:, :m], PCA matches NumPy's SVD, the plot is a PNG; the
typed settings and result, scoring Features, and the model-level entry against features computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from franca.core.errors import ConfigError
from franca.eval.sliced import (
    SlicedSettings,
    default_dims,
    evaluate_sliced_knn,
    pca_fit,
    plot_sliced,
    score_sliced,
    sliced_knn,
)
from franca.features import Features


def reference_top1(train, train_labels, test, test_labels, k, temperature=0.07):
    """Plain k-NN top-1 (percent): cosine similarity, weights exp(sim / T), per-class sums, argmax."""
    train = F.normalize(torch.as_tensor(train).double(), dim=1)
    test = F.normalize(torch.as_tensor(test).double(), dim=1)
    top_sims, top_idx = (test @ train.T).topk(min(k, train.shape[0]), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    scores.scatter_add_(1, train_labels[top_idx], torch.exp(top_sims / temperature))
    return 100.0 * (scores.argmax(dim=1) == test_labels).double().mean().item()


def structured_features(n, generator, dim=16, num_classes=4):
    """Features whose first dims carry the class and whose variance differs per direction (distinct PCA axes)."""
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    feats = torch.randn(n, dim, generator=generator) * torch.linspace(3.0, 0.5, dim)
    feats[:, :num_classes] += 2.0 * F.one_hot(labels, num_classes).float()
    return feats, labels


def test_default_dims_are_the_nesting_levels():
    assert default_dims(192) == [12, 24, 48, 96, 192]
    assert default_dims(1024) == [64, 128, 256, 512, 1024]
    assert default_dims(8) == [1, 2, 4, 8]


def test_slices_equal_knn_on_leading_dims():
    gen = torch.Generator().manual_seed(0)
    train, train_labels = structured_features(300, gen)
    test, test_labels = structured_features(80, gen)
    results = sliced_knn(
        train, train_labels, test, test_labels, dims=(2, 4, 16), ks=(5, 20), pca=False, use_faiss=False
    )
    assert results["dims"] == [2, 4, 16] and "pca" not in results
    for m in (2, 4, 16):
        for k in (5, 20):
            expected = reference_top1(train[:, :m], train_labels, test[:, :m], test_labels, k)
            assert results["sliced"][str(m)][f"k{k}"]["top1"] == pytest.approx(expected)
    assert results["sliced"]["2"]["feature_dim"] == 2


def test_pca_uses_top_principal_directions():
    gen = torch.Generator().manual_seed(1)
    train, train_labels = structured_features(400, gen)
    test, test_labels = structured_features(100, gen)
    mean, components, variance = pca_fit(train)
    data = train.double().numpy()
    centred = data - data.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(mean.numpy(), data.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), singular**2 / (data.shape[0] - 1), rtol=1e-4)
    # each component equals the SVD direction up to its sign
    cosines = np.abs(np.sum(components.double().numpy() * vt, axis=1))
    np.testing.assert_allclose(cosines, 1.0, atol=1e-4)

    results = sliced_knn(train, train_labels, test, test_labels, dims=(3, 8), ks=(10,), use_faiss=False)
    for m in (3, 8):
        projection = vt[:m].T
        train_m = torch.from_numpy(centred @ projection)
        test_m = torch.from_numpy((test.double().numpy() - data.mean(axis=0)) @ projection)
        expected = reference_top1(train_m, train_labels, test_m, test_labels, 10)
        assert results["pca"][str(m)]["k10"]["top1"] == pytest.approx(expected)
        kept = (singular[:m] ** 2).sum() / (singular**2).sum()
        assert results["pca_explained_variance"][str(m)] == pytest.approx(kept, rel=1e-4)


def test_plot_is_a_valid_png_with_several_models(tmp_path):
    gen = torch.Generator().manual_seed(2)
    train, train_labels = structured_features(120, gen)
    test, test_labels = structured_features(40, gen)
    first = sliced_knn(train, train_labels, test, test_labels, ks=(5,), use_faiss=False)
    second = sliced_knn(train.flip(1), train_labels, test.flip(1), test_labels, ks=(5,), use_faiss=False)
    path = plot_sliced([("model A", first), ("model B", second)], tmp_path / "plots" / "sliced.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_out_of_range_dims_are_rejected():
    feats, labels = torch.randn(10, 8), torch.arange(10) % 2
    with pytest.raises(ConfigError):
        sliced_knn(feats, labels, feats, labels, dims=(4, 9))


def test_score_sliced_on_features_scores_their_cls_token_and_records_the_skipped_images():
    gen = torch.Generator().manual_seed(3)
    train, train_labels = structured_features(200, gen)
    test, test_labels = structured_features(60, gen)
    noise = torch.randn(200, 16, generator=gen)  # pooled tokens that must not be read
    train_features = Features(targets=train_labels, cls=train, pooled=noise, num_skipped=4)
    test_features = Features(targets=test_labels, cls=test, pooled=noise[:60], num_skipped=0)
    settings = SlicedSettings(dims=(2, 8), ks=(7,), pca=False, use_faiss=False)
    result = score_sliced(train_features, None, test_features, None, settings)
    assert result.dims == [2, 8] and result.pca is None and result.feature_dim == 16
    for m in (2, 8):
        expected = reference_top1(train[:, :m], train_labels, test[:, :m], test_labels, 7)
        assert result.sliced[m].accuracy[7].top1 == pytest.approx(expected)
    as_dict = result.to_dict()
    assert list(as_dict) == ["dims", "feature_dim", "ks", "sliced", "skipped_train", "skipped_val"]
    assert (as_dict["skipped_train"], as_dict["skipped_val"], as_dict["ks"]) == (4, 0, [7])
    assert as_dict["sliced"]["8"]["k7"]["top1"] == result.sliced[8].accuracy[7].top1


def test_sliced_settings_are_checked_when_built():
    with pytest.raises(ConfigError, match="at least one k"):
        SlicedSettings(ks=())
    with pytest.raises(ConfigError, match="temperature"):
        SlicedSettings(temperature=0.0)


def test_evaluate_sliced_knn_equals_the_reference_on_cls_tokens_computed_by_hand():
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    with torch.no_grad():  # layer scales 1 (not 1e-5), so that the CLS token depends on the image
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(1.0)
    gen = torch.Generator().manual_seed(4)
    train_images, val_images = (
        torch.randn(16, 3, 16, 16, generator=gen),
        torch.randn(6, 3, 16, 16, generator=gen),
    )
    train_labels, val_labels = torch.arange(16) % 4, torch.arange(6) % 4
    settings = SlicedSettings(dims=(12, 192), ks=(3,), pca=False)
    result = evaluate_sliced_knn(
        model,
        torch.utils.data.TensorDataset(train_images, train_labels),
        torch.utils.data.TensorDataset(val_images, val_labels),
        settings,
        batch_size=7,
        progress=False,
    )
    with torch.no_grad():
        train_cls = model.forward_features(train_images)["x_norm_clstoken"]
        val_cls = model.forward_features(val_images)["x_norm_clstoken"]
    for m in (12, 192):
        expected = reference_top1(train_cls[:, :m], train_labels, val_cls[:, :m], val_labels, 3)
        assert result.sliced[m].accuracy[3].top1 == pytest.approx(expected)
    assert result.to_dict()["skipped_train"] == 0 and "feature" not in result.to_dict()
