"""Generation metrics against hand-computed values."""

from __future__ import annotations

import pytest

from loraplex.trainer.metrics import exact_match, is_label_task, rouge_l, score, token_f1


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1", "rouge"),
    [
        ("2021-03-05", "2021-03-05", 1.0, 1.0, 1.0),
        (" 2021-03-05\n", "2021-03-05", 1.0, 1.0, 1.0),
        ("The date is 2021-03-05", "2021-03-05", 0.0, 0.4, 0.4),
        ("a b c d", "a c e", 0.0, 4 / 7, 4 / 7),  # f1: 2 common, p=2/4 r=2/3; lcs "a c" the same
        ("b a", "a b", 0.0, 1.0, 0.5),  # order matters for ROUGE-L only
        ("", "x", 0.0, 0.0, 0.0),
    ],
)
def test_pairs(prediction: str, reference: str, em: float, f1: float, rouge: float) -> None:
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert rouge_l(prediction, reference) == pytest.approx(rouge)


def test_label_tasks_get_accuracy() -> None:
    references = ["billing", "account", "billing", "shipping", "account", "billing"]
    assert is_label_task(references)
    predictions = ["billing", "Account\nbecause", "shipping", "shipping", "account.", "Billing"]
    metrics = score(predictions, references)
    assert metrics["accuracy"] == pytest.approx(4 / 6)  # case-insensitive, first line
    assert metrics["exact_match"] == pytest.approx(2 / 6)
    assert "accuracy" not in score(["x", "y", "z"], ["2021-01-01", "2020-02-02", "1999-09-09"])
