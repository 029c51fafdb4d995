"""Preparing a run's data before any model loads: read, split off validation, tokenize, truncate or drop, pack.

Everything that can be wrong with the data is found here, so a bad dataset fails in seconds, not after the base
model loaded. :class:`DataReport` counts what happened to over-long examples; the CLI prints it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from loraplex.trainer.config import TrainConfig
from loraplex.trainer.encode import Encoded, Encoder
from loraplex.trainer.errors import DataError
from loraplex.trainer.formats import Example, dataset_hash, read_dataset
from loraplex.trainer.packing import Row, pack_rows, single_rows


@dataclass(frozen=True)
class DataReport:
    train_examples: int
    val_examples: int
    truncated: int  # longer than max_length, cut to it
    dropped: int  # longer than max_length and dropped (or left without a trained token by truncation)
    train_rows: int  # rows per epoch (fewer than examples with packing)
    train_tokens: int  # tokens per epoch

    def describe(self) -> str:
        return (
            f"{self.train_examples} training / {self.val_examples} validation examples, {self.train_rows} rows and "
            f"{self.train_tokens} tokens per epoch; over max_length: {self.truncated} truncated, "
            f"{self.dropped} dropped"
        )


@dataclass(frozen=True)
class PreparedData:
    train_rows: list[Row]
    val_examples: list[Example]  # kept for generation metrics and reference statistics
    val_encoded: list[Encoded]
    dataset_hash: str
    report: DataReport


def _read_all(config: TrainConfig, validation: bool) -> list[Example]:
    examples: list[Example] = []
    for spec in config.val_datasets if validation else config.datasets:
        examples += read_dataset(spec)
    return examples


def split_validation(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded shuffle, then ``val_size`` (fraction < 1, else a count) held out."""
    count = round(val_size * len(examples)) if val_size < 1 else int(val_size)
    if val_size > 0:
        count = max(count, 1)
    if count >= len(examples):
        raise DataError(
            f"val_size={val_size} holds out {count} of {len(examples)} examples, leaving none to train on; "
            "lower val_size or add data"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _fit(encoded: list[Encoded], config: TrainConfig) -> tuple[list[Encoded], int, int]:
    kept: list[Encoded] = []
    truncated = dropped = 0
    for example in encoded:
        cut = len(example.input_ids) > config.max_length
        fitted = example.truncated(config.max_length) if cut else example
        if (cut and config.overlong == "drop") or fitted.num_targets == 0:
            dropped += 1
            continue
        truncated += cut
        kept.append(fitted)
    return kept, truncated, dropped


def _encode_held_out(examples: list[Example], encoder: Encoder, max_length: int) -> tuple[list[Example], list[Encoded]]:
    pairs = [(e, enc) for e in examples for enc in [encoder.encode(e)] if enc.num_targets]
    return [e for e, _ in pairs], [enc.truncated(max_length) for _, enc in pairs]


def held_out(config: TrainConfig, tokenizer: Any) -> tuple[list[Example], list[Encoded]]:
    """The run's held-out examples (``val_datasets``, else the same split as training) and their encodings."""
    if config.val_datasets:
        examples = _read_all(config, validation=True)
    else:
        examples = split_validation(_read_all(config, validation=False), config.val_size, config.seed)[1]
    return _encode_held_out(examples, Encoder(tokenizer, config.train_on_prompt), config.max_length)


def prepare_data(config: TrainConfig, tokenizer: Any) -> PreparedData:
    """Reads, splits and tokenizes the configured datasets; raises :class:`DataError` on any problem."""
    examples = _read_all(config, validation=False)
    if config.val_datasets:
        train, val = examples, _read_all(config, validation=True)
    else:
        train, val = split_validation(examples, config.val_size, config.seed)
    encoder = Encoder(tokenizer, config.train_on_prompt)
    train_encoded, truncated, dropped = _fit([encoder.encode(e) for e in train], config)
    if not train_encoded:
        raise DataError(
            f"all {len(train)} training examples were dropped (longer than max_length={config.max_length} or "
            "without a completion token); raise max_length or use overlong: truncate"
        )
    val_examples, val_encoded = _encode_held_out(val, encoder, config.max_length)
    rows = pack_rows(train_encoded, config.max_length) if config.packing else single_rows(train_encoded)
    specs = config.datasets + config.val_datasets
    return PreparedData(
        train_rows=rows,
        val_examples=val_examples,
        val_encoded=val_encoded,
        dataset_hash=dataset_hash(specs),
        report=DataReport(
            train_examples=len(train_encoded),
            val_examples=len(val_examples),
            truncated=truncated,
            dropped=dropped,
            train_rows=len(rows),
            train_tokens=sum(len(row.input_ids) for row in rows),
        ),
    )
