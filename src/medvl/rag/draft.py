"""Retrieval-augmented report drafts: the nearest cases' reports merged by consensus, with citations.

``draft_report(index, model, image)`` embeds the image, retrieves the ``k`` nearest indexed cases
(never the image itself: an indexed case with the same pixels is left out, ``indexed_copies``) and calls
``draft_from_hits``:

1. Weights: a neighbour weighs its cosine similarity to the query (negative ones count 0; all
   equal if none is positive). "Support" below is a weighted share of the neighbours with a report.
2. Findings: each neighbour's report is labelled (``ReportLabeller``: positive / uncertain /
   negative per finding, plus the normal entry). A finding's **consensus** status is the status
   whose support is above ``min_support`` (default 0.5, a weighted majority; so at most one).
3. Abstention, with a reason: the image is blank or streaked as the model sees it (``draft_report``:
   ``medvl.data.audit.input_flags``; no retrieval); no cases or no reports; the nearest case's similarity is below
   ``min_similarity`` ("far"); or neither normality nor any abnormal finding (positive or
   uncertain) reaches consensus ("disagree").
4. Sentences: each neighbour sentence is grouped, per section (findings / impression), with the
   sentences that assert the same findings with the same statuses; sentences asserting nothing
   (technique, normal anatomy) are grouped by wording (token Jaccard >= ``WORDING_SIMILARITY`` and
   no different laterality, size or zone words: "the left lung is clear" is not "the right lung is
   clear").
   A group's support is the weighted share of neighbours having a sentence in it. Groups are
   taken by support, highest first: a group asserting findings is kept when every assertion is
   the consensus and it states something not yet stated; a group asserting nothing is kept when
   its own support is above ``min_support``. Its text is the member wording closest to all the
   others (weighted), and it cites every neighbour in the group (``cases``), those whose own
   sentence has that wording (nearly, and naming no other side, size, zone or measure) first
   (``wording_from``). Details (``DETAILS``: laterality, size and
   zone words, and measurements such as "14 mm") are first put to a weighted vote, each neighbour
   counting once per detail: for a sentence asserting a positive or uncertain finding, over every
   sentence of the neighbours that asserts it, findings and impression alike; else within the
   group; a tie (in the vote and in the nearest naming neighbour's similarity) elects no detail of the kind.
   Only wordings agreeing with the vote are candidates (a finding's group with none is left
   out), so the draft does not state a left effusion in one sentence and a right one in the next,
   nor a right upper zone consolidation in the findings and a right middle zone one in the impression.
   A wording naming an identifier (a number other than a measurement: a date, time or accession number; a
   name after a title, "Dr Smith") is a candidate only when neighbours holding more than ``min_support`` of
   the weight name it too: a draft does not carry one neighbour's (another patient's) dates or names.
5. The knowledge base's entries of the drafted findings are attached, and with a model the
   entries closest to the image embedding (``related``).

Report text is patient data: nothing here logs it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_number
from ..errors import InputError
from ..index.base import Hit
from .knowledge import KnowledgeBase
from .labels import (
    FINDINGS_SECTION,
    IMPRESSION_SECTION,
    POSITIVE,
    STATUSES,
    UNCERTAIN,
    ReportLabeller,
    Sentence,
    merge,
    with_normal,
)

DEFAULT_K = 10
MAX_K = 1000
MIN_SUPPORT = 0.5  # a status is the consensus when more than this weighted share of neighbours states it
MIN_SIMILARITY = 0.5  # abstain when the nearest case's cosine similarity is below this
WORDING_SIMILARITY = 0.5  # token Jaccard from which two sentences count as the same wording
FAR, DISAGREE, NO_CASES, NO_REPORTS, NO_CONTENT = "far", "disagree", "no_cases", "no_reports", "no_content"
# Detail words voted on within a group, so one draft does not mix a left and a right effusion
DETAILS = ({"left", "right", "bilateral"}, {"small", "moderate", "large", "mild", "marked", "tiny", "massive"},
           {"upper", "middle", "lower", "apical", "basal", "basilar"})
_MEASURE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b")  # a measurement such as "14 mm" or "1.5 cm"
# What may identify one examination or patient: a number other than a measurement (a date, time, accession or
# bed number) and a name after a title ("Dr Smith")
_NUMBER = re.compile(r"\d+")
_TITLED_NAME = re.compile(r"\b(?:dr|doctor|mr|mrs|ms|miss|prof|professor|nurse)\b\.?\s+([a-z][a-z'-]*)")
_STOP = {"a", "an", "the", "is", "are", "there", "of", "in", "with", "and", "to", "at", "for", "on", "be", "this",
         "that", "about", "seen", "noted", "identified", "which", "it", "its", "as", "by", "also"}


@dataclass
class DraftSentence:
    """One drafted sentence and the neighbours it comes from."""

    text: str = field(repr=False)  # from neighbours' reports: patient data, kept out of repr
    section: str  # findings | impression
    findings: dict[str, str]  # finding -> positive | uncertain | negative that the sentence asserts
    support: float  # weighted share (0-1) of neighbours with an equivalent sentence
    cases: list[str]  # citations: ids of the neighbours with an equivalent sentence, nearest first
    wording_from: list[str]  # the cited neighbours whose own sentence has (nearly) this wording


@dataclass
class FindingSupport:
    """How the neighbours' reports stand on one finding."""

    name: str
    consensus: str | None  # the status above min_support, or None
    support: dict[str, float]  # status -> weighted share of neighbours
    cases: list[str]  # ids of the neighbours stating the consensus status (all stating it if none)


@dataclass
class Neighbour:
    id: str
    score: float  # cosine similarity to the query
    weight: float  # share of the total weight (sums to 1 over neighbours with a report)
    split: str = ""
    labels: dict[str, Any] = field(default_factory=dict)
    has_report: bool = True


@dataclass
class Draft:
    """A drafted report, or an abstention with its reason; every sentence cites case ids."""

    sentences: list[DraftSentence]
    findings: list[FindingSupport]
    neighbours: list[Neighbour]
    abstained: bool = False
    abstention: str | None = None  # far | disagree | no_cases | no_reports | no_content
    reason: str | None = None  # one line for people
    definitions: list[dict[str, Any]] = field(default_factory=list)  # knowledge entries of drafted findings
    related: list[dict[str, Any]] = field(default_factory=list)  # entries closest to the image (with score)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def consensus(self) -> dict[str, str]:
        return {f.name: f.consensus for f in self.findings if f.consensus}

    def text(self) -> str:
        """The draft as a report: ``FINDINGS: ... IMPRESSION: ...`` (empty when abstaining)."""
        parts = []
        for section, header in ((FINDINGS_SECTION, "FINDINGS"), (IMPRESSION_SECTION, "IMPRESSION")):
            body = " ".join(_sentence_case(s.text) for s in self.sentences if s.section == section)
            if body:
                parts.append(f"{header}: {body}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "text": self.text(), "consensus": self.consensus}


def check_settings(k: int, min_support: float, min_similarity: float, related: int = 0) -> None:
    """InputError unless 1 <= k <= 1000, 0 <= min_support < 1 (a consensus needs more than it),
    -1 <= min_similarity <= 1 (a cosine similarity) and related >= 0, all finite."""
    check_number("k", k, minimum=1, maximum=MAX_K, integer=True)
    check_number("min_support", min_support, minimum=0, maximum=1)
    if min_support >= 1:
        raise InputError(f"min_support must be < 1 (a consensus needs more than this share), got {min_support}")
    check_number("min_similarity", min_similarity, minimum=-1, maximum=1)
    check_number("related", related, minimum=0, integer=True)


def draft_report(index, model, image: str | Path | np.ndarray, *, k: int = DEFAULT_K, where: str | None = None,
                 labeller: ReportLabeller | None = None, min_support: float = MIN_SUPPORT,
                 min_similarity: float = MIN_SIMILARITY, exclude: Sequence[str] = (), related: int = 0,
                 verify_model: bool = True) -> Draft:
    """Draft a report for ``image`` from its ``k`` nearest cases in ``index`` (built with ``model``).

    ``exclude`` drops case ids from the neighbours (e.g. the query itself); ``where`` filters cases
    as in ``medvl search``; ``related`` > 0 also retrieves that many knowledge entries by the
    similarity of their text embeddings to the image embedding (``KnowledgeBase.retrieve``).
    ``verify_model``: as in ``medvl.index.search_index``.
    """
    from ..data.audit import input_flags
    from ..index.base import check_model
    from ..index.search import embed_query

    check_settings(k, min_support, min_similarity, related)
    if verify_model:
        check_model(index.info, model, index.location)
    labeller = labeller or ReportLabeller()
    # read once (as the model reads it: HU for a DICOM when it has windows): checked, embedded, hashed
    pixels = image if isinstance(image, np.ndarray) else model.preprocessor.read(image)
    tensor = model.preprocessor.load(pixels, source=None if isinstance(image, np.ndarray) else image)
    flags = input_flags(tensor.numpy())
    if flags:  # a blank or streaked image is near some case too: drafting from those would be invention
        settings = {"k": k, "min_support": min_support, "min_similarity": min_similarity, "input_flags": flags,
                    "left_out_copies": []}
        return _abstain([], [], NO_CONTENT, f"the image is {' and '.join(flags)} as the model sees it, nothing to "
                        f"draft from ({'; '.join(flags.values())})", settings)
    vector = embed_query(model, image=tensor)
    copies = indexed_copies(index, pixels)
    dropped = set(exclude) | set(copies)
    hits = index.search(vector, k=min(k + len(dropped), 10_000), where=where)[0]
    hits = [h for h in hits if h.id not in dropped][:k]
    draft = draft_from_hits(hits, labeller, min_support=min_support, min_similarity=min_similarity)
    draft.settings["k"] = k
    draft.settings["left_out_copies"] = copies
    if related > 0:
        nearest = labeller.knowledge.retrieve(model, vector, related)
        draft.related = [{**f.card(), "score": round(score, 4)} for f, score in nearest]
    return draft


def indexed_copies(index, pixels: np.ndarray) -> list[str]:
    """Ids of the indexed cases whose image is ``pixels`` itself (the same decoded pixels, ``pixel_sha256``, as
    the index records them; ``context.indexed_ids``): a draft for an indexed image would otherwise cite the
    image's own report. A volume gives none (the index hashes volumes slab by slab as it streams them)."""
    from ..index.cases import pixel_sha256
    from .context import indexed_ids

    if pixels.ndim > 3 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        return []  # a volume: the index hashes those slab by slab while streaming them
    return sorted(indexed_ids(index, [pixel_sha256(pixels)])[0])


def draft_from_hits(hits: Sequence[Hit], labeller: ReportLabeller | None = None, *,
                    min_support: float = MIN_SUPPORT, min_similarity: float = MIN_SIMILARITY) -> Draft:
    """Draft from already retrieved neighbours (nearest first); see the module docstring."""
    check_settings(max(1, len(hits)), min_support, min_similarity)
    labeller = labeller or ReportLabeller()
    settings = {"k": len(hits), "min_support": min_support, "min_similarity": min_similarity}
    with_report = [h for h in hits if h.text and h.text.strip()]
    weights = _weights([h.score for h in with_report])
    weight_of = dict(zip((h.id for h in with_report), weights, strict=True))
    neighbours = [Neighbour(h.id, round(float(h.score), 4), round(float(weight_of.get(h.id, 0.0)), 4), h.split,
                            dict(h.labels), h.id in weight_of) for h in hits]
    if not hits:
        return _abstain([], [], NO_CASES, "no similar cases found (empty index or nothing passes the filter)",
                        settings)
    sentences = [labeller.sentences(h.text) for h in with_report]
    findings = _finding_support(with_report, weights, sentences, labeller.knowledge, min_support)
    top = max(float(h.score) for h in hits)
    if not with_report:
        return _abstain(neighbours, findings, NO_REPORTS, "none of the nearest cases has a report", settings)
    if top < min_similarity:  # named as in the draft's settings: the service's field, the CLI's --min-similarity
        return _abstain(neighbours, findings, FAR, f"the nearest case is too far: similarity {top:.3f} < "
                        f"{min_similarity:.3f} (min_similarity)", settings)
    consensus = {f.name: f.consensus for f in findings if f.consensus}
    if not _agreed(consensus, labeller.knowledge):
        return _abstain(neighbours, findings, DISAGREE, _disagreement(findings, labeller.knowledge, min_support),
                        settings)
    kept = _select(with_report, weights, sentences, consensus, min_support)
    drafted = [name for name, status in consensus.items() if status in (POSITIVE, UNCERTAIN)]
    return Draft(kept, findings, neighbours, definitions=labeller.knowledge.cards(drafted), settings=settings)


def _abstain(neighbours, findings, code: str, reason: str, settings: dict) -> Draft:
    return Draft([], findings, neighbours, abstained=True, abstention=code, reason=reason, settings=settings)


def _weights(scores: Sequence[float]) -> np.ndarray:
    """Each neighbour's share of the total weight: its similarity, clipped at 0."""
    weights = np.clip(np.asarray(scores, dtype=float), 0.0, None)
    if weights.sum() <= 0:
        weights = np.ones(len(scores))
    return weights / weights.sum() if len(weights) else weights


def _finding_support(hits: Sequence[Hit], weights: np.ndarray, sentences: list[list[Sentence]],
                     knowledge: KnowledgeBase, min_support: float) -> list[FindingSupport]:
    labels = [with_normal(merge(s.findings for s in report), knowledge) if report else {} for report in sentences]
    names = list(dict.fromkeys(name for report in labels for name in report))
    result = []
    for name in names:
        support = {status: float(sum(w for w, lab in zip(weights, labels, strict=True) if lab.get(name) == status))
                   for status in STATUSES}
        consensus = next((s for s in STATUSES if support[s] > min_support), None)
        cases = [h.id for h, lab in zip(hits, labels, strict=True)
                 if name in lab and (consensus is None or lab[name] == consensus)]
        result.append(FindingSupport(name, consensus, {s: round(v, 4) for s, v in support.items() if v > 0}, cases))
    return sorted(result, key=lambda f: (-max(f.support.values(), default=0.0), f.name))


def _agreed(consensus: dict[str, str], knowledge: KnowledgeBase) -> bool:
    """Normality, or some abnormal finding (present or possible), reached consensus."""
    if knowledge.normal is not None and consensus.get(knowledge.normal) == POSITIVE:
        return True
    return any(consensus.get(name) in (POSITIVE, UNCERTAIN) for name in knowledge.abnormal)


def _disagreement(findings: list[FindingSupport], knowledge: KnowledgeBase, min_support: float) -> str:
    claims = []
    for f in findings:
        share = f.support.get(POSITIVE, 0.0) + f.support.get(UNCERTAIN, 0.0)
        if share > 0 and (f.name in knowledge.abnormal or f.name == knowledge.normal):
            claims.append((share, f.name))
    shown = ", ".join(f"{name} {share:.2f}" for share, name in sorted(claims, reverse=True)[:4]) or "none"
    return (f"the nearest cases disagree: neither normality nor any finding is stated by more than "
            f"{min_support:.2f} of them (weighted shares: {shown})")


@dataclass
class _Group:
    section: str
    assertions: frozenset  # {(finding, status)}
    members: list[tuple[int, str]] = field(default_factory=list)  # (neighbour index, sentence text)


def _groups(sentences: list[list[Sentence]]) -> list[_Group]:
    """Neighbour sentences grouped by section and assertions, or by wording when they assert nothing."""
    groups: dict[Any, _Group] = {}
    for i, report in enumerate(sentences):
        for sentence in report:
            assertions = frozenset(sentence.findings.items())
            key: Any = (sentence.section, assertions)
            if not assertions:
                key = _wording_key(groups, sentence)
            groups.setdefault(key, _Group(sentence.section, assertions)).members.append((i, sentence.text))
    return list(groups.values())


def _wording_key(groups: dict[Any, _Group], sentence: Sentence) -> Any:
    """The key of the first assertion-free group of the section whose first wording is close enough."""
    for key, group in groups.items():
        first = group.members[0][1]
        if group.section == sentence.section and not group.assertions \
                and jaccard(first, sentence.text) >= WORDING_SIMILARITY and not _conflict(first, sentence.text):
            return key
    return (sentence.section, "wording", len(groups))


def _select(hits: Sequence[Hit], weights: np.ndarray, sentences: list[list[Sentence]], consensus: dict[str, str],
            min_support: float) -> list[DraftSentence]:
    """Sentence groups that agree with the consensus, by support, each stating something new."""
    groups = _groups(sentences)
    finding_members: dict[str, list[tuple[int, str]]] = {}  # every sentence asserting a finding, any section
    for group in groups:
        for name in _voted_findings(group):
            finding_members.setdefault(name, []).extend(group.members)
    scored = [(_support(g, weights), order, g) for order, g in enumerate(groups)]
    kept: list[DraftSentence] = []
    stated: dict[str, set] = {FINDINGS_SECTION: set(), IMPRESSION_SECTION: set()}
    for support, _, group in sorted(scored, key=lambda item: (-item[0], item[1])):
        if group.assertions:
            if any(consensus.get(name) != status for name, status in group.assertions):
                continue
            if group.assertions <= stated[group.section]:
                continue
        elif support <= min_support:
            continue
        voters = [m for name in sorted(_voted_findings(group)) for m in finding_members[name]] or group.members
        drafted = _drafted(group, support, hits, weights, voters, min_support)
        if drafted is None:
            continue
        stated[group.section] |= group.assertions
        kept.append(drafted)
    sections = [FINDINGS_SECTION, IMPRESSION_SECTION]
    return sorted(kept, key=lambda s: (sections.index(s.section), -s.support))


def _support(group: _Group, weights: np.ndarray) -> float:
    return float(sum(weights[i] for i in {i for i, _ in group.members}))


def _voted_findings(group: _Group) -> set[str]:
    """The findings a group asserts as present (positive or uncertain): their details are voted on together."""
    return {name for name, status in group.assertions if status in (POSITIVE, UNCERTAIN)}


def _drafted(group: _Group, support: float, hits: Sequence[Hit], weights: np.ndarray,
             voters: list[tuple[int, str]], min_support: float) -> DraftSentence | None:
    """The group's wording closest to all its members (weighted) among those agreeing with the detail vote of
    ``voters`` (neighbour index, sentence) and naming no identifier of a minority (``_shared_identifiers``), and
    its citations; None when the group has no such wording (a finding's group: none agreeing with the vote)."""
    by_case: dict[int, list[str]] = {}
    for i, text in group.members:
        by_case.setdefault(i, []).append(text)
    every = list(dict.fromkeys(text for _, text in sorted(group.members)))
    wordings = _agreeing(every, voters, weights)
    if not wordings:
        if _voted_findings(group):
            return None
        wordings = every
    wordings = _shared_identifiers(wordings, group, weights, min_support)
    if not wordings:
        return None
    closeness = [sum(weights[i] * max(jaccard(w, t) for t in texts) for i, texts in by_case.items())
                 for w in wordings]
    chosen = wordings[int(np.argmax(closeness))]
    cited = sorted(by_case)
    close = [hits[i].id for i in cited
             if any(jaccard(chosen, t) >= WORDING_SIMILARITY and not _conflict(chosen, t) for t in by_case[i])]
    return DraftSentence(text=chosen, section=group.section, findings=dict(sorted(group.assertions)),
                         support=round(support, 4), cases=[hits[i].id for i in cited], wording_from=close)


def _identifiers(text: str) -> frozenset:
    """Numbers other than measurements, and names after a title: what may identify one examination."""
    lower = _MEASURE.sub(" ", text.lower())
    return frozenset(_NUMBER.findall(lower)) | frozenset(f"name:{n}" for n in _TITLED_NAME.findall(lower))


def _shared_identifiers(wordings: list[str], group: _Group, weights: np.ndarray, min_support: float) -> list[str]:
    """The wordings each of whose identifiers (``_identifiers``: a date, an accession number, a doctor's name)
    the group's neighbours holding more than ``min_support`` of the weight also name: a draft never carries one
    neighbour's dates or names (another patient's), cited to every neighbour of the group."""
    naming: dict[str, set[int]] = {}
    for i, text in group.members:
        for identifier in _identifiers(text):
            naming.setdefault(identifier, set()).add(i)
    shared = {identifier for identifier, cases in naming.items()
              if sum(float(weights[i]) for i in cases) > min_support}
    return [w for w in wordings if _identifiers(w) <= shared]


def _conflict(first: str, second: str) -> bool:
    """The two sentences name different details of one kind ("left lung" / "right lung", "8 mm" / "14 mm")."""
    return any(a and b and a != b for a, b in zip(_details(first), _details(second), strict=True))


@lru_cache(maxsize=65536)
def _details(text: str) -> tuple[frozenset, ...]:
    """Per kind of detail (``DETAILS``, then measurements), the ones the sentence names."""
    tokens = _tokens(text)
    measures = frozenset(f"{float(value):g} {unit}" for value, unit in _MEASURE.findall(text.lower()))
    return (*(tokens & words for words in DETAILS), measures)


def _agreeing(wordings: list[str], voters: list[tuple[int, str]], weights: np.ndarray) -> list[str]:
    """The wordings (nearest neighbour's first) whose details agree with the weighted vote of ``voters``
    (neighbour index, sentence): per kind, each neighbour naming a detail counts once for it."""
    named: dict[tuple[int, str], set[int]] = {}  # (kind, detail) -> neighbours naming it
    for i, text in voters:
        for kind, details in enumerate(_details(text)):
            for detail in details:
                named.setdefault((kind, detail), set()).add(i)
    # a detail's vote, then the similarity of its nearest neighbour: a tie on both leaves the kind undecided
    votes = {key: (round(sum(float(weights[i]) for i in cases), 9), round(max(float(weights[i]) for i in cases), 9))
             for key, cases in named.items()}
    winners: dict[int, str | None] = {}
    for kind in {kind for kind, _ in votes}:
        ranked = sorted(((vote, detail) for (k, detail), vote in votes.items() if k == kind), reverse=True)
        tied = len(ranked) > 1 and ranked[0][0] == ranked[1][0]
        winners[kind] = None if tied else ranked[0][1]
    return [w for w in wordings if all(details <= ({winners[kind]} if winners[kind] else set())
                                       for kind, details in enumerate(_details(w)) if kind in winners)]


@lru_cache(maxsize=65536)
def _tokens(text: str) -> frozenset:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP)


def jaccard(first: str, second: str) -> float:
    """Token Jaccard similarity of two sentences (lower case words, stop words and numbers left out)."""
    a, b = _tokens(first), _tokens(second)
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _sentence_case(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."

