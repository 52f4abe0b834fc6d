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
