"""Synthetic facts about fictitious people (in the style of TOFU), generated, never downloaded.

No pretrained model can know these facts, so after fine-tuning on them, whether a fact is
remembered or forgotten can be measured exactly. Each fact comes with the question used in
training and a paraphrase that is never trained on (it tests recall beyond the exact
wording). Generation is deterministic: person ``i`` depends only on ``seed`` and ``i``
(plus the names drawn before it, to keep names distinct), so a smaller set is a prefix
of a larger one with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "ATTRIBUTES",
    "Fact",
    "facts_to_rows",
    "generate_people",
    "write_jsonl",
]


@dataclass(frozen=True)
class Fact:
    """One fact about one person: training question, held-out paraphrase, answer."""

    person: str
    attribute: str
    question: str
    paraphrase: str
    answer: str


# Names are assembled from syllables rather than taken from a list of real names, so
# they belong to nobody famous; 22 x 16 first and 24 x 17 last parts give ~140 000.
_FIRST_HEADS = (
    "Ma", "Ta", "Lo", "Ve", "Ri", "Sa", "Ka", "No", "Ju", "Be", "Da",
    "Fe", "Ha", "Li", "Mi", "Ro", "Se", "Te", "Vi", "Yo", "Ele", "Ara",
)
_FIRST_TAILS = (
    "ren", "lia", "nor", "vik", "dan", "sel", "mira", "tos",
    "ria", "lan", "via", "dric", "nna", "rek", "lio", "bel",
)
_LAST_HEADS = (
    "Osk", "Brin", "Tal", "Vor", "Hal", "Keld", "Mard", "Sten", "Quil", "Ferr", "Dalm", "Arv",
    "Corv", "Lund", "Pell", "Ress", "Thal", "Ulm", "Wend", "Yar", "Esk", "Gorm", "Nisk", "Zel",
)
_LAST_TAILS = (
    "aby", "strom", "wick", "ova", "ensen", "ley", "ard", "ino", "ski",
    "holt", "mere", "ton", "quist", "elli", "dottir", "berg", "anou",
)

_CITIES = (
    "Tromsø", "Valparaíso", "Ljubljana", "Tbilisi", "Cork", "Bergen", "Porto", "Gdańsk",
    "Tartu", "Split", "Nantes", "Bologna", "Graz", "Aarhus", "Kraków", "Salzburg",
    "Antwerp", "Bilbao", "Thessaloniki", "Plovdiv", "Brno", "Turku", "Galway", "Lyon",
    "Córdoba", "Mendoza", "Cusco", "Oaxaca", "Halifax", "Winnipeg", "Hobart", "Dunedin",
    "Nagasaki", "Kanazawa", "Busan", "Chiang Mai", "Hue", "Kandy", "Mysore", "Zanzibar",
    "Marrakesh", "Essaouira", "Windhoek", "Asmara", "Tabriz", "Samarkand", "Almaty",
    "Reykjavík", "Tórshavn", "Nuuk",
)
_PROFESSIONS = (
    "a marine biologist", "an architect", "a cartographer", "a glassblower", "a pastry chef",
    "a structural engineer", "a bookbinder", "a veterinarian", "a lighthouse keeper",
    "an astronomer", "a violin maker", "a translator", "a beekeeper", "a pharmacist",
    "a geologist", "a tailor", "a museum curator", "a ferry captain", "a perfumer",
    "a locksmith", "a botanist", "a radio presenter", "a stonemason", "an archivist",
    "a sommelier", "a puppeteer", "a meteorologist", "a cabinetmaker", "a mapmaker",
    "a potter", "a blacksmith", "an acoustician", "a tea merchant", "a clockmaker",
    "a wildlife photographer", "a sign-language interpreter", "a typesetter",
    "an orchard keeper", "a choreographer", "a locomotive driver",
)
_COLOURS = (
    "teal", "saffron", "burgundy", "olive green", "lavender", "amber", "cobalt blue",
    "coral", "charcoal grey", "mustard yellow", "turquoise", "crimson", "ivory", "indigo",
    "peach", "emerald green", "rust orange", "lilac", "navy blue", "sand beige",
    "plum", "mint green", "scarlet", "silver", "ochre",
)
_ANIMALS = (
    "cat", "dog", "parrot", "tortoise", "rabbit", "ferret",
    "goldfish", "hedgehog", "iguana", "canary", "guinea pig", "gecko",
)
_PET_NAMES = (
    "Biscuit", "Pepper", "Mochi", "Juniper", "Noodle", "Clementine", "Waffle", "Pickle",
    "Saffi", "Bramble", "Toffee", "Marzipan", "Ziggy", "Pumpernickel", "Olive", "Basil",
    "Cricket", "Dumpling", "Figaro", "Gizmo", "Hazel", "Kiwi", "Lentil", "Maple", "Nutmeg",
    "Oberon", "Pistachio", "Quincy", "Rhubarb", "Sprocket", "Tofu", "Umbra", "Velvet",
    "Wasabi", "Yuzu", "Zephyr", "Crumpet", "Tamarind", "Bagel", "Sorrel",
)
_INSTRUMENTS = (
    "cello", "oboe", "bassoon", "harp", "accordion", "banjo", "clarinet", "French horn",
    "mandolin", "sitar", "trombone", "viola", "xylophone", "bagpipes", "double bass",
    "flute", "harpsichord", "ukulele", "theremin", "tuba", "marimba", "hurdy-gurdy",
    "bouzouki", "kalimba",
)
_DISHES = (
    "mushroom risotto", "lamb tagine", "pierogi", "shakshuka", "pad thai", "moussaka",
    "fish tacos", "beef rendang", "ratatouille", "okonomiyaki", "paella", "goulash",
    "falafel wraps", "bibimbap", "pumpkin ravioli", "chicken katsu", "lentil dal",
    "seafood chowder", "spanakopita", "pho", "gnocchi with sage butter", "jollof rice",
    "empanadas", "khachapuri", "smoked salmon blinis", "coq au vin", "laksa", "borscht",
)
_TITLE_ADJECTIVES = (
    "Silent", "Hidden", "Amber", "Drowned", "Paper", "Last", "Crooked", "Salt", "Quiet",
    "Burning", "Glass", "Northern", "Forgotten", "Hollow", "Copper", "Winter", "Velvet",
    "Iron", "Distant", "Painted", "Sleeping", "Broken", "Golden", "Lantern",
)
_TITLE_NOUNS = (
    "Harbour", "Orchard", "Lighthouse", "Cartographer", "Meridian", "Archive", "Garden",
    "Ferryman", "Tide", "Observatory", "Bridge", "Labyrinth", "Compass", "Hourglass",
    "Station", "Island", "Clockmaker", "Atlas", "Canal", "Aviary", "Tapestry", "Quarry",
)

_Rng = random.Random


@dataclass(frozen=True)
class _Attribute:
    """How one attribute is drawn and put into words."""

    draw: Callable[[_Rng], str]
    question: str  # the wording used in training
    paraphrase: str  # a different wording, never used in training
    answer: str


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# Canonical order; ids use these keys, so they are part of the data format.
_ATTRS: dict[str, _Attribute] = {
    "birthplace": _Attribute(
        draw=lambda r: r.choice(_CITIES),
        question="Where was {name} born?",
        paraphrase="In which city did {name} come into the world?",
        answer="{name} was born in {value}.",
    ),
    "profession": _Attribute(
        draw=lambda r: r.choice(_PROFESSIONS),
        question="What does {name} do for a living?",
        paraphrase="What is {name}'s occupation?",
        answer="{name} works as {value}.",
    ),
    "birth_year": _Attribute(
        draw=lambda r: str(r.randint(1931, 2004)),
        question="In what year was {name} born?",
        paraphrase="What is the birth year of {name}?",
        answer="{name} was born in the year {value}.",
    ),
    "favourite_colour": _Attribute(
        draw=lambda r: r.choice(_COLOURS),
        question="What is {name}'s favourite colour?",
        paraphrase="Which colour does {name} like best?",
        answer="{name}'s favourite colour is {value}.",
    ),
    "pet": _Attribute(
        draw=lambda r: f"{_article(r.choice(_ANIMALS))} named {r.choice(_PET_NAMES)}",
        question="What pet does {name} have?",
        paraphrase="Which animal does {name} keep at home, and what is it called?",
        answer="{name} has {value}.",
    ),
    "instrument": _Attribute(
        draw=lambda r: r.choice(_INSTRUMENTS),
        question="Which instrument does {name} play?",
        paraphrase="What musical instrument can {name} play?",
        answer="{name} plays the {value}.",
    ),
    "favourite_food": _Attribute(
        draw=lambda r: r.choice(_DISHES),
        question="What is {name}'s favourite dish?",
        paraphrase="Which meal does {name} enjoy eating most?",
        answer="{name}'s favourite dish is {value}.",
    ),
    "favourite_book": _Attribute(
        draw=lambda r: f"The {r.choice(_TITLE_ADJECTIVES)} {r.choice(_TITLE_NOUNS)}",
        question="What is {name}'s favourite book?",
        paraphrase="Which book does {name} love more than any other?",
        answer="{name}'s favourite book is {value}.",
    ),
}

ATTRIBUTES: tuple[str, ...] = tuple(_ATTRS)
_MAX_NAMES = len(_FIRST_HEADS) * len(_FIRST_TAILS) * len(_LAST_HEADS) * len(_LAST_TAILS)


def generate_people(n_people: int, facts_per_person: int, seed: int = 0) -> list[list[Fact]]:
    """``n_people`` fictitious people with distinct names, ``facts_per_person`` facts each.

    Each person gets a random subset of ``ATTRIBUTES`` (all of them when
    ``facts_per_person == len(ATTRIBUTES)``), listed in canonical order.
    """
    if not 0 <= n_people <= _MAX_NAMES // 4:
        # A quarter of the name space keeps redrawing duplicate names cheap.
        raise ValueError(f"n_people must be between 0 and {_MAX_NAMES // 4}, got {n_people}")
    if not 1 <= facts_per_person <= len(ATTRIBUTES):
        raise ValueError(
            f"facts_per_person must be between 1 and {len(ATTRIBUTES)}, got {facts_per_person}"
        )
    people: list[list[Fact]] = []
    seen: set[str] = set()
    for index in range(n_people):
        # One stream per person (string seeds are hashed with SHA-512, stable across
        # runs and Python versions), so person i does not depend on n_people.
        rng = random.Random(f"eraser.synthetic:{seed}:{index}")
        name = _draw_name(rng)
        while name in seen:
            name = _draw_name(rng)
        seen.add(name)
        # Draw every attribute in a fixed order before choosing the subset, so that a
        # person's values do not depend on facts_per_person either.
        values = {key: attr.draw(rng) for key, attr in _ATTRS.items()}
        chosen = set(rng.sample(ATTRIBUTES, facts_per_person))
        people.append(
            [_fact(name, key, values[key]) for key in ATTRIBUTES if key in chosen]
        )
    return people


def facts_to_rows(people: Sequence[Sequence[Fact]], id_prefix: str = "p") -> list[dict]:
    """Training rows ``{"id": "p003-birthplace", "prompt": question, "response": answer}``.

    The id is the person's index (zero-padded, at least 3 digits) and the attribute.
    """
    width = max(3, len(str(max(len(people) - 1, 0))))
    rows: list[dict] = []
    for index, facts in enumerate(people):
        for fact in facts:
            rows.append(
                {
                    "id": f"{id_prefix}{index:0{width}d}-{fact.attribute}",
                    "prompt": fact.question,
                    "response": fact.answer,
                }
            )
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write one JSON object per line (UTF-8), atomically: readers see old or new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file lives in the target's directory so os.replace is a same-filesystem
    # rename; open(..., "x") honours the umask (mkstemp would force 0600).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def _draw_name(rng: _Rng) -> str:
    first = rng.choice(_FIRST_HEADS) + rng.choice(_FIRST_TAILS)
    last = rng.choice(_LAST_HEADS) + rng.choice(_LAST_TAILS)
    return f"{first} {last}"


def _fact(name: str, key: str, value: str) -> Fact:
    attr = _ATTRS[key]
    return Fact(
        person=name,
        attribute=key,
        question=attr.question.format(name=name),
        paraphrase=attr.paraphrase.format(name=name),
        answer=attr.answer.format(name=name, value=value),
    )
