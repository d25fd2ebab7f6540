"""How good a classifier is on labelled images: accuracy, per-class precision, recall, F1, the confusion matrix.

What ``prolip eval`` reports (and ``--json`` writes): the figures a user needs to decide whether a fit helped,
computed from true and predicted labels only (no model), so they are the same for every kind of fit.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from prolip.errors import InputError


@dataclass(frozen=True)
class ClassReport:
    """One class's figures: precision (of the images predicted as it), recall (of its images), F1, support."""

    label: Hashable
    precision: float | None
    recall: float | None
    f1: float | None
    support: int


@dataclass(frozen=True)
class Report:
    """Classification figures of predictions against true labels.

    Attributes:
        classes: the labels, in the order of ``per_class`` and of the confusion matrix's rows and columns.
        confusion: ``confusion[t][p]``: images of class t predicted as p.
        per_class: one :class:`ClassReport` per class.
        accuracy: correct / all.
        balanced_accuracy: the mean recall over the classes that have images.
        macro_precision, macro_recall, macro_f1: unweighted means over the classes where each is defined
            (precision needs a prediction of the class, recall an image of it).
    """

    classes: tuple[Hashable, ...]
    confusion: tuple[tuple[int, ...], ...]
    per_class: tuple[ClassReport, ...]
    accuracy: float
    balanced_accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float

    def as_dict(self) -> dict[str, Any]:
        """JSON values: every figure, per-class rows by label."""
        return {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "per_class": [
                {
                    "label": _json(c.label),
                    "precision": c.precision,
                    "recall": c.recall,
                    "f1": c.f1,
                    "support": c.support,
                }
                for c in self.per_class
            ],
            "classes": [_json(c) for c in self.classes],
            "confusion": [list(row) for row in self.confusion],
        }


def classification_report(
    truth: Sequence[Hashable], predicted: Sequence[Hashable], classes: Sequence[Hashable]
) -> Report:
    """The :class:`Report` of ``predicted`` against ``truth``, over ``classes`` (every label must be one of them).

    Raises:
        InputError: no images, lengths differ, or a label is not one of ``classes``.
    """
    if len(truth) != len(predicted) or not truth:
        raise InputError(f"got {len(truth)} true labels and {len(predicted)} predictions; give one of each per image.")
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted({str(x) for x in (*truth, *predicted) if x not in index})
    if unknown:
        raise InputError(f"labels {unknown[:10]} are not among the classes {[str(c) for c in classes][:20]}.")
    k = len(classes)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(truth, predicted, strict=True):
        confusion[index[t]][index[p]] += 1
    rows = []
    for i, label in enumerate(classes):
        hits, support, claimed = confusion[i][i], sum(confusion[i]), sum(row[i] for row in confusion)
        precision = hits / claimed if claimed else None
        recall = hits / support if support else None
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else (0.0 if precision is not None and recall is not None else None)
        )
        rows.append(ClassReport(label, precision, recall, f1, support))
    return Report(
        classes=tuple(classes),
        confusion=tuple(tuple(row) for row in confusion),
        per_class=tuple(rows),
        accuracy=sum(confusion[i][i] for i in range(k)) / len(truth),
        balanced_accuracy=_mean(r.recall for r in rows),
        macro_precision=_mean(r.precision for r in rows),
        macro_recall=_mean(r.recall for r in rows),
        macro_f1=_mean(r.f1 for r in rows),
    )


def _mean(values: Any) -> float:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else 0.0


def _json(label: Hashable) -> Any:
    return label if isinstance(label, (str, int, float, bool)) else str(label)
