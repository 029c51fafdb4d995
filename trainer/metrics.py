"""Generation metrics of predictions against references: exact match, token F1, ROUGE-L, label accuracy.

Exact match compares whitespace-stripped strings. Token F1 (SQuAD style) and ROUGE-L (F-measure of the longest
common subsequence) compare lower-cased whitespace tokens. A *label task* is one whose references come from a
small set of labels; its accuracy compares the first line of the prediction case-insensitively with the label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

_MAX_LABELS = 20


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _f_measure(common: int, predicted: int, relevant: int) -> float:
    if common == 0:
        return 0.0
    precision, recall = common / predicted, common / relevant
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    return _f_measure(sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    return _f_measure(_lcs(pred, ref), len(pred), len(ref))


def is_label_task(references: Sequence[str]) -> bool:
    """References drawn from a few single-line labels, each seen more than once on average."""
    labels = {r.strip() for r in references}
    return (
        len(references) >= 2
        and len(labels) <= min(_MAX_LABELS, len(references) // 2)
        and all("\n" not in label for label in labels)
    )


def label_match(prediction: str, reference: str) -> float:
    lines = prediction.strip().splitlines()
    first = lines[0].strip().lower() if lines else ""
    return float(first == reference.strip().lower())


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean metrics over pairs; ``accuracy`` only for label tasks."""
    pairs = list(zip(predictions, references, strict=True))
    if not pairs:
        return {}
    metrics = {
        "exact_match": sum(exact_match(p, r) for p, r in pairs) / len(pairs),
        "token_f1": sum(token_f1(p, r) for p, r in pairs) / len(pairs),
        "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
    }
    if is_label_task(references):
        metrics["accuracy"] = sum(label_match(p, r) for p, r in pairs) / len(pairs)
    return metrics
