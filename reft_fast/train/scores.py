"""Evaluation scores of classification and regression (GLUE's): pure functions over Python sequences.

    accuracy       share of predictions equal to their label (every GLUE classification task)
    f1_binary      F1 of the positive class (MRPC, QQP)
    matthews       Matthews correlation coefficient, K classes (CoLA); the binary MCC for two
    pearson        Pearson correlation (STS-B)
    spearman       Spearman rank correlation, tied values ranked by their average rank (STS-B)

They take host lists (the caller reads its device tensors once) and follow the usual conventions where a score is
undefined: a zero denominator gives 0.0 for F1 and MCC (as scikit-learn does), and NaN for a correlation with a constant
side (as SciPy does), so a degenerate run is visible rather than scored as perfect or as zero.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

__all__ = ["accuracy", "average_ranks", "f1_binary", "matthews", "pearson", "spearman"]


def _check_pairs(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    _check_pairs(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def f1_binary(predictions: Sequence, labels: Sequence, positive=1) -> float:
    """2·TP / (2·TP + FP + FN) for the class ``positive``; 0.0 when neither side has it."""
    _check_pairs(predictions, labels)
    true_pos = sum(p == positive and y == positive for p, y in zip(predictions, labels))
    false_pos = sum(p == positive and y != positive for p, y in zip(predictions, labels))
    false_neg = sum(p != positive and y == positive for p, y in zip(predictions, labels))
    denominator = 2 * true_pos + false_pos + false_neg
    return 2 * true_pos / denominator if denominator else 0.0


def matthews(predictions: Sequence, labels: Sequence) -> float:
    """The K-class Matthews correlation (Gorodkin 2004) from the confusion counts:
    (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²)), with c the correct count, s the total, p_k and t_k the
    predicted and true counts of class k; for two classes it is the binary (TP·TN − FP·FN) / sqrt(...)."""
    _check_pairs(predictions, labels)
    total = len(labels)
    correct = sum(p == y for p, y in zip(predictions, labels))
    predicted, true = Counter(predictions), Counter(labels)
    classes = set(predicted) | set(true)
    covariance = correct * total - sum(predicted[k] * true[k] for k in classes)
    spread_predicted = total * total - sum(predicted[k] ** 2 for k in classes)
    spread_true = total * total - sum(true[k] ** 2 for k in classes)
    if spread_predicted == 0 or spread_true == 0:
        return 0.0
    return covariance / math.sqrt(spread_predicted * spread_true)


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r; NaN when either side is constant."""
    _check_pairs(xs, ys)
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    dx = [x - mean_x for x in xs]
    dy = [y - mean_y for y in ys]
    spread = math.sqrt(sum(d * d for d in dx) * sum(d * d for d in dy))
    if spread == 0:
        return math.nan
    return sum(a * b for a, b in zip(dx, dy)) / spread


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``; a run of tied values each gets the mean of the ranks it spans ([5, 7, 7] →
    [1, 2.5, 2.5])."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks; NaN when either side is constant."""
    _check_pairs(xs, ys)
    return pearson(average_ranks(xs), average_ranks(ys))
