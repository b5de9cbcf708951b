"""The synthetic fictitious-people facts: deterministic, distinct, well-formed."""

from __future__ import annotations

import json
import re

import pytest

from devtools.synthetic import ATTRIBUTES, Fact, facts_to_rows, generate_people, write_jsonl


def test_same_seed_same_facts_other_seed_other_facts():
    a = generate_people(50, 6, seed=7)
    assert a == generate_people(50, 6, seed=7)
    assert a != generate_people(50, 6, seed=8)


def test_smaller_set_is_a_prefix_of_a_larger_one():
    # Person i depends only on the seed and i, not on how many people were asked for.
    assert generate_people(20, 4, seed=3) == generate_people(200, 4, seed=3)[:20]


def test_shape_and_distinct_names_at_full_size():
    people = generate_people(200, 6, seed=0)
    assert len(people) == 200
    assert all(len(facts) == 6 for facts in people)
    names = [facts[0].person for facts in people]
    assert len(set(names)) == 200
    for facts in people:
        assert len({f.person for f in facts}) == 1
        attrs = [f.attribute for f in facts]
        assert len(set(attrs)) == 6
        assert attrs == [a for a in ATTRIBUTES if a in attrs]  # canonical order
        assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", f.person) for f in facts)


def test_all_attributes_available():
    people = generate_people(3, len(ATTRIBUTES))
    assert [f.attribute for f in people[0]] == list(ATTRIBUTES)
    with pytest.raises(ValueError):
        generate_people(3, len(ATTRIBUTES) + 1)
    with pytest.raises(ValueError):
        generate_people(3, 0)


def test_fact_texts():
    people = generate_people(200, len(ATTRIBUTES), seed=1)
    facts = [f for person in people for f in person]
    assert all(isinstance(f, Fact) for f in facts)
    for f in facts:
        assert f.paraphrase != f.question
        assert f.question.endswith("?") and f.paraphrase.endswith("?")
        assert f.person in f.question and f.person in f.paraphrase
        # A short complete sentence that names the person.
        assert f.answer.startswith(f.person) and f.answer.endswith(".")
        assert len(f.answer.split()) <= 16
    # The name makes every answer unique: recall of one row cannot be credited to another.
    assert len({f.answer for f in facts}) == len(facts)
    # Paraphrases are never a training prompt, of this or any other fact.
    assert not {f.paraphrase for f in facts} & {f.question for f in facts}


def test_fact_is_frozen():
    fact = generate_people(1, 1)[0][0]
    with pytest.raises(AttributeError):
        fact.answer = "changed"  # type: ignore[misc]


def test_rows_format_and_unique_stable_ids():
    people = generate_people(120, 5, seed=2)
    rows = facts_to_rows(people)
    assert len(rows) == 600
    assert all(set(r) == {"id", "prompt", "response"} for r in rows)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"p\d{3}-[a-z_]+", i) for i in ids)
    first = people[3][0]
    row = next(r for r in rows if r["id"] == f"p003-{first.attribute}")
    assert row["prompt"] == first.question and row["response"] == first.answer
    assert facts_to_rows(generate_people(120, 5, seed=2)) == rows
    assert facts_to_rows(people[:1], id_prefix="x")[0]["id"].startswith("x000-")


def test_ids_widen_beyond_999_people():
    rows = facts_to_rows(generate_people(1001, 1))
    assert rows[0]["id"].startswith("p0000-") and rows[-1]["id"].startswith("p1000-")


def test_write_jsonl_roundtrip_and_atomic_replace(tmp_path):
    rows = facts_to_rows(generate_people(30, 3))
    rows.append({"id": "u", "prompt": "Où est né Søren?", "response": "À Tromsø."})
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(path, [{"id": "old"}])
    write_jsonl(path, rows)
    text = path.read_text(encoding="utf-8")
    assert "Tromsø" in text  # ensure_ascii=False: no \\u escapes
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp left


def test_write_jsonl_failure_keeps_old_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"id": "old"}])

    def rows():
        yield {"id": "new"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_text(encoding="utf-8") == '{"id": "old"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]
