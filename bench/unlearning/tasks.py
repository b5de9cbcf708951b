"""The benchmark's data and tasks, generated with ``devtools.synthetic`` (nothing downloaded).

Four groups of fictitious people, disjoint, all drawn from one ``generate_people`` call:

- the *clean* set: trained on; the instance-removal tasks forget some of its people;
- the *corrupted* set: trained on after corrupting it (some answers swapped for another
  person's, some questions replaced by a question about something else); the response
  correction and query modification tasks repair it;
- the *held-out* people: never trained on, the "never seen" reference for forgetting and
  the utility probe that no erasure should disturb;
- the *calibration* people: never trained on either, kept apart from the evaluation so
  that a method that tunes itself to the held-out loss level (``+refine``) does not tune
  itself on the rows it is judged with.

Every fact has its training question and a paraphrase that is never trained on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from eraser.data import Row
from eraser.requests import Edit, UnlearningRequest
from devtools.synthetic import Fact, generate_people

IR, RC, QM = "instance_removal", "response_correction", "query_modification"


@dataclass(frozen=True)
class Task:
    """One unlearning request on one original training set, with its probe sets.

    ``probes`` maps a probe name to rows whose response is scored under the prompt:
    ``forget``/``forget_para`` (IR: the erased facts), ``old`` (RC/QM: the affected rows
    as trained: the wrong answer, or the answer under the wrong question), ``new`` and
    ``new_para`` (RC/QM: the corrected rows and their paraphrases), ``retain`` and
    ``retain_para`` (trained rows no task touches), ``never`` and ``never_para``
    (held-out people).
    """

    name: str
    kind: str
    title: str
    original: str  # which original adapter: "clean" or "corrupted"
    train: tuple[Row, ...]
    request: UnlearningRequest
    edits: tuple[Edit, ...]
    kept: tuple[Row, ...]  # the training set after the request: what retraining sees
    probes: dict[str, tuple[Row, ...]]
    # Held-out people apart from the evaluation's: what refinement may calibrate against.
    calibration: tuple[Row, ...] = ()
    facts: dict = field(default_factory=dict)  # counts and shares, for the report

    @property
    def target(self) -> str:
        """The probe whose loss should rise toward the never-trained level."""
        return "forget" if self.kind == IR else "old"


@dataclass(frozen=True)
class Data:
    clean: tuple[Row, ...]
    corrupted: tuple[Row, ...]
    tasks: tuple[Task, ...]
    summary: dict


def forget_counts(people: int, shares: tuple[float, ...]) -> list[int]:
    """People to forget for each share: at least one, rounded up (so a share is never under-run)."""
    return [max(1, math.ceil(share * people - 1e-9)) for share in shares]


def _rows(facts: list[Fact], prefix: str, index: int, width: int) -> list[tuple[Row, Fact]]:
    return [(Row(f"{prefix}{index:0{width}d}-{f.attribute}", f.question, f.answer), f) for f in facts]


def build(settings) -> Data:
    """The clean and corrupted training sets and every task, deterministically from the seed."""
    s = settings
    total = s.people + s.edit_people + s.held_out_people + s.calibration_people
    people = generate_people(total, s.facts, s.seed)
    clean_people = people[: s.people]
    edit_people = people[s.people : s.people + s.edit_people]
    held_start = s.people + s.edit_people
    held_people = people[held_start : held_start + s.held_out_people]
    cal_people = people[held_start + s.held_out_people :]
    width = max(3, len(str(total)))
    # Ids as devtools.synthetic.facts_to_rows makes them, with the person's index in the whole
    # generated list, so the three groups never clash.
    clean = [_rows(p, "p", i, width) for i, p in enumerate(clean_people)]
    edit = [_rows(p, "p", s.people + i, width) for i, p in enumerate(edit_people)]
    held = [_rows(p, "p", held_start + i, width) for i, p in enumerate(held_people)]
    calibration = tuple(r for i, p in enumerate(cal_people)
                        for r, _ in _rows(p, "p", held_start + s.held_out_people + i, width))

    def para(pairs):
        return tuple(Row(r.id, f.paraphrase, r.response) for r, f in pairs)

    never = tuple(r for person in held for r, _ in person)
    never_para = para([x for person in held for x in person])

    # ---- instance removal: disjoint groups of clean people, one per share
    rng = random.Random(f"bench.unlearning:{s.seed}:forget")
    order = list(range(s.people))
    rng.shuffle(order)
    counts = forget_counts(s.people, s.forget_shares)
    if sum(counts) + s.retain_probe_people > s.people:
        raise ValueError(f"{s.people} people cannot give forget sets of {counts} people and "
                         f"{s.retain_probe_people} untouched retain-probe people")
    clean_rows = tuple(r for person in clean for r, _ in person)
    # The utility probe: people that no task forgets, the same for every IR task.
    probe_people = order[sum(counts) : sum(counts) + s.retain_probe_people]
    retain_ir = [x for i in probe_people for x in clean[i]]
    tasks: list[Task] = []
    start = 0
    for share, k in zip(s.forget_shares, counts):
        chosen = order[start : start + k]
        start += k
        forget = [x for i in sorted(chosen) for x in clean[i]]
        request = UnlearningRequest(remove=tuple(r.id for r, _ in forget))
        tasks.append(Task(
            name=f"remove-{share * 100:g}pct",
            kind=IR,
            title=f"Instance removal: {share:.0%} of the people, rounded up to {k} of {s.people} people "
                  f"({len(forget)} of {len(clean_rows)} rows)",
            original="clean",
            train=clean_rows,
            request=request,
            edits=tuple(request.resolve(clean_rows)),
            kept=tuple(request.apply_to(clean_rows)),
            probes={
                "forget": tuple(r for r, _ in forget), "forget_para": para(forget),
                "retain": tuple(r for r, _ in retain_ir), "retain_para": para(retain_ir),
                "never": never, "never_para": never_para,
            },
            calibration=calibration,
            facts={"share": share, "people": k, "rows": len(forget), "row_share": len(forget) / len(clean_rows)},
        ))

    # ---- the corrupted set: wrong answers in one group (RC), wrong questions elsewhere (QM)
    rng = random.Random(f"bench.unlearning:{s.seed}:corrupt")
    group = edit[: s.rc_group_people]
    group_rows = [x for person in group for x in person]
    n_rc = max(1, round(s.rc_share * len(group_rows)))
    rc_pick = sorted(rng.sample(range(len(group_rows)), n_rc))
    rest_rows = [x for person in edit[s.rc_group_people :] for x in person]
    if s.qm_rows > len(rest_rows):
        raise ValueError(f"qm_rows={s.qm_rows} but only {len(rest_rows)} rows outside the corrupted group")
    qm_pick = sorted(rng.sample(range(len(rest_rows)), s.qm_rows))
    donors = [f for p in people[: s.people + s.edit_people] for f in p]  # never a held-out person's fact

    wrong_answer: dict[str, str] = {}
    for j in rc_pick:
        row, fact = group_rows[j]
        # Another person's value of the same attribute, said of this person.
        options = sorted({d.answer.replace(d.person, fact.person) for d in donors
                          if d.attribute == fact.attribute and d.person != fact.person} - {fact.answer})
        if not options:
            raise ValueError(f"no wrong answer available for {row.id}")
        wrong_answer[row.id] = rng.choice(options)
    wrong_question: dict[str, str] = {}
    for j in qm_pick:
        row, fact = rest_rows[j]
        mine = {f.attribute for p in edit_people if p[0].person == fact.person for f in p}
        # A question about an attribute this person has no fact for: the answer does not fit it.
        options = sorted({d.question.replace(d.person, fact.person) for d in donors if d.attribute not in mine})
        wrong_question[row.id] = rng.choice(options)

    edit_pairs = [x for person in edit for x in person]
    corrupted = tuple(Row(r.id, wrong_question.get(r.id, r.prompt), wrong_answer.get(r.id, r.response))
                      for r, _ in edit_pairs)
    truth = {r.id: (r, f) for r, f in edit_pairs}
    untouched = [truth[r.id] for r in corrupted if r.id not in wrong_answer and r.id not in wrong_question]
    retain_edit = untouched[: s.retain_probe_people * s.facts]
    by_id = {r.id: r for r in corrupted}
    for kind, fixes in ((RC, wrong_answer), (QM, wrong_question)):
        ids = sorted(fixes)
        if kind == RC:
            request = UnlearningRequest(correct_response=tuple((i, truth[i][0].response) for i in ids))
            what = (f"Response correction: {len(ids)} of {len(group_rows)} answers ({len(ids) / len(group_rows):.0%}) "
                    f"of {s.rc_group_people} people were trained with another person's value; corrected")
        else:
            request = UnlearningRequest(modify_query=tuple((i, truth[i][0].prompt) for i in ids))
            what = (f"Query modification: {len(ids)} questions were trained as a question about something else; "
                    f"repaired")
        tasks.append(Task(
            name="correct-response" if kind == RC else "modify-query",
            kind=kind,
            title=f"{what} ({len(corrupted)} training rows)",
            original="corrupted",
            train=corrupted,
            request=request,
            edits=tuple(request.resolve(corrupted)),
            kept=tuple(request.apply_to(corrupted)),
            probes={
                "old": tuple(by_id[i] for i in ids),
                "new": tuple(truth[i][0] for i in ids),
                "new_para": para([truth[i] for i in ids]),
                "retain": tuple(r for r, _ in retain_edit), "retain_para": para(retain_edit),
                "never": never, "never_para": never_para,
            },
            calibration=calibration,
            facts={"rows": len(ids), "row_share": len(ids) / len(corrupted)},
        ))

    summary = {
        "clean_people": s.people, "clean_rows": len(clean_rows),
        "corrupted_people": s.edit_people, "corrupted_rows": len(corrupted),
        "corrupted_answers": len(wrong_answer), "corrupted_questions": len(wrong_question),
        "held_out_people": s.held_out_people, "held_out_rows": len(never),
        "calibration_people": s.calibration_people, "calibration_rows": len(calibration),
        "facts_per_person": s.facts,
        "forget_people": dict(zip((t.name for t in tasks if t.kind == IR), counts)),
    }
    return Data(clean_rows, corrupted, tuple(tasks), summary)
