"""Fitting persona directions from positive/negative activations (torch only).

Given activations ``pos`` (n x d) and ``neg`` (m x d) at one layer:

- ``diff_means``: ``v = mean(pos) − mean(neg)`` (Persona Vectors / Assistant Axis style).
- ``logistic``: weights ``w`` of an L2-regularized logistic regression
  ``p(pos | x) = σ(wᵀ(x − μ)/s + b)`` fitted by L-BFGS on centred, scale-normalized inputs
  (μ the grand mean, s the mean activation norm); the direction is ``w``.
- ``pca``: top-k right singular vectors of the paired differences ``Δᵢ = posᵢ − negᵢ``
  (uncentred, so the mean difference is the first component when it dominates), each
  oriented so that ``mean(Δ)·vⱼ >= 0``; variance explained is ``σⱼ² / Σσ²``.

Diagnostics per layer: Cohen's d of the projections on the first direction, accuracy of
the midpoint threshold, and for PCA the variance explained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ProbeDataError

METHODS = ("diff_means", "logistic", "pca")


def _check_texts(texts: Any, which: str) -> None:
    if texts is None:
        return
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise ProbeDataError(f"{which} must be a list of texts, got {type(texts).__name__}.",
                             f"pass {which}=[\"text\", ...] or a list of (prompt, response) pairs.")
    for i, t in enumerate(texts):
        ok = isinstance(t, str) or (isinstance(t, tuple | list) and len(t) == 2 and all(isinstance(x, str) for x in t))
        if not ok:
            raise ProbeDataError(f"{which}[{i}] is {t!r:.80}, not a string or a (prompt, response) pair of strings.",
                                 "pass texts as str, or as (prompt, response) tuples of str.")


def check_labels(labels: Sequence[Any], n_texts: int) -> list[int]:
    """Binary labels as ints; strings, None and values other than 0/1 are refused."""
    if isinstance(labels, str | bytes) or not isinstance(labels, Sequence) and not hasattr(labels, "__len__"):
        raise ProbeDataError(f"labels must be a list of 0/1 values, got {type(labels).__name__}.",
                             "pass labels=[1, 0, ...] (1 = positive), one per text.")
    labels = list(labels)
    if len(labels) != n_texts:
        raise ProbeDataError(f"texts= has {n_texts} entries but labels= has {len(labels)}; they must have the same length.",
                             "pass one label (1 = positive, 0 = negative) per text.")
    out = []
    for i, y in enumerate(labels):
        if hasattr(y, "item") and not isinstance(y, str | bytes):
            y = y.item()
        if isinstance(y, str | bytes) or y is None or not isinstance(y, int | float) or y not in (0, 1):
            raise ProbeDataError(f"labels[{i}] is {y!r}; labels must be the numbers 1 (positive) or 0 (negative).",
                                 "map your labels to 1/0 first (e.g. [int(l == 'positive') for l in labels]).")
        out.append(int(y))
    return out


def check_probe_data(positive: Sequence[Any] | None, negative: Sequence[Any] | None, method: str,
                     k: Any = 1) -> None:
    if method not in METHODS:
        raise ProbeDataError(f"unknown probe method {method!r}.", f"use one of {METHODS}.")
    _check_texts(positive, "positive")
    _check_texts(negative, "negative")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ProbeDataError(f"k must be an integer >= 1 (directions per layer), got {k!r}.",
                             "pass k=1 (or k>1 with method='pca').")
    if method != "pca" and k != 1:
        raise ProbeDataError(f"method={method!r} gives one direction; k={k} needs method='pca'.",
                             "pass k=1, or method='pca' for several directions.")
    n_pos = len(positive) if positive is not None else 0
    n_neg = len(negative) if negative is not None else 0
    if n_pos == 0 and n_neg == 0:
        raise ProbeDataError("no probe texts were given.", "pass positive=[...] and negative=[...].")
    if n_pos == 0 or n_neg == 0:
        which = "positive" if n_pos == 0 else "negative"
        raise ProbeDataError(
            f"the probe data has only one class (no {which} texts): a direction needs a contrast.",
            "pass texts of both classes (positive=... and negative=..., or labels with 0 and 1).",
        )
    if method == "pca" and n_pos != n_neg:
        raise ProbeDataError(
            f"method='pca' uses paired differences, but there are {n_pos} positive and {n_neg} "
            "negative texts.",
            "pass the same number of each, paired by position (positive[i] with negative[i]).",
        )
    if method in ("logistic", "pca") and min(n_pos, n_neg) < 2:
        raise ProbeDataError(f"method={method!r} needs at least 2 texts per class.",
                             "add texts, or use method='diff_means'.")
    if method == "pca" and k > n_pos:
        raise ProbeDataError(
            f"method='pca' with k={k} needs at least {k} (positive, negative) pairs; there are {n_pos}, so "
            f"at most {n_pos} directions can be found.",
            f"pass k <= {n_pos}, or add pairs.")


def diff_of_means(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``mean(pos) − mean(neg)`` as a (1 x d) tensor."""
    return (pos.double().mean(0) - neg.double().mean(0))[None].float()


def logistic_direction(pos: torch.Tensor, neg: torch.Tensor, l2: float = 1e-3, max_iter: int = 200) -> torch.Tensor:
    """Logistic-regression weight direction (1 x d); see the module docstring."""
    X = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu = X.mean(0)
    scale = (X - mu).norm(dim=1).mean().clamp_min(1e-12)
    Xc = (X - mu) / scale
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # class-balanced weights so an imbalanced set still gives a centred boundary
    wts = torch.where(y == 1, 0.5 / len(pos), 0.5 / len(neg))
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = Xc @ w + b
        loss = (wts * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / scale)[None].float()


def paired_pca(pos: torch.Tensor, neg: torch.Tensor, k: int) -> tuple[torch.Tensor, list[float]]:
    """Top-k directions (k x d) of paired differences, sign-fixed, with variance explained."""
    Dl = pos.double() - neg.double()
    k = min(k, Dl.shape[0], Dl.shape[1])
    _, S, Vh = torch.linalg.svd(Dl, full_matrices=False)
    V = Vh[:k]
    mean = Dl.mean(0)
    signs = torch.where(V @ mean < 0, -1.0, 1.0).to(V.dtype)
    V = V * signs[:, None]
    var = S.pow(2)
    explained = (var[:k] / var.sum().clamp_min(1e-300)).tolist()
    # scale each component by its singular value / sqrt(n) so "directions" keep magnitudes
    return (V * (S[:k, None] / Dl.shape[0] ** 0.5)).float(), explained


def separation(pos: torch.Tensor, neg: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    """Cohen's d and midpoint-threshold accuracy of projections on ``v``."""
    u = v.double() / v.double().norm().clamp_min(1e-300)
    a, b = pos.double() @ u, neg.double() @ u
    gap = a.mean() - b.mean()
    pooled = ((a.var(unbiased=False) + b.var(unbiased=False)) / 2).sqrt()
    # zero spread (e.g. identical texts per class): report a large but finite d
    pooled = pooled.clamp_min(1e-6 * gap.abs().clamp_min(1e-12))
    thr = (a.mean() + b.mean()) / 2
    acc = ((a > thr).double().sum() + (b <= thr).double().sum()) / (len(a) + len(b))
    return {"cohens_d": float(gap / pooled), "accuracy": float(acc)}


def fit_directions(pos: torch.Tensor, neg: torch.Tensor, method: str = "diff_means", k: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """Directions (k x d) and diagnostics for one layer."""
    if method != "pca" and k != 1:
        raise ProbeDataError(f"method={method!r} gives one direction; k={k} needs method='pca'.",
                             "pass k=1, or method='pca' for several directions.")
    if method == "pca" and not (1 <= k <= min(len(pos), pos.shape[1])):
        raise ProbeDataError(f"method='pca' can give 1..{min(len(pos), pos.shape[1])} directions here, not k={k}.",
                             "lower k.")
    if method == "diff_means":
        D = diff_of_means(pos, neg)
        extra: dict[str, Any] = {}
    elif method == "logistic":
        D = logistic_direction(pos, neg)
        extra = {}
    elif method == "pca":
        D, explained = paired_pca(pos, neg, k)
        extra = {"variance_explained": explained}
    else:
        raise ProbeDataError(f"unknown probe method {method!r}.", f"use one of {METHODS}.")
    diag = {"n_pos": len(pos), "n_neg": len(neg), **separation(pos, neg, D[0]), **extra}
    return D, diag


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive): the
    Mann–Whitney probability that a random positive scores above a random negative, ties
    counting one half. 0.5 when either class is empty."""
    s, y = scores.double().reshape(-1), labels.reshape(-1).bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    # mid-rank of each distinct value: (number below) + (count + 1) / 2
    below = torch.cumsum(counts, 0) - counts
    ranks = (below.double() + (counts.double() + 1) / 2)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def crossfit_auroc(x: torch.Tensor, labels: torch.Tensor, folds: int = 2,
                   groups: Sequence[Any] | None = None) -> float:
    """How well a linear read-out of ``x`` (n x k, e.g. coordinates in a subspace) separates
    ``labels`` (1/0) without fitting and scoring on the same rows. Rows are split into
    ``folds`` — by ``groups`` when given (rows of one group, e.g. samples of one prompt, stay in
    one fold), else interleaved within each class. Each fold is scored on the other folds'
    diff-of-means read-out, centred at their class midpoint and of unit length,
    ``(x − (μ₁ + μ₀)/2) · v/‖v‖``, so scores from different folds are comparable; one AUROC over
    all held-out scores (0.5 = no separation, 1 = perfect). 0.5 when some fold's training rows
    lack a class."""
    y = labels.reshape(-1).bool()
    if len(x) != len(y):
        raise ProbeDataError(f"crossfit_auroc got {len(x)} rows and {len(y)} labels.", "pass one label per row.")
    fold = torch.empty(len(y), dtype=torch.long)
    if groups is not None:
        if len(groups) != len(y):
            raise ProbeDataError(f"crossfit_auroc got {len(groups)} groups for {len(y)} rows.", "pass one group per row.")
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        fold = torch.tensor([index[g] % folds for g in groups], dtype=torch.long)
    else:
        for cls in (y, ~y):
            idx = cls.nonzero().flatten()
            fold[idx] = torch.arange(len(idx)) % folds
    X = x.double()
    scores = torch.empty(len(y), dtype=torch.float64)
    for f in range(folds):
        test, train = fold == f, fold != f
        if not bool((train & y).any()) or not bool((train & ~y).any()):
            return 0.5
        mu1, mu0 = X[train & y].mean(0), X[train & ~y].mean(0)
        v = mu1 - mu0
        scores[test] = (X[test] - (mu1 + mu0) / 2) @ (v / v.norm().clamp_min(1e-300))
    return auroc(scores, y)
