"""k-NN protocol: known answers, a hand-computed vote, a brute-force reference, faiss vs torch, clipping, the
typed settings and result, scoring Features, and the model-level entry against features computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from franca.core.errors import ConfigError, DataError
from franca.eval.knn import KnnSettings, evaluate_knn, knn_classify, knn_search, knn_votes, score_knn
from franca.features import Features


def reference_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    """Straightforward DINOv2 k-NN: full similarity matrix, weights exp(sim / T), per-class sums, top-1 / top-5.

    Top-t counts a label that received votes and ranks < t (ties: lower class index first).
    """
    train = F.normalize(train.double(), dim=1)
    test = F.normalize(test.double(), dim=1)
    sims = test @ train.T
    results = {}
    for k in ks:
        kk = min(k, train.shape[0])
        top_sims, top_idx = sims.topk(kk, dim=1)
        weights = torch.exp(top_sims / temperature)
        scores = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
        for row in range(test.shape[0]):
            for j in range(kk):
                scores[row, train_labels[top_idx[row, j]]] += weights[row, j]
        hits1 = hits5 = 0
        for row in range(test.shape[0]):
            label = int(test_labels[row])
            own = scores[row, label]
            # rank of the label: classes scoring higher, then equal scores with a lower index; unvoted = miss
            rank = int((scores[row] > own).sum()) + int((scores[row, :label] == own).sum())
            hits1 += int(own > 0 and rank < 1)
            hits5 += int(own > 0 and rank < 5)
        results[k] = (100.0 * hits1 / test.shape[0], 100.0 * hits5 / test.shape[0])
    return results


def clustered(num_classes, per_class, dim, noise, generator):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = F.one_hot(labels, dim).float() + noise * torch.randn(labels.numel(), dim, generator=generator)
    return feats, labels


def test_class_encoding_features_give_full_accuracy():
    gen = torch.Generator().manual_seed(0)
    train, train_labels = clustered(10, 30, 32, 0.05, gen)
    test, test_labels = clustered(10, 10, 32, 0.05, gen)
    results = knn_classify(train, train_labels, test, test_labels, use_faiss=False)
    for k in (10, 20, 100, 200):
        assert results[f"k{k}"]["top1"] == 100.0
        assert results[f"k{k}"]["top5"] == 100.0


def test_random_features_give_chance_accuracy():
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(1000, 64, generator=gen), torch.randn(1000, 64, generator=gen)
    train_labels = torch.randint(0, 10, (1000,), generator=gen)
    test_labels = torch.randint(0, 10, (1000,), generator=gen)
    results = knn_classify(train, train_labels, test, test_labels, ks=(20,), use_faiss=False)
    assert 5.0 < results["k20"]["top1"] < 15.0  # chance is 10%
    assert 40.0 < results["k20"]["top5"] < 60.0  # chance is 50%


def test_hand_computed_votes_and_temperature():
    # three train points on the unit circle, one query; nearest neighbour is class 0, the two others are class 1
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    train_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.1]])
    q = query[0] / math.hypot(1.0, 0.1)
    sims = [float(q @ t) for t in train]  # train rows already have unit norm
    for temperature, expected_winner in ((0.07, 0), (1.0, 1)):
        w = [math.exp(s / temperature) for s in sims]
        hand = torch.tensor([w[0], w[1] + w[2]], dtype=torch.float64) / sum(w)
        assert int(hand.argmax()) == expected_winner  # the hand computation itself: T decides the winner
        top_sims, top_idx = knn_search(train, F.normalize(query, dim=1), 3, use_faiss=False)
        votes = knn_votes(top_sims, train_labels[top_idx], ks=(1, 3), temperature=temperature, num_classes=2)
        assert torch.allclose(votes[3][0], hand, rtol=1e-5, atol=1e-7)
        assert votes[3][0].argsort(descending=True).tolist() == hand.argsort(descending=True).tolist()
        assert int(votes[1][0].argmax()) == 0  # k = 1: the nearest neighbour alone
        results = knn_classify(
            train, train_labels, query, torch.tensor([0]), ks=(1, 3), temperature=temperature
        )
        assert results["k1"]["top1"] == 100.0
        assert results["k3"]["top1"] == (100.0 if expected_winner == 0 else 0.0)


def test_chunked_search_equals_brute_force_reference():
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(500, 16, generator=gen), torch.randn(77, 16, generator=gen)
    train_labels = torch.randint(0, 7, (500,), generator=gen)
    test_labels = torch.randint(0, 7, (77,), generator=gen)
    ks = (1, 5, 20, 50)
    results = knn_classify(
        train,
        train_labels,
        test,
        test_labels,
        ks=ks,
        num_classes=7,
        chunk_size=10,
        train_chunk_size=64,
        use_faiss=False,
    )
    reference = reference_knn(train, train_labels, test, test_labels, ks, 0.07, 7)
    for k in ks:
        assert results[f"k{k}"]["top1"] == pytest.approx(reference[k][0])
        assert results[f"k{k}"]["top5"] == pytest.approx(reference[k][1])
    normed_train, normed_test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    values, indices = knn_search(
        normed_train, normed_test, 50, chunk_size=10, train_chunk_size=64, use_faiss=False
    )
    full_values, full_indices = (normed_test @ normed_train.T).topk(50, dim=1)
    assert torch.equal(indices, full_indices)
    assert torch.allclose(values, full_values, rtol=1e-5, atol=1e-6)


def test_faiss_path_equals_torch_path():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(400, 24, generator=gen), torch.randn(90, 24, generator=gen)
    train_labels = torch.randint(0, 5, (400,), generator=gen)
    test_labels = torch.randint(0, 5, (90,), generator=gen)
    with_faiss = knn_classify(
        train, train_labels, test, test_labels, ks=(3, 20), use_faiss=True, chunk_size=32
    )
    with_torch = knn_classify(
        train, train_labels, test, test_labels, ks=(3, 20), use_faiss=False, chunk_size=32
    )
    assert with_faiss.pop("backend") == "faiss" and with_torch.pop("backend") == "torch"
    assert with_faiss == with_torch
    normed_train, normed_test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    faiss_values, faiss_indices = knn_search(normed_train, normed_test, 20, use_faiss=True)
    torch_values, torch_indices = knn_search(normed_train, normed_test, 20, use_faiss=False)
    assert torch.equal(faiss_indices, torch_indices)
    assert torch.allclose(faiss_values, torch_values, rtol=1e-5, atol=1e-5)


def test_top5_at_least_top1_and_k_clipped_to_train_size():
    gen = torch.Generator().manual_seed(4)
    train, test = torch.randn(7, 8, generator=gen), torch.randn(40, 8, generator=gen)
    train_labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    test_labels = torch.randint(0, 7, (40,), generator=gen)
    results = knn_classify(train, train_labels, test, test_labels, ks=(3, 10, 200), use_faiss=False)
    for k in (3, 10, 200):
        assert results[f"k{k}"]["top5"] >= results[f"k{k}"]["top1"]
    assert results["k10"]["k"] == 7 and results["k200"]["k"] == 7 and results["k3"]["k"] == 3
    clipped = knn_classify(train, train_labels, test, test_labels, ks=(7,), use_faiss=False)
    assert results["k200"]["top1"] == clipped["k7"]["top1"]
    assert results["k200"]["top5"] == clipped["k7"]["top5"]
    reference = reference_knn(train, train_labels, test, test_labels, (200,), 0.07, 7)
    assert results["k200"]["top1"] == pytest.approx(reference[200][0])


def test_invalid_arguments_are_reported():
    feats, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ConfigError):
        knn_classify(feats, labels, feats, labels, ks=())
    with pytest.raises(ConfigError):
        knn_classify(feats, labels, feats, labels, temperature=0.0)


# six hand-made unit-ish train points: two per class, around 0 deg (class 0), 90 deg (class 1) and 180 deg (class 2)
SIX = torch.tensor([[1.0, 0.0], [0.95, 0.31], [0.31, 0.95], [0.0, 1.0], [-1.0, 0.0], [-0.95, -0.31]])
SIX_LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
# three queries: near class 0 (label 0), near class 1 (label 1), and near class 2 but labelled 0. The third one's
# neighbours by cosine, nearest first, are rows 4, 5 (class 2), 3, 2 (class 1), 1, 0 (class 0).
QUERIES = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
QUERY_LABELS = torch.tensor([0, 1, 0])


def test_score_knn_on_six_hand_made_points():
    result = score_knn(SIX, SIX_LABELS, QUERIES, QUERY_LABELS, KnnSettings(ks=(1, 3, 10), use_faiss=False))
    # k = 1: queries 1 and 2 hit, query 3 finds class 2 and its label 0 got no vote (no top-5 credit either)
    assert (result.accuracy[1].top1, result.accuracy[1].top5) == pytest.approx((200 / 3, 200 / 3))
    # k = 3: query 3's votes go to classes 2, 2, 1; label 0 still has none
    assert (result.accuracy[3].top1, result.accuracy[3].top5) == pytest.approx((200 / 3, 200 / 3))
    # k = 10 is clipped to the 6 train points: every class gets a vote, so with 3 classes top-5 is always a hit
    assert result.accuracy[10].k == 6 and result.accuracy[10].top5 == 100.0
    assert result.accuracy[10].top1 == pytest.approx(200 / 3)
    assert (result.num_train, result.num_test, result.num_classes, result.feature_dim) == (6, 3, 3, 2)
    assert result.provenance is None and result.backend == "torch"
    assert result.to_dict() == {
        "k1": {"top1": pytest.approx(200 / 3), "top5": pytest.approx(200 / 3), "k": 1},
        "k3": {"top1": pytest.approx(200 / 3), "top5": pytest.approx(200 / 3), "k": 3},
        "k10": {"top1": pytest.approx(200 / 3), "top5": 100.0, "k": 6},
        "num_train": 6,
        "num_test": 3,
        "num_classes": 3,
        "feature_dim": 2,
        "temperature": 0.07,
        "backend": "torch",
    }


def test_score_knn_reads_the_named_token_of_features_and_records_where_they_came_from():
    # the CLS tokens carry no class signal (all equal), the pooled tokens are the six hand-made points
    train = Features(targets=SIX_LABELS, cls=torch.ones(6, 2), pooled=SIX, num_skipped=2)
    test = Features(targets=QUERY_LABELS, cls=torch.ones(3, 2), pooled=QUERIES, num_skipped=1)
    result = score_knn(train, None, test, None, KnnSettings(ks=(1,), feature="avgpool", use_faiss=False))
    assert result.accuracy[1].top1 == pytest.approx(200 / 3)  # as on the raw points above
    as_dict = result.to_dict()
    assert list(as_dict)[-3:] == ["feature", "skipped_train", "skipped_val"]
    assert (as_dict["feature"], as_dict["skipped_train"], as_dict["skipped_val"]) == ("avgpool", 2, 1)
    # explicit labels win over the targets: with every query labelled 2, only query 3 is right
    relabelled = score_knn(train, None, test, torch.tensor([2, 2, 2]), KnnSettings(ks=(1,), feature="pooled"))
    assert relabelled.accuracy[1].top1 == pytest.approx(100 / 3)


def test_knn_settings_and_inputs_are_checked():
    with pytest.raises(ConfigError, match="at least one k"):
        KnnSettings(ks=())
    with pytest.raises(ConfigError, match=r"--ks\) must be >= 1"):
        KnnSettings(ks=(5, 0))
    with pytest.raises(ConfigError, match="temperature"):
        KnnSettings(temperature=-1.0)
    with pytest.raises(ConfigError, match="train labels are missing"):
        score_knn(SIX, None, QUERIES, QUERY_LABELS)
    with pytest.raises(DataError, match="5 labels"):
        score_knn(SIX, SIX_LABELS[:5], QUERIES, QUERY_LABELS)


def lively_vit():
    """A random vit_tiny whose layer scales are 1 (not 1e-5), so that its CLS token depends on the image."""
    from franca.models import vit_tiny

    model = vit_tiny(patch_size=8, img_size=16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(1.0)
    return model


def test_evaluate_knn_equals_knn_on_features_computed_by_hand():
    model = lively_vit()
    gen = torch.Generator().manual_seed(5)
    train_images, val_images = (
        torch.randn(12, 3, 16, 16, generator=gen),
        torch.randn(5, 3, 16, 16, generator=gen),
    )
    train_labels, val_labels = torch.arange(12) % 3, torch.tensor([0, 1, 2, 0, 1])
    train_set = torch.utils.data.TensorDataset(train_images, train_labels)
    val_set = torch.utils.data.TensorDataset(val_images, val_labels)
    with torch.no_grad():
        train_out, val_out = model.forward_features(train_images), model.forward_features(val_images)
    for feature, by_hand in (
        ("cls", lambda out: out["x_norm_clstoken"]),
        ("avgpool", lambda out: out["x_norm_patchtokens"].mean(dim=1)),
    ):
        settings = KnnSettings(ks=(1, 4), feature=feature)
        result = evaluate_knn(model, train_set, val_set, settings, batch_size=5, progress=False)
        reference = reference_knn(
            by_hand(train_out), train_labels, by_hand(val_out), val_labels, (1, 4), 0.07, 3
        )
        for k in (1, 4):
            assert (result.accuracy[k].top1, result.accuracy[k].top5) == pytest.approx(reference[k])
        assert result.provenance.to_dict() == {"feature": feature, "skipped_train": 0, "skipped_val": 0}
