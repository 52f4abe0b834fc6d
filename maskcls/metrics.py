"""Macro F1, the competition's score, computed in one place for validation, inference, k-fold,
the tools and the benchmarks: the mean over ALL classes of each class's F1 (a class never
predicted nor present scores 0, as scikit-learn's zero_division=0 with labels=range(C)), over a
whole set of predictions at once (never averaged over batches).

Example: python -c "from maskcls.metrics import macro_f1; print(macro_f1([0, 1, 2], [0, 2, 2], 3))"
"""
import numpy as np

from maskcls.labels import TASKS, decode_label


def macro_f1(labels, preds, num_classes):
    """Macro F1 over `num_classes` classes from integer labels and predictions; 2 TP / (2 TP +
    FP + FN) per class, by one confusion count (fast enough for the tools' thousands of calls)."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    confusion = np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, -1)
    tp = np.diag(confusion).astype(np.float64)
    denom = confusion.sum(0) + confusion.sum(1)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def task_f1(labels, preds):
    """Macro F1 of each sub-task (mask, gender, age), decomposed from 18-class labels."""
    true, pred = np.array([decode_label(x) for x in labels]), np.array([decode_label(x) for x in preds])
    return {name: macro_f1(true[:, i], pred[:, i], size) for i, (name, size) in enumerate(TASKS.items())}


def _macro_f1_rows(weights, onehot, num_classes):
    """Macro F1 of each row of `weights` [R, N] (how often each image is drawn) given the images'
    (label, pred) cells as a one-hot [N, C*C]."""
    confusion = (weights @ onehot).reshape(len(weights), num_classes, num_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denom = confusion.sum(1) + confusion.sum(2)
    return np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0), axis=1)


def paired_bootstrap(pairs, num_classes, resamples=2000, seed=0, chunk=200):
    """The bootstrap distribution of the macro F1 difference B - A on held-out images both
    predicted: `pairs` [(labels, preds of A, preds of B, group of each image)], one per seed pair
    (or one). Each resample draws the pairs with replacement (the seed spread, where there are
    several) and, in each pair drawn, its groups (persons) with replacement, the same draw for A
    and B; the statistic is the mean over the pairs drawn of F1(B) - F1(A). Returns [resamples]."""
    rng = np.random.default_rng(seed)
    cells = num_classes * num_classes
    prepared = []
    for labels, preds_a, preds_b, groups in pairs:
        _, group_of = np.unique(np.asarray(groups), return_inverse=True)
        labels = np.asarray(labels, dtype=np.int64)
        onehots = [np.eye(cells, dtype=np.float64)[labels * num_classes + np.asarray(p, dtype=np.int64)]
                   for p in (preds_a, preds_b)]
        prepared.append((group_of, group_of.max() + 1, *onehots))
    diffs = np.empty(resamples)
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        drawn = rng.integers(0, len(pairs), size=(n, len(pairs))) if len(pairs) > 1 else np.zeros((n, 1), dtype=int)
        total = np.zeros(n)
        for slot in range(drawn.shape[1]):
            for index, (group_of, groups, onehot_a, onehot_b) in enumerate(prepared):
                rows = np.flatnonzero(drawn[:, slot] == index)
                if not rows.size:
                    continue
                weights = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=rows.size)[:, group_of]
                weights = weights.astype(np.float64)
                total[rows] += (_macro_f1_rows(weights, onehot_b, num_classes)
                                - _macro_f1_rows(weights, onehot_a, num_classes))
        diffs[start:start + n] = total / drawn.shape[1]
    return diffs
