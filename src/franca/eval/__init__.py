"""Evaluation protocols for frozen backbones, each a module with a tensor-level core and a model-level entry
``evaluate_<protocol>(model, data..., settings...)``.

Classification (image-level features):

- :mod:`franca.eval.knn`: weighted k-NN on L2-normalised CLS features (DINOv2 protocol: cosine, T=0.07,
  k in 10/20/100/200, top-1/top-5), chunked and optionally faiss-backed;
- :mod:`franca.eval.sliced`: the same k-NN on Matryoshka slices (first m dims) and on PCA-truncated features (Fig. 4);
- :mod:`franca.eval.linear`: linear probe with many (feature set, learning rate) heads trained jointly (DINOv2);
- :mod:`franca.eval.logreg`: L-BFGS logistic regression with a C sweep (fine-grained protocol, scikit-learn).

Dense (patch-level features): :mod:`franca.eval.hummingbird` (in-context segmentation), :mod:`franca.eval.linear_seg`
(linear segmentation), :mod:`franca.eval.overclustering` (K-means overclustering), :mod:`franca.eval.pca_maps` (PCA
visualisations); they too have settings dataclasses, pure ``score_*`` functions (HummingBird's
``HummingbirdScorer`` takes the val set batch by batch) and typed results.

One search (:mod:`franca.eval.search`: exact top-k, torch or faiss, ties to the lower index) serves k-NN and
HummingBird; one metrics module (:mod:`franca.eval.metrics`: confusion matrix, mIoU, spreads over seeds, PCA) serves
every protocol.

Each image-level protocol has a typed settings dataclass (``KnnSettings``, ``SlicedSettings``, ``LinearSettings``,
``LogregSettings``), a pure ``score_<protocol>(train, train_labels, val, val_labels, settings)`` over features
(tensors with labels, or :class:`franca.features.Features`) returning a typed result whose ``to_dict()`` is what the
result files hold, and ``evaluate_<protocol>(model, train_dataset, val_dataset, settings)`` = extract the features
with :mod:`franca.features` (the one extractor) + score.

Shared plumbing (model loading, data sets, loaders, feature and label helpers, result files) is in
:mod:`franca.eval.common`, the protocols' defaults in :mod:`franca.eval.defaults` and output folders and tables in
:mod:`franca.eval.output` (both torch-free). The library logs through ``logging`` and never prints or parses
arguments: the ``franca eval <protocol>`` commands (options, printed tables) live in :mod:`franca.cli.eval_protocols`,
and ``franca eval <protocol> --help`` lists the options of each protocol.
"""
