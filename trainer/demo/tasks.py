"""Deterministic synthetic tasks where the small base model does poorly and a short LoRA run does well.

Each task turns a seeded ``random.Random`` into (instruction, input, output) alpaca records with one exactly
right answer, so held-out exact match measures the adapter. Train and test sets come from different seeds.

- ``date-iso``: a date written in words → ``YYYY-MM-DD``;
- ``extract-json``: a sentence about a person → ``{"name": ..., "age": ..., "city": ...}``;
- ``ticket-triage``: a customer support ticket → one of four labels.
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Record = dict[str, str]


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input, output)

    def records(self, count: int, seed: int) -> list[Record]:
        rng = random.Random(f"{self.name}:{seed}")
        return [
            {"instruction": self.instruction, "input": text, "output": answer}
            for text, answer in (self.make(rng) for _ in range(count))
        ]


_MONTHS = list(calendar.month_name)[1:]
_WEEKDAYS = list(calendar.day_name)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2035), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    name = _MONTHS[month - 1]
    weekday = _WEEKDAYS[calendar.weekday(year, month, day)]
    styles = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{name[:3]}. {day}, {year}",
        f"the {_ordinal(day)} of {name}, {year}",
        f"{weekday}, {name} {_ordinal(day)} {year}",
        f"{day}-{name[:3]}-{year}",
    ]
    return rng.choice(styles), f"{year:04d}-{month:02d}-{day:02d}"


_FIRST = [
    "Maria",
    "John",
    "Aiko",
    "Lars",
    "Fatima",
    "Pedro",
    "Chloe",
    "Ravi",
    "Ingrid",
    "Kwame",
    "Sofia",
    "Liam",
    "Mei",
    "Omar",
    "Elena",
    "Tomas",
    "Nadia",
    "Hugo",
    "Yuki",
    "Amara",
]
_LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Berg",
    "Haddad",
    "Costa",
    "Martin",
    "Patel",
    "Olsen",
    "Mensah",
    "Rossi",
    "Walsh",
    "Chen",
    "Farouk",
    "Petrova",
    "Novak",
    "Karimi",
    "Dubois",
    "Sato",
    "Okafor",
]
_CITIES = [
    "Lisbon",
    "Denver",
    "Osaka",
    "Oslo",
    "Beirut",
    "Porto",
    "Lyon",
    "Pune",
    "Bergen",
    "Accra",
    "Turin",
    "Dublin",
    "Taipei",
    "Cairo",
    "Sofia",
    "Prague",
    "Tehran",
    "Nantes",
    "Kyoto",
    "Lagos",
]


def _person(rng: random.Random) -> tuple[str, str]:
    name, age, city = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", rng.randint(18, 90), rng.choice(_CITIES)
    sentences = [
        f"{name} is {age} years old and lives in {city}.",
        f"Meet {name}, a {age}-year-old from {city}.",
        f"{city} is home to {name}, who just turned {age}.",
        f"At {age}, {name} moved to {city} last spring.",
        f"Our new member {name} ({age}) joins us from {city}.",
    ]
    return rng.choice(sentences), json.dumps({"name": name, "age": age, "city": city})


_TICKETS = {
    "billing": [
        "I was charged twice for my subscription",
        "my invoice shows the wrong amount",
        "the card payment failed but money left my account",
        "why did my monthly price go up",
        "I need a copy of last month's invoice",
    ],
    "technical": [
        "the app crashes when I open settings",
        "I get error 500 when uploading a file",
        "the page keeps loading forever",
        "sync stopped working on my laptop",
        "notifications do not arrive on my phone",
    ],
    "account": [
        "I cannot reset my password",
        "please change the email on my profile",
        "how do I delete my account",
        "my login says the user is locked",
        "I want to add a second user to my team",
    ],
    "shipping": [
        "my parcel has not arrived yet",
        "the tracking number does not work",
        "the box came damaged",
        "can you ship to a different address",
        "the courier left my order at the wrong door",
    ],
}
_OPENERS = ["Hello,", "Hi team,", "Good morning.", "Hey,", "Dear support,", ""]
_CLOSERS = ["Thanks.", "Please help.", "This is urgent!", "Regards, Sam", "Any update?", ""]


def _ticket(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(_TICKETS))
    body = rng.choice(_TICKETS[label])
    text = " ".join(
        part for part in (rng.choice(_OPENERS), body[0].upper() + body[1:] + ".", rng.choice(_CLOSERS)) if part
    )
    return text, label


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("date-iso", "Convert the date to ISO 8601 format (YYYY-MM-DD).", _date),
        Task("extract-json", 'Extract the person as JSON with the keys "name", "age" and "city".', _person),
        Task(
            "ticket-triage",
            "Classify the support ticket as billing, technical, account or shipping. Answer with the label only.",
            _ticket,
        ),
    )
}


def write_task_data(task: Task, directory: Path, train: int, test: int) -> tuple[Path, Path]:
    """``train.jsonl`` and ``test.jsonl`` (another seed, no input seen in training) for ``task``."""
    directory.mkdir(parents=True, exist_ok=True)
    train_records = task.records(train, seed=1)
    seen = {r["input"] for r in train_records}
    test_records = [r for r in task.records(test * 20, seed=2) if r["input"] not in seen]
    unique = list({r["input"]: r for r in test_records}.values())[:test]
    paths = (directory / "train.jsonl", directory / "test.jsonl")
    for path, records in zip(paths, (train_records, unique), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
