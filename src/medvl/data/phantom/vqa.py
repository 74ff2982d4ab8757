"""Phantom VQA: questions about phantom chest radiographs, answered exactly from the ground truth.

Every case of a phantom is one synthetic patient. Questions are asked about the patient's own film
(the case image) or about other films of the same patient drawn with ``cxr2d.Visit`` (same
anatomy and findings: a later film, a grown or resolved finding, more nodules). Sides and zones are
the patient's (the patient's left is on the image right).

Question types (``QUESTION_TYPES``) and their answer sets (a *family* is one answer set of a type):

==============  ==========  ======================================  ====================================
type            family      answers                                 images
==============  ==========  ======================================  ====================================
presence        presence    yes / no                                the case (any finding present)
location        side        left / right                            the case (effusion, pneumothorax,
                                                                    nodule, consolidation)
location        zone        upper / middle / lower                  the case (nodule, consolidation)
count           nodules     0 / 1 / 2 / 3                           the case (0 or 1); 2-3: the case's
                                                                    own film with extra nodules
size            diameter    <6 mm / 6-8 mm / >8 mm                  the case (nodule diameter, mm), or
                                                                    its own film with the nodule resized
                                                                    into another bucket (``DIAMETERS``)
ratio           ctr         <0.45 / 0.45-0.50 / >0.50               the case (cardiothoracic ratio as
                                                                    drawn, AP magnification included)
progression     change      progressed / improved / stable          two films, earlier first: the case
                                                                    and a later film with the finding
                                                                    grown x 1.5 (``Visit.growing``: that
                                                                    finding only); the reverse order is
                                                                    improved; the case and a later film
                                                                    unchanged, in either order, stable
which_image     which       first / second                          two films, earlier first: the case,
                                                                    and a later film without the finding
==============  ==========  ======================================  ====================================

Templates: three or four paraphrases per family (``Family.templates``). A template that lists
the choices ("left or right?") or asks yes/no is ``CLOSED``, any other ``OPEN``, as VQA-RAD marks them.

Balance by construction, per split: questions are chosen in *rounds*. A round asks, for every
family of a type, each of its answers exactly once, all about the same subject (finding) and with
the same template; subjects take turns. A type stops at its quota (``per_case`` x patients / number
of types) or when no subject can fill a round any more (too few patients with that finding), so
every answer of a type, of a (type, subject) and of a template appears equally often: a model that
sees only the question is at chance. A patient answers at most one question per (family, subject).

Files (``write_phantom_vqa``, or ``generate_phantom(..., vqa=True)``), under ``<phantom>/vqa/``:
``train.json`` / ``val.json`` / ``test.json`` (one per split of the phantom: split by patient, so
no patient's films are in two splits), VQA-RAD keys (``qid``, ``image_name``, ``question``,
``answer``, ``answer_type``, ``question_type``, ``image_organ``) plus ``modality``, ``image_names``
(multi-image questions only, earlier film first), ``patient``, ``template`` and ``options`` (the
family's answers); ``images/`` holding every film a question names (the case images hard-linked, or
copied, from ``<phantom>/images/``; other films rendered), each named ``phantom_<patient>_<hash>.png``
whether it is the case's film or another (``_Films``: no name tells which, so none says anything about
an answer); ``images.csv`` (each film's patient, split and visit: provenance for checking, not for models).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...checks import check_number
from ...errors import InputError
from ...progress import progress_bar
from .cxr2d import ABNORMAL, GROW_RANGE, Visit, render_case

log = logging.getLogger(__name__)

QUESTION_TYPES = ("presence", "location", "count", "size", "ratio", "progression", "which_image")
GROW = 1.5  # Visit.grow of a progressed (or, in reverse order, improved) finding
DEFAULT_PER_CASE = 4
DIAMETERS = {"<6 mm": (3, 4, 5), "6-8 mm": (6, 7, 8), ">8 mm": (9, 10, 11, 12, 13, 14, 15)}  # size variants, mm
MAX_PER_CASE = 50
_SELECT_STREAM = 11  # question choice is seeded by (seed, _SELECT_STREAM, split number)

NOUNS = {"cardiomegaly": "cardiomegaly", "pleural_effusion": "pleural effusion", "nodule": "pulmonary nodule",
         "consolidation": "consolidation", "pneumothorax": "pneumothorax"}
WITH_ARTICLE = {name: noun if name == "cardiomegaly" else f"a {noun}" for name, noun in NOUNS.items()}


@dataclass(frozen=True)
class Family:
    """Questions of one type that share an answer set."""

    qtype: str  # one of QUESTION_TYPES
    name: str
    answers: tuple[str, ...]
    subjects: tuple[str, ...]  # the findings questions are about
    templates: tuple[tuple[str, bool], ...]  # (text with {finding} / {a_finding}, CLOSED?)


FAMILIES = (
    Family("presence", "presence", ("yes", "no"), ABNORMAL, (
        ("Is there {a_finding} on this chest radiograph?", True),
        ("Does this chest X-ray show {a_finding}?", True),
        ("Is {a_finding} present?", True),
        ("Any evidence of {finding}?", True),
    )),
    Family("location", "side", ("left", "right"), ("pleural_effusion", "pneumothorax", "nodule", "consolidation"), (
        ("Which side is the {finding} on?", False),
        ("Is the {finding} on the patient's left or right?", True),
        ("On which side of the chest is the {finding}?", False),
        ("Where is the {finding}: left or right hemithorax?", True),
    )),
    Family("location", "zone", ("upper", "middle", "lower"), ("nodule", "consolidation"), (
        ("In which lung zone is the {finding}?", False),
        ("Is the {finding} in the upper, middle or lower zone?", True),
        ("Which zone of the lung contains the {finding}?", False),
    )),
    Family("count", "nodules", ("0", "1", "2", "3"), ("nodule",), (
        ("How many pulmonary nodules are there?", False),
        ("How many nodules can be seen on this radiograph?", False),
        ("Count the lung nodules.", False),
    )),
    Family("size", "diameter", ("<6 mm", "6-8 mm", ">8 mm"), ("nodule",), (
        ("How large is the pulmonary nodule?", False),
        ("Is the nodule's diameter under 6 mm, 6 to 8 mm, or over 8 mm?", True),
        ("What size is the nodule?", False),
    )),
    Family("ratio", "ctr", ("<0.45", "0.45-0.50", ">0.50"), ("cardiomegaly",), (
        ("What is the cardiothoracic ratio?", False),
        ("Is the cardiothoracic ratio below 0.45, 0.45 to 0.50, or above 0.50?", True),
        ("How wide is the heart relative to the chest (cardiothoracic ratio)?", False),
    )),
    Family("progression", "change", ("progressed", "improved", "stable"), ABNORMAL, (
        ("Compared with the first image, has the {finding} progressed, improved or remained stable?", True),
        ("What is the interval change in the {finding} between the two films?", False),
        ("How has the {finding} changed from the first film to the second: progressed, improved or stable?", True),
    )),
    Family("which_image", "which", ("first", "second"), ABNORMAL, (
        ("Which image shows {a_finding}, the first or the second?", True),
        ("In which of the two films is there {a_finding}?", False),
        ("Which radiograph shows {a_finding}?", False),
    )),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}


@dataclass(frozen=True)
class PatientTruth:
    """The ground truth of one phantom case (one synthetic patient)."""

    index: int  # case index: the film is images/phantom_{index:05d}.png
    split: str
    findings: list[dict[str, Any]]  # PhantomCase.findings
    meta: dict[str, Any]  # PhantomCase.meta (age, sex, view, ctr)


@dataclass(frozen=True)
class Candidate:
    """A question that could be asked, with its answer, before the balanced choice."""

    patient: int
    family: str
    subject: str
    answer: str
    visits: tuple[Visit | None, ...]  # one per image, earlier film first; None = the case's own film


@dataclass(frozen=True)
class Question:
    """A chosen question."""

    candidate: Candidate
    template: int  # index into the family's templates


# ---------------------------------------------------------------------------------------------
# Answers from the ground truth.


def diameter_bucket(size_mm: float) -> str:
    """Nodule diameter bucket (mm, as in the Fleischner size classes)."""
    return "<6 mm" if size_mm < 6 else "6-8 mm" if size_mm <= 8 else ">8 mm"


def ctr_bucket(ctr: float) -> str:
    """Cardiothoracic ratio bucket (> 0.50 is cardiomegaly on a PA film)."""
    return "<0.45" if ctr < 0.45 else "0.45-0.50" if ctr <= 0.50 else ">0.50"


def _single_image(truth: PatientTruth) -> list[Candidate]:
    """Presence, side, zone, size and ratio questions about the case's own film."""
    names = {finding["name"] for finding in truth.findings}
    own = (None,)
    out = [Candidate(truth.index, "presence", name, "yes" if name in names else "no", own) for name in ABNORMAL]
    for finding in truth.findings:
        if finding["side"] is not None:
            out.append(Candidate(truth.index, "side", finding["name"], finding["side"], own))
        if finding["zone"] is not None:
            out.append(Candidate(truth.index, "zone", finding["name"], finding["zone"].split()[1], own))
    out.append(Candidate(truth.index, "ctr", "cardiomegaly", ctr_bucket(truth.meta["ctr"]), own))
    return out


def _size(truth: PatientTruth) -> list[Candidate]:
    """The nodule's diameter bucket on the case's film, and the other buckets on the same film with
    the nodule grown or shrunk to a diameter in them (``DIAMETERS``, varied by patient)."""
    nodule = next((finding for finding in truth.findings if finding["name"] == "nodule"), None)
    if nodule is None:
        return []
    own = diameter_bucket(nodule["size_mm"])
    out = [Candidate(truth.index, "diameter", "nodule", own, (None,))]
    for bucket, diameters in DIAMETERS.items():
        target = diameters[truth.index % len(diameters)]
        grow = (target + 4.0) / (nodule["size_mm"] + 4.0)  # Visit.grow scales the diameter + 4 mm
        if bucket != own and GROW_RANGE[0] <= grow <= GROW_RANGE[1]:
            resized = Visit(number=0, grow=grow, growing=("nodule",))
            out.append(Candidate(truth.index, "diameter", "nodule", bucket, (resized,)))
    return out


def _count(truth: PatientTruth) -> list[Candidate]:
    """0 or 1 nodule on the case's film; 2 and 3 on the same film with nodules added."""
    nodules = sum(finding["name"] == "nodule" for finding in truth.findings)
    if nodules == 0:
        return [Candidate(truth.index, "nodules", "nodule", "0", (None,))]
    extra = [Candidate(truth.index, "nodules", "nodule", str(k), (Visit(number=0, nodules=k),)) for k in (2, 3)]
    return [Candidate(truth.index, "nodules", "nodule", "1", (None,)), *extra]


def _two_films(truth: PatientTruth, stable_first: bool) -> list[Candidate]:
    """Progression and which-image questions: the case's film and a later one, in time order."""
    out = []
    for name in (finding["name"] for finding in truth.findings if finding["name"] in ABNORMAL):
        grown, later = Visit(number=1, grow=GROW, growing=(name,)), Visit(number=1)
        resolved = Visit(number=1, absent=(name,))
        stable = (None, later) if stable_first else (later, None)
        out += [Candidate(truth.index, "change", name, "progressed", (None, grown)),
                Candidate(truth.index, "change", name, "improved", (grown, None)),
                Candidate(truth.index, "change", name, "stable", stable),
                Candidate(truth.index, "which", name, "first", (None, resolved)),
                Candidate(truth.index, "which", name, "second", (resolved, None))]
    return out


def candidates(truth: PatientTruth, stable_first: bool = True) -> list[Candidate]:
    """Every question the patient could be asked, with its exact answer.

    ``stable_first``: whether the case's own film is the earlier one of a stable pair (the
    generator flips a seeded coin per patient, so the position of the case's film says nothing).
    """
    return _single_image(truth) + _size(truth) + _count(truth) + _two_films(truth, stable_first)


# ---------------------------------------------------------------------------------------------
# Balanced choice (see the module docstring).


class _Pools:
    """Candidates by (family, subject, answer), shuffled; picks mark (patient, family, subject) used."""

    def __init__(self, pool: Iterable[Candidate], rng: np.random.Generator) -> None:
        self.lists: dict[tuple[str, str, str], list[Candidate]] = defaultdict(list)
        for candidate in pool:
            self.lists[(candidate.family, candidate.subject, candidate.answer)].append(candidate)
        for key in sorted(self.lists):
            order = rng.permutation(len(self.lists[key]))
            self.lists[key] = [self.lists[key][int(i)] for i in order]
        self.used: set[tuple[int, str, str]] = set()

    def take_round(self, family: Family, subject: str) -> list[Candidate] | None:
        """One candidate per answer about ``subject``, from different patients; None if impossible."""
        picked: list[Candidate] = []
        this_round: set[int] = set()  # patients picked in this round
        for answer in sorted(family.answers, key=lambda a: len(self.lists[(family.name, subject, a)])):
            found = next((c for c in self.lists[(family.name, subject, answer)]
                          if c.patient not in this_round and (c.patient, c.family, c.subject) not in self.used), None)
            if found is None:
                return None
            this_round.add(found.patient)
            picked.append(found)
        return picked

    def commit(self, picked: list[Candidate]) -> None:
        for candidate in picked:
            self.used.add((candidate.patient, candidate.family, candidate.subject))
            self.lists[(candidate.family, candidate.subject, candidate.answer)].remove(candidate)


def _type_rounds(qtype: str, pools: _Pools, quota: int, rng: np.random.Generator) -> list[Question]:
    """Rounds of one question type until its quota or until a family cannot fill a round."""
    families = [family for family in FAMILIES if family.qtype == qtype]
    per_round = sum(len(family.answers) for family in families)
    turn = dict.fromkeys((family.name for family in families), 0)
    chosen: list[Question] = []
    while len(chosen) + per_round <= max(quota, per_round):
        round_questions = []  # kept only when every family fills the round: balance holds
        for family in families:
            picked = _next_subject(family, pools, turn)
            if picked is None:
                return chosen
            template = int(rng.integers(len(family.templates)))
            pools.commit(picked)
            round_questions += [Question(candidate, template) for candidate in picked]
        chosen += round_questions
    return chosen


def _next_subject(family: Family, pools: _Pools, turn: dict[str, int]) -> list[Candidate] | None:
    """A full round of ``family`` about the next subject (in turn) that can fill one."""
    count = len(family.subjects)
    for step in range(count):
        subject = family.subjects[(turn[family.name] + step) % count]
        picked = pools.take_round(family, subject)
        if picked is not None:
            turn[family.name] = (turn[family.name] + step + 1) % count
            return picked
    return None


def choose_questions(patients: list[PatientTruth], per_case: int, rng: np.random.Generator) -> list[Question]:
    """Balanced questions about one split's patients (see the module docstring)."""
    coins = rng.uniform(size=len(patients)) < 0.5
    pool = [c for truth, coin in zip(patients, coins, strict=True) for c in candidates(truth, bool(coin))]
    pools = _Pools(pool, rng)
    quota = math.ceil(per_case * len(patients) / len(QUESTION_TYPES))
    return [question for qtype in QUESTION_TYPES for question in _type_rounds(qtype, pools, quota, rng)]


# ---------------------------------------------------------------------------------------------
# Writing.


def question_text(question: Question) -> tuple[str, str]:
    """(question text, answer type CLOSED / OPEN) of a chosen question."""
    family = FAMILY_BY_NAME[question.candidate.family]
    text, closed = family.templates[question.template]
    subject = question.candidate.subject
    return text.format(finding=NOUNS[subject], a_finding=WITH_ARTICLE[subject]), "CLOSED" if closed else "OPEN"


class _Films:
    """Names the films questions use and renders the ones that are not case images.

    Every film of a patient, the case's own included, is ``images/phantom_<patient>_<tag>.png``, the tag a hash
    of the generator seed, the patient and the visit: a name says whose film it is (as the question's
    ``patient`` does) but not which film, so it says nothing about an answer (a count of 2-3 nodules is only
    ever asked on a film with nodules added; names that told the case film apart gave that away)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.names: dict[tuple[int, Visit | None], str] = {}

    def name(self, patient: int, visit: Visit | None) -> str:
        key = (patient, visit)
        if key not in self.names:
            digest = hashlib.sha256(repr((self.seed, patient, visit)).encode()).hexdigest()
            taken = set(self.names.values())
            length = 8
            while (name := f"images/phantom_{patient:05d}_{digest[:length]}.png") in taken:
                length += 1
            self.names[key] = name
        return self.names[key]


def _item(question: Question, qid: int, films: _Films) -> dict[str, Any]:
    candidate = question.candidate
    text, answer_type = question_text(question)
    images = [films.name(candidate.patient, visit) for visit in candidate.visits]
    item: dict[str, Any] = {"qid": qid, "image_name": images[0]}
    if len(images) > 1:
        item["image_names"] = images
    family = FAMILY_BY_NAME[candidate.family]
    return {**item, "question": text, "answer": candidate.answer, "answer_type": answer_type,
            "question_type": family.qtype, "image_organ": "CHEST", "modality": "X-Ray",
            "patient": f"phantom_{candidate.patient:05d}", "template": f"{family.name}-{question.template}",
            "options": list(family.answers)}


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no extra space) where the file system allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _write_films(root: Path, films: _Films, truths: dict[int, PatientTruth], render: dict[str, Any],
                 progress: bool) -> None:
    """The case films (linked) and the visit films (rendered) into ``root/vqa/images``, and images.csv."""
    out = root / "vqa"
    (out / "images").mkdir(parents=True)
    rows = []
    with progress_bar("phantom VQA films", len(films.names), enabled=progress) as advance:
        for (patient, visit), name in sorted(films.names.items(), key=lambda item: item[1]):
            if visit is None:
                _link_or_copy(root / "images" / f"phantom_{patient:05d}.png", out / name)
            else:
                case = render_case(render["seed"], patient, render["size"], render["extra_finding_prob"], visit)
                Image.fromarray(case.image).save(out / name)
            rows.append(_film_row(name, truths[patient], visit))
            advance(1)
    with (out / "images.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _film_row(name: str, truth: PatientTruth, visit: Visit | None) -> dict[str, Any]:
    row: dict[str, Any] = {"image": name, "patient": f"phantom_{truth.index:05d}", "case_index": truth.index,
                           "split": truth.split, "visit": "", "grow": "", "absent": "", "nodules": "", "growing": ""}
    if visit is not None:  # another film of the patient: what the visit changed
        row.update(visit=visit.number, grow=visit.grow, absent=" ".join(visit.absent), nodules=visit.nodules,
                   growing=" ".join(visit.growing))
    return row


def _item_order(question: Question) -> tuple[int, int]:
    """Questions in the files: by patient, then by type."""
    return question.candidate.patient, QUESTION_TYPES.index(FAMILY_BY_NAME[question.candidate.family].qtype)


def check_vqa_args(per_case: int) -> None:
    """Raise InputError unless ``per_case`` (questions per patient, on average at most) is usable."""
    check_number("vqa_per_case", per_case, minimum=1, maximum=MAX_PER_CASE, integer=True)


def write_phantom_vqa(root: str | Path, truths: list[PatientTruth], seed: int, size: int,
                      extra_finding_prob: float = 0.0, per_case: int = DEFAULT_PER_CASE,
                      progress: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Write ``root/vqa`` (question files per split, films, images.csv) for a phantom's patients.

    ``root`` is a phantom folder holding ``images/phantom_*.png`` for every truth (its case
    images); ``seed``, ``size`` and ``extra_finding_prob`` are those it was generated with, so the
    other films of a patient are the same patient. ``per_case``: at most this many questions per
    patient on average (fewer when the rarer answers run out, see the module docstring). Returns
    the items per split. Call it on a staging folder: ``generate_phantom(..., vqa=True)`` does.
    """
    check_vqa_args(per_case)
    root = Path(root)
    by_split: dict[str, list[PatientTruth]] = defaultdict(list)
    for truth in truths:
        by_split[truth.split].append(truth)
    films, written, qid = _Films(seed), {}, 0
    for number, split in enumerate(sorted(by_split)):
        rng = np.random.default_rng([seed, _SELECT_STREAM, number])
        questions = sorted(choose_questions(by_split[split], int(per_case), rng), key=_item_order)
        if not questions:
            log.warning("phantom VQA: no questions for split %s (%d patients: too few)", split, len(by_split[split]))
            continue
        written[split] = [_item(question, qid + k + 1, films) for k, question in enumerate(questions)]
        qid += len(questions)
    if not written:
        raise InputError(f"no phantom VQA questions from {len(truths)} cases: too few (generate more)")
    render = {"seed": seed, "size": size, "extra_finding_prob": extra_finding_prob}
    _write_films(root, films, {truth.index: truth for truth in truths}, render, progress)
    for split, items in written.items():
        text = json.dumps(items, indent=1, ensure_ascii=False) + "\n"
        (root / "vqa" / f"{split}.json").write_text(text, encoding="utf-8")
    log.info("phantom VQA: %s questions", ", ".join(f"{split} {len(items)}" for split, items in written.items()))
    return written


def answer_balance(items: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Count of each answer per question type: ``{type: {answer: count}}``."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for item in items:
        counts[item["question_type"]][item["answer"]] += 1
    return {qtype: dict(sorted(counter.items())) for qtype, counter in counts.items()}
