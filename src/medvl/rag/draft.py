"""Retrieval-augmented report drafts: the nearest cases' reports merged by consensus, with citations.

``draft_report(index, model, image)`` embeds the image, retrieves the ``k`` nearest indexed cases
(never the image itself: an indexed case with the same pixels is left out, and so are the other images of its case,
``medvl.index.search.search_other_cases``) and calls ``draft_from_hits``.

A neighbour is a case, not an image (``one_per_case``): images sharing a case id (MedPix's ``case_id``, a
``patient_id``) count once, as their case's nearest image with a report. Several images of one case share one report:
counted per image, one patient's report would be a "majority". Images without a case id count one each in the vote
(identical templated reports are different patients' more often than not), but the privacy rules below count
identical report texts once (``report_key``): a word, number or name is "used by 3 neighbours" only when 3 different
report texts use it, so one report stored under three images without a case id never passes them.

1. Weights: a neighbour weighs its cosine similarity to the query (negative ones count 0; all
   equal if none is positive). "Support" below is a weighted share of the neighbours with a report.
2. Findings: each neighbour's report is labelled (``ReportLabeller``: positive / uncertain /
   negative per finding, plus the normal entry). A finding's **consensus** status is the status
   whose support is above ``min_support`` (0.5 <= min_support < 1, default 0.5: a weighted majority, so at
   most one; a lower threshold would let a minority status, or normality and an abnormal finding together,
   be the consensus, and is refused).
3. Abstention, with a reason: the image is blank or streaked as the model sees it (``draft_report``:
   ``medvl.data.audit.input_flags``; no retrieval); no cases or no reports; the nearest case's similarity is below
   ``min_similarity`` ("far"); fewer than ``MIN_CASES`` (3) neighbours have a report ("few_reports"); neither
   normality nor any abnormal finding (positive or uncertain) reaches consensus ("disagree"); or a present or
   possible consensus finding has no sentence left to draft (step 4: every wording names a detail the vote does not
   elect or a few neighbours' identifier, or, for an abnormal finding, also states a finding without consensus;
   "no_wording"), as a draft silent on a finding most neighbours state would read as its absence; or no sentence
   is kept at all ("no_wording" too: a normal consensus may rest on reports stating no finding, such as clinical
   histories, ``labels.with_normal``, and an empty draft would read as "normal" without a neighbour saying so).
4. Sentences: each neighbour sentence is grouped, per section (findings / impression), with the
   sentences that assert the same findings with the same statuses; sentences asserting nothing
   (technique, normal anatomy) are grouped by wording (token Jaccard >= ``WORDING_SIMILARITY`` and
   no different laterality, size or zone words: "the left lung is clear" is not "the right lung is
   clear").
   A group's support is the weighted share of neighbours having a sentence in it (for the drafted sentence,
   of those whose sentence agrees with its details, below). Groups are
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
   A wording naming a date (3/12/2019, 10:45, a month or weekday name) or a number of ``LONG_NUMBER`` (4) or more
   digits is never a candidate; one naming another identifier (``_identifiers``: a number other than a
   measurement, a name after a title, "Dr Smith", "Dr. Smith", "Dr.Smith", a capitalised word where a person is
   named, whatever the word ("Results discussed with Good", "Frank Stone was notified"), or two or more capitalised
   words in a row (letters of any script: "Renée Dubois") that are no words of the knowledge base nor used in lower
   case by any neighbour's report, "John Smith") only when at least
   ``MIN_CASES`` (3) of the group's neighbours, holding more than ``min_support`` of the weight, name it too; one
   holding a word outside the knowledge base's and the labeller's vocabulary (``vocabulary``) only when at least
   ``MIN_CASES`` neighbours' reports use it, whatever their weights (a name in any case or script). A neighbour
   naming another identifier is not in ``wording_from``, and a group member whose sentence names another side,
   size, zone or measurement than the drafted wording is not cited: a sentence's ``cases`` and support are the
   members that state what it states. So a draft does not carry one or two neighbours' (other patients') dates
   or names, whatever k and the weights; k below ``MIN_CASES`` is refused (``check_k``), and with fewer
   neighbours holding a report the draft abstains ("few_reports").
5. With a model that has an OOD guard (``medvl ood fit``), the draft carries the image's OOD score and flag
   (``Draft.ood``): a draft for an image unlike the model's training images is flagged, not withheld, as the
   zero-shot and search answers are.
6. The knowledge base's entries of the drafted findings are attached, and with a model the
   entries closest to the image embedding (``related``): those written for the cases' body region only
   (``knowledge.in_scope``). The region (``settings["region"]``) is the one named in the labels or metadata
   (``knowledge.case_region``: MedPix's ``location_category``, a DICOM's Body Part Examined) of more than half the
   weight of the drafting cases that name one; None when none does (every entry applies, as for IU X-ray, whose
   records name none), ``""`` when they name several without such a majority (no region-scoped entry applies).
   Drafted findings whose entry is written for another region are named in ``settings["out_of_scope"]``, so a
   draft from head CT reports stating a "mass" does not carry "Lung mass: a pulmonary opacity".

Report text is patient data: nothing here logs it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_number
from ..errors import InputError
from ..index.base import Hit
from ..index.search import hit_case
from .knowledge import MIXED_REGIONS, KnowledgeBase, case_region
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
LOWEST_MIN_SUPPORT = 0.5  # below it two statuses (or normality and a finding) could both be the consensus
MIN_SIMILARITY = 0.5  # abstain when the nearest case's cosine similarity is below this
WORDING_SIMILARITY = 0.5  # token Jaccard from which two sentences count as the same wording
FAR, DISAGREE, NO_CASES, NO_REPORTS, NO_CONTENT = "far", "disagree", "no_cases", "no_reports", "no_content"
# a consensus finding whose every wording was left out (details vote, identifiers), or no sentence kept at all
NO_WORDING = "no_wording"
FEW_REPORTS = "few_reports"  # fewer than MIN_CASES neighbours with a report: every word would be one case's
# why a finding's sentences were all left out, for the no_wording reason
_IDENTIFIER_LEFT, _DETAIL_LEFT, _MIXED_LEFT = "identifier", "detail", "mixed"
# Detail words voted on within a group, so one draft does not mix a left and a right effusion
DETAILS = ({"left", "right", "bilateral"}, {"small", "moderate", "large", "mild", "marked", "tiny", "massive"},
           {"upper", "middle", "lower", "apical", "basal", "basilar"})
_MEASURE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b")  # a measurement such as "14 mm" or "1.5 cm"
# What may identify one examination or patient: a number other than a measurement (a date, time, accession or
# bed number) and a name after a title ("Dr Smith")
_NUMBER = re.compile(r"\d+")
_TITLES = ("dr", "doctor", "mr", "mrs", "ms", "miss", "prof", "professor", "nurse")
# the name after a title, any script's letters ("Dr Müller"), with or without a space after the full stop
# ("Dr.Smith"), initials skipped ("Dr. J. Smith"); the title in any case, the name capitalised and not all capitals
# (``_titled_names``): "MR imaging", "MS plaques", "the nurse noted" name no one
_TITLED_NAME = re.compile(r"\b(?i:" + "|".join(_TITLES) + r")\b(?:\.\s*|\s+)(?:[^\W\d_]\.\s*)*"
                          r"([^\W\d_]+(?:['-][^\W\d_]+)*)")
# dates in words: month and weekday names, "yesterday" / "today" / "tonight" / "tomorrow"; three-letter month
# abbreviations only capitalised ("Dec 9", not "dec" for decreased), "May" only beside a number ("May 5", "5 May")
_DATE_WORD = re.compile(r"\b(january|february|march|april|june|july|august|september|october|november|december|"
                        r"monday|tuesday|wednesday|thursday|friday|saturday|sunday|yesterday|today|tonight|tomorrow)\b",
                        re.I)
_MONTH_ABBREVIATION = re.compile(r"\b(Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\b")
_MAY = re.compile(r"\b(?:may\s+\d|\d+(?:st|nd|rd|th)?\s+may\b)", re.I)
# a capitalised word (not all capitals: PA, ICU) that does not start the sentence or a clause: part of a name when
# no report of the neighbours uses it in lower case, the knowledge base does not hold it and another such word is
# next to it ("John Smith"; alone it is as likely a term: "Hounsfield units"). Words of letters of any script
# ("Renée Dubois", "Łukasz Żuk"); the case of each letter is checked against _NAME_SHAPE
_LETTER_WORD = re.compile(r"(?<![\w'-])([^\W\d_]+(?:['-][^\W\d_]+)*)(?![\w'-])")
_NAME_SHAPE = re.compile(r"A(?:a+|['-]?A?a+)(?:['-]?A?a+)*")  # A an upper-case letter, a a lower-case one
_CLAUSE_MARKS = (":", ";", "(", "[", "\u2013", "\u2014", " -", "\u2022", "\u00b7")  # "\u2022": an inline bullet
# Where a person is named whatever the words are (a surname may be an ordinary word: "Stone", "Good", "Small"): the
# capitalised words right after "discussed with", "notified", "called to", ... ("Results discussed with Good"), right
# before "was notified", "were informed", ... ("Frank Stone was notified", at the start of the sentence too), and after
# a title ("Dr. Frank Stone"), initials ("J.") skipped. Roles, services and report nouns there are not names
# ("Referring Physician", "Emergency Department", "Results were called ...").
_NAME_BEFORE = re.compile(r"\b(?:discussed|reviewed|spoke|spoken|communicated|conveyed|reported|relayed|called|paged|"
                          r"notified|informed|telephoned|phoned|contacted|told|advised)(?:\s+(?:with|to))?\s+", re.I)
_NAME_AFTER = re.compile(r"\s*,?\s+(?:was|were|is|are|has\s+been|have\s+been|had\s+been)\s+(?:notified|informed|"
                         r"called|paged|contacted|told|telephoned|phoned|advised|made\s+aware)\b", re.I)
_NOT_NAMES = frozenset("""patient patients physician physicians doctor doctors clinician clinicians provider providers
    nurse nurses practitioner team teams staff family radiologist radiologists resident residents fellow fellows
    attending referring ordering covering treating primary care emergency department service services unit clinic
    ward floor room house officer radiology cardiology surgery surgical medicine medical oncology pulmonology
    pulmonary intensive critical urgent trauma thoracic nursing results result findings finding report reports
    study studies image images exam examination these this those above impression recommendations""".split())
# Words a draft may carry from a few reports: a word outside the vocabulary (``vocabulary``: the knowledge base's
# and the labeller's words), a number or a name is drafted only when at least MIN_CASES distinct neighbours use it,
# whatever their weights, so that no draft carries one patient's (or two patients') identifiers; and a date-like
# token (3/12/2019, 10:45, a month or weekday name) or a number of LONG_NUMBER or more digits (a year, an accession
# or record number) is never drafted. A draft therefore needs at least MIN_CASES neighbours with a report.
MIN_CASES = 3
LONG_NUMBER = 4
_DATE_LIKE = re.compile(r"(?<![\d.])\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}(?![\d.])|(?<!\d)\d{1,2}:\d{2}(?!\d)")
_LETTERS = re.compile(r"[^\W\d_]+")  # the words of any script, as the wording similarity reads them (``_tokens``)
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
    # finding -> weighted share (0-1) of neighbours stating its consensus status: a sentence asserting findings is
    # kept because each is the consensus (its own ``support`` may be lower: those stating its details too); empty
    # for a sentence asserting none, kept by its own support above min_support (``selection_rule``)
    consensus: dict[str, float] = field(default_factory=dict)


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
    abstention: str | None = None  # far | disagree | no_cases | no_reports | few_reports | no_content | no_wording
    reason: str | None = None  # one line for people
    definitions: list[dict[str, Any]] = field(default_factory=list)  # knowledge entries of drafted findings
    related: list[dict[str, Any]] = field(default_factory=list)  # entries closest to the image (with score)
    settings: dict[str, Any] = field(default_factory=dict)
    # with a model that has an OOD guard: the image's ood_score / out_of_distribution / ood_threshold
    # (models.ood); a draft for an image unlike the training images is unreliable, however well the cases agree
    ood: dict[str, Any] = field(default_factory=dict)

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
        """The draft as JSON, the OOD flag (``ood``) at the top level as in the search and zero-shot answers, and
        ``rule``: how its sentences were chosen, in one line for people (``selection_rule``)."""
        data = asdict(self)
        ood = data.pop("ood")
        rule = selection_rule(self.settings.get("min_support", MIN_SUPPORT))
        return {**data, **ood, "text": self.text(), "consensus": self.consensus, "rule": rule}


def selection_rule(min_support: float) -> str:
    """How a draft keeps a sentence (step 4 of the module docstring), in one line for people."""
    share = f"more than {min_support * 100:.1f}% of the cases (weighted by similarity)"
    return (f"A sentence stating findings is kept when each finding's status is the consensus: {share} state it. "
            "Its support, the share stating the sentence with its details (side, size, zone, measure), may be less. "
            f"A sentence stating no finding is kept when {share} state it. Citations name the cases of its support.")


def check_settings(k: int, min_support: float, min_similarity: float, related: int = 0) -> None:
    """InputError unless 3 <= k <= 1000 (``check_k``), 0.5 <= min_support < 1 (a consensus needs more than it: a
    weighted majority), -1 <= min_similarity <= 1 (a cosine similarity) and related >= 0, all finite."""
    check_k(k)
    _check_thresholds(min_support, min_similarity)
    check_number("related", related, minimum=0, integer=True)


def check_k(k: int, name: str = "k") -> None:
    """InputError unless ``MIN_CASES`` (3) <= k <= 1000: a word outside the vocabulary, a number or a name is drafted
    only when at least 3 neighbours use it, so fewer neighbours could draft almost nothing, and with one a draft
    would be a copy of the nearest report, its patient's identifiers included. ``name``: the setting as the
    caller's user knows it (``draft_k``)."""
    check_number(name, k, minimum=1, maximum=MAX_K, integer=True)
    if k < MIN_CASES:
        raise InputError(f"{name} must be >= {MIN_CASES}, got {k}: a draft states a word outside the knowledge "
                         f"base's vocabulary, a number or a name only when at least {MIN_CASES} of the cases use it "
                         "(never one patient's identifiers)", parameter=name)


def _check_thresholds(min_support: float, min_similarity: float) -> None:
    check_number("min_support", min_support, minimum=0, maximum=1)
    if min_support < LOWEST_MIN_SUPPORT:
        raise InputError(f"min_support must be >= {LOWEST_MIN_SUPPORT} (a weighted majority; below it a minority "
                         f"status, or normality and a finding together, could be the consensus), got {min_support}",
                         parameter="min_support")
    if min_support >= 1:
        raise InputError(f"min_support must be < 1 (a consensus needs more than this share), got {min_support}",
                         parameter="min_support")
    check_number("min_similarity", min_similarity, minimum=-1, maximum=1)


def draft_report(index, model, image: str | Path | np.ndarray | torch.Tensor, *, k: int = DEFAULT_K,
                 where: str | None = None, labeller: ReportLabeller | None = None, min_support: float = MIN_SUPPORT,
                 min_similarity: float = MIN_SIMILARITY, exclude: Sequence[str] = (), related: int = 0,
                 verify_model: bool = True, digests: Sequence[str] = ()) -> Draft:
    """Draft a report for ``image`` from its ``k`` nearest cases in ``index`` (built with ``model``).

    ``exclude`` drops case ids from the neighbours (e.g. the query itself); ``where`` filters cases
    as in ``medvl search``; ``related`` > 0 also retrieves that many knowledge entries by the
    similarity of their text embeddings to the image embedding (``KnowledgeBase.retrieve``).
    ``verify_model``: as in ``medvl.index.search_index``. ``image`` may also be the model's own input
    (``model.preprocessor.load``'s ``(C, *spatial)`` tensor, as ``search_index`` takes one: a volume the service
    streamed from its upload), with ``digests`` its pixel hashes (``medvl.index.build.hashed_image``) so that its
    indexed copies are left out as those of a file or an array are (``search_without_copies``).
    """
    from ..data.audit import input_flags
    from ..index.base import check_model
    from ..index.build import hashed_image
    from ..index.search import search_other_cases
    from ..models.ood import embed_checked

    check_settings(k, min_support, min_similarity, related)
    if verify_model:
        check_model(index.info, model, index.location)
    labeller = labeller or ReportLabeller()
    # read once (as the model reads it: HU for a DICOM when it has windows): checked, embedded, hashed (a NIfTI
    # volume slab by slab from its path, as the index hashed it, then streamed again by the model's loader)
    if isinstance(image, torch.Tensor):
        tensor = image
    else:
        digests, pixels = hashed_image(model.preprocessor, image)
        tensor = model.preprocessor.load(pixels, source=None if isinstance(image, np.ndarray) else image)
    flags = input_flags(tensor.numpy())
    if flags:  # a blank or streaked image is near some case too: drafting from those would be invention
        settings = {"k": k, "min_support": min_support, "min_similarity": min_similarity, "input_flags": flags,
                    "left_out_copies": [], "left_out_same_case": []}
        return _abstain([], [], NO_CONTENT, f"the image is {' and '.join(flags)} as the model sees it, nothing to "
                        f"draft from ({'; '.join(flags.values())})", settings)
    embedding, [ood] = embed_checked(model, tensor[None])  # the guard's flag from the same pass, if it has one
    vector = embedding.numpy()
    hits, copies, siblings = search_other_cases(index, vector, k, digests, where=where, exclude=exclude)
    draft = draft_from_hits(hits, labeller, min_support=min_support, min_similarity=min_similarity)
    draft.settings["k"] = k
    draft.settings["left_out_copies"] = copies
    draft.settings["left_out_same_case"] = siblings
    draft.ood = ood
    if related > 0:
        nearest = labeller.knowledge.retrieve(model, vector, related, region=draft.settings.get("region"))
        draft.related = [{**f.card(), "score": round(score, 4)} for f, score in nearest]
    return draft


def draft_from_hits(hits: Sequence[Hit], labeller: ReportLabeller | None = None, *,
                    min_support: float = MIN_SUPPORT, min_similarity: float = MIN_SIMILARITY) -> Draft:
    """Draft from already retrieved neighbours (nearest first), each case counted once (``one_per_case``); see the
    module docstring."""
    _check_thresholds(min_support, min_similarity)
    labeller = labeller or ReportLabeller()
    hits, same_case = one_per_case(hits)
    settings = {"k": len(hits), "min_support": min_support, "min_similarity": min_similarity,
                "same_case_as": same_case}
    with_report = [h for h in hits if _has_report(h)]
    weights = _weights([h.score for h in with_report])
    weight_of = dict(zip((h.id for h in with_report), weights, strict=True))
    region = _region(with_report, weights)
    settings["region"] = region
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
        shown = _below(top, min_similarity)
        return _abstain(neighbours, findings, FAR, f"the nearest case is too far: similarity {shown} < "
                        f"{min_similarity:g} (min_similarity)", settings)
    if len(with_report) < MIN_CASES:
        return _abstain(neighbours, findings, FEW_REPORTS, f"only {len(with_report)} of the nearest cases "
                        f"{'has a report' if len(with_report) == 1 else 'have reports'}; a draft needs at least "
                        f"{MIN_CASES}, as it states a word, number or name only when {MIN_CASES} of them use it",
                        settings)
    consensus = {f.name: f.consensus for f in findings if f.consensus}
    if not _agreed(consensus, labeller.knowledge):
        return _abstain(neighbours, findings, DISAGREE, _disagreement(findings, labeller.knowledge, min_support),
                        settings)
    common = common_words(labeller.knowledge, [h.text for h in with_report])
    rare = rare_words(labeller.knowledge, [h.text for h in with_report])
    kept, unworded = _select(with_report, weights, sentences, consensus, min_support, common,
                             abnormal=set(labeller.knowledge.abnormal), rare=rare)
    if unworded:  # a consensus finding must not vanish from a draft that is not an abstention
        return _abstain(neighbours, findings, NO_WORDING, _unworded_reason(unworded), settings)
    if not kept:  # an empty draft would read as "normal" without one neighbour's sentence saying so
        return _abstain(neighbours, findings, NO_WORDING, f"no sentence of the nearest cases' reports is stated by "
                        f"more than {min_support:.2f} of them (weighted) nor states a consensus finding: nothing to "
                        "draft", settings)
    shares = {f.name: f.support.get(f.consensus, 0.0) for f in findings if f.consensus}
    for sentence in kept:
        sentence.consensus = {name: shares[name] for name in sentence.findings}
    drafted = [name for name, status in consensus.items() if status in (POSITIVE, UNCERTAIN)]
    knowledge = labeller.knowledge
    settings["out_of_scope"] = [name for name in drafted if not knowledge.in_scope(name, region)]
    definitions = knowledge.cards(name for name in drafted if knowledge.in_scope(name, region))
    return Draft(kept, findings, neighbours, definitions=definitions, settings=settings)


def _region(hits: Sequence[Hit], weights: np.ndarray) -> str | None:
    """The body region (``knowledge.case_region``) of more than half the weight of the ``hits`` that name one; None
    when none names one (every entry applies), ``MIXED_REGIONS`` when they name several without such a majority (no
    region-scoped entry applies: half the cases of the head and half of the chest are no chest cases)."""
    shares: dict[str, float] = {}
    for hit, weight in zip(hits, weights, strict=True):
        region = case_region(hit.labels, hit.meta)
        if region is not None:
            shares[region] = shares.get(region, 0.0) + float(weight)
    if not shares:
        return None
    total = sum(shares.values())
    return next((region for region, share in shares.items() if share > total / 2), MIXED_REGIONS)


def one_per_case(hits: Sequence[Hit]) -> tuple[list[Hit], dict[str, str]]:
    """Each case's (``index.search.hit_case``: its case id, else its report text) nearest image with a report (its
    nearest image when none has one), nearest first; and each other image's id -> that image's id. Several images of
    one case share its report (MedPix's up to 15): counted per image, one patient's report would be a majority and
    its wording "used by 3 neighbours"."""
    chosen: dict[str, Hit] = {}
    for hit in hits:
        case = hit_case(hit)
        if case not in chosen or (not _has_report(chosen[case]) and _has_report(hit)):
            chosen[case] = hit
    kept = [hit for hit in hits if chosen[hit_case(hit)] is hit]
    return kept, {hit.id: chosen[hit_case(hit)].id for hit in hits if chosen[hit_case(hit)] is not hit}


def _has_report(hit: Hit) -> bool:
    return bool(hit.text and hit.text.strip())


def report_key(text: str | None) -> str:
    """A report's text as the privacy rules tell reports apart (``rare_words``, ``_shared_identifiers``): case and
    runs of white space do not make another report."""
    return " ".join((text or "").lower().split())


def _below(value: float, threshold: float) -> str:
    """``value`` (< ``threshold``) with 3 decimals, or as many more as it takes to show it below the threshold
    (0.9995 < 0.9999, not "1.000 < 1.000")."""
    for digits in range(3, 10):
        shown = f"{value:.{digits}f}"
        if float(shown) < threshold:
            return shown
    return f"{value:.10g}"


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
        above = [s for s in STATUSES if support[s] > min_support]  # one at most: min_support >= 0.5
        consensus = max(above, key=lambda s: support[s]) if above else None
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
            min_support: float, common: frozenset = frozenset(), abnormal: set[str] | None = None,
            rare: frozenset = frozenset()) -> tuple[list[DraftSentence], dict[str, str]]:
    """Sentence groups that agree with the consensus, by support, each stating something new; and the present
    or possible consensus findings none of whose groups could be drafted, with why (``_drafted``): no wording
    agreeing with the details vote, or every wording naming a minority's identifier; or, for an ``abnormal``
    finding, ``_MIXED_LEFT``: every sentence stating it also states a finding the neighbours do not agree on
    (such a sentence is never drafted). Normality is not listed: a draft without an abnormal finding reads as
    normal anyway."""
    groups = _groups(sentences)
    finding_members: dict[str, list[tuple[int, str]]] = {}  # every sentence asserting a finding, any section
    for group in groups:
        for name in _voted_findings(group):
            finding_members.setdefault(name, []).extend(group.members)
    scored = [(_support(g, weights), order, g) for order, g in enumerate(groups)]
    kept: list[DraftSentence] = []
    left_out: dict[str, str] = {}
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
        drafted = _drafted(group, hits, weights, voters, min_support, common, rare)
        if isinstance(drafted, str):
            for name in _voted_findings(group):
                left_out.setdefault(name, drafted)
            continue
        if not group.assertions and drafted.support <= min_support:  # its agreeing members are no majority
            continue
        stated[group.section] |= group.assertions
        kept.append(drafted)
    said = {name for assertions in stated.values() for name, _ in assertions}
    for group in groups:  # an abnormal consensus finding stated only beside findings without consensus
        for name, status in group.assertions:
            if name in (abnormal or ()) and consensus.get(name) == status and status in (POSITIVE, UNCERTAIN):
                left_out.setdefault(name, _MIXED_LEFT)
    sections = [FINDINGS_SECTION, IMPRESSION_SECTION]
    return (sorted(kept, key=lambda s: (sections.index(s.section), -s.support)),
            {name: why for name, why in sorted(left_out.items()) if name not in said})


def _unworded_reason(unworded: dict[str, str]) -> str:
    """One line: which consensus findings have no wording to draft, and why."""
    parts = []
    for why, text in ((_IDENTIFIER_LEFT, f"names a date, a long number, or a number, name or word that fewer than "
                                         f"{MIN_CASES} of the neighbours or a minority of the weight use (maybe "
                                         "another patient's)"),
                      (_DETAIL_LEFT, "names a side, size, zone or measurement the neighbours' vote does not elect"),
                      (_MIXED_LEFT, "also states a finding the neighbours do not agree on")):
        names = [name for name, cause in unworded.items() if cause == why]
        if names:
            parts.append(f"every wording of {', '.join(names)} {text}")
    return "; ".join(parts) + ": nothing to draft it from"


def _support(group: _Group, weights: np.ndarray) -> float:
    return float(sum(weights[i] for i in {i for i, _ in group.members}))


def _voted_findings(group: _Group) -> set[str]:
    """The findings a group asserts as present (positive or uncertain): their details are voted on together."""
    return {name for name, status in group.assertions if status in (POSITIVE, UNCERTAIN)}


def _drafted(group: _Group, hits: Sequence[Hit], weights: np.ndarray, voters: list[tuple[int, str]],
             min_support: float, common: frozenset = frozenset(), rare: frozenset = frozenset()) -> DraftSentence | str:
    """The group's wording closest to all its members (weighted) among those agreeing with the detail vote of
    ``voters`` (neighbour index, sentence) and naming nothing of a few neighbours (``_shared_identifiers``), and
    its citations: the members with a sentence naming no other detail (side, size, zone, measurement) than the
    wording, its support their share of the weight; when the group has no such wording, why: ``_DETAIL_LEFT`` (a
    finding's group: none agreeing with the vote) or ``_IDENTIFIER_LEFT``."""
    by_case: dict[int, list[str]] = {}
    for i, text in group.members:
        by_case.setdefault(i, []).append(text)
    every = list(dict.fromkeys(text for _, text in sorted(group.members)))
    wordings = _agreeing(every, voters, weights)
    if not wordings:
        if _voted_findings(group):
            return _DETAIL_LEFT
        wordings = every
    wordings = _shared_identifiers(wordings, group, weights, min_support, common, rare,
                                   sources=[report_key(hit.text) for hit in hits])
    if not wordings:
        return _IDENTIFIER_LEFT
    closeness = [sum(weights[i] * max(jaccard(w, t) for t in texts) for i, texts in by_case.items())
                 for w in wordings]
    chosen = wordings[int(np.argmax(closeness))]
    # a member stating another side, size, zone or measurement does not support the sentence: not cited
    cited = [i for i in sorted(by_case) if any(not _conflict(chosen, t) for t in by_case[i])]
    named = _identifiers(chosen, common)  # a sentence naming another date or name is not a source of the wording
    close = [hits[i].id for i in cited
             if any(jaccard(chosen, t) >= WORDING_SIMILARITY and not _conflict(chosen, t)
                    and _identifiers(t, common) == named for t in by_case[i])]
    support = float(sum(weights[i] for i in cited))
    return DraftSentence(text=chosen, section=group.section, findings=dict(sorted(group.assertions)),
                         support=round(support, 4), cases=[hits[i].id for i in cited], wording_from=close)


def _knowledge_texts(knowledge: KnowledgeBase) -> list[str]:
    """Each entry's words in one text: title, phrases, definition, appearance, notes."""
    return [" ".join([f.title, *f.synonyms, *f.exclude, f.definition, f.appearance, f.notes]) for f in knowledge]


def _never_names() -> set[str]:
    """Stop words, titles and detail words: words of every draft that name no one."""
    return _STOP | set(_TITLES) | {w for kind in DETAILS for w in kind}


def common_words(knowledge: KnowledgeBase, reports: Sequence[str | None]) -> frozenset:
    """Words that are not names: the knowledge base's (titles, phrases, definitions, notes), and those the
    ``reports`` use in lower case; a capitalised word outside them is taken for a name (``_identifiers``)."""
    words = {w.lower() for text in _knowledge_texts(knowledge) for w in _LETTER_WORD.findall(text)}
    words |= {w for text in reports for w in _LETTER_WORD.findall(text or "") if w.islower()}
    return frozenset(words | _never_names())


@lru_cache(maxsize=65536)
def _identifiers(text: str, common: frozenset = frozenset()) -> frozenset:
    """What may identify one examination or patient: numbers other than measurements; dates in words (month and
    weekday names, "yesterday", ...: ``_DATE_WORD``); a name after a title ("Dr Smith"); the capitalised words where
    a person is named, whatever they are (``_named_in_place``: "Results discussed with Good", "Frank Stone was
    notified"); and two or more capitalised words in a row, each not starting the sentence or a clause, not all
    capitals, and not in ``common`` (``common_words``: "John Smith")."""
    lower = _MEASURE.sub(" ", text.lower())
    found = set(_NUMBER.findall(lower)) | {f"name:{n}" for n in _titled_names(text)}
    found |= {f"date:{d.lower()}" for d in _DATE_WORD.findall(text)}
    found |= {f"date:{d.lower()[:3]}" for d in _MONTH_ABBREVIATION.findall(text)}
    found |= {"date:may" for _ in _MAY.finditer(text)}
    found |= _named_in_place(text)
    run: list[str] = []  # consecutive capitalised words that may be a name, one space apart
    last_end = -1
    for match in _capitalised(text):
        word = match.group(1).lower()
        before = text[:match.start()].rstrip()
        candidate = bool(before) and not before.endswith(_CLAUSE_MARKS) and word not in common \
            and not _DATE_WORD.fullmatch(word) and not _MONTH_ABBREVIATION.fullmatch(match.group(1)) \
            and word not in ("may", *_TITLES) and word not in _NOT_NAMES
        if match.start() != last_end + 1 or text[last_end] != " ":  # not right after the run's last word
            found |= _names(run)
            run = []
        if candidate:
            run.append(word)
        else:
            found |= _names(run)
            run = []
        last_end = match.end()
    return frozenset(found | _names(run))


def _titled_names(text: str) -> list[str]:
    """The names after a title (``_TITLED_NAME``), lower case: a word that starts with a capital and is not all
    capitals ("Dr Smith", "Dr. O'Brien", "Dr McDonald"; not "MR imaging", "MS plaques", "MR FLAIR", "the nurse
    noted"). A name written in lower case or capitals is left to the rare-word rule (``rare_words``)."""
    return [name.lower() for name in _TITLED_NAME.findall(text)
            if name[0].isupper() and not (len(name) > 1 and name.isupper())]


def _named_in_place(text: str) -> set[str]:
    """The names where a person is named (``_NAME_BEFORE``, ``_NAME_AFTER``, after a title), whatever the words:
    each capitalised word of a run of them (initials and a title's full stop inside the run) that starts right
    after "discussed with", "notified", ..., ends right before "was notified", ..., or holds a title, less the
    titles, initials and roles (``_NOT_NAMES``)."""
    found: set[str] = set()
    for run in _capitalised_runs(text):
        start, end = run[0].start(), run[-1].end()
        words = [m.group(1).lower() for m in run]
        titled = any(word in _TITLES for word in words)
        after = any(cue.end() == start for cue in _NAME_BEFORE.finditer(text, 0, start))
        if titled or after or _NAME_AFTER.match(text, end):
            found |= {f"name:{word}" for word in words
                      if len(word) > 1 and word not in _TITLES and word not in _NOT_NAMES and word not in _STOP}
    return found


def _capitalised_runs(text: str) -> list[list[re.Match]]:
    """Runs of capitalised words, initials ("J.") and titles ("Dr.") one space apart, or a full stop and a space
    after an initial or a title ("Dr. J. Smith")."""
    runs: list[list[re.Match]] = []
    for match in _LETTER_WORD.finditer(text):
        word = match.group(1)
        initial = len(word) == 1 and word.isupper()
        if not (initial or _NAME_SHAPE.fullmatch(_shape(word))):
            continue
        if runs:
            last = runs[-1][-1]
            gap = text[last.end():match.start()]
            dotted = len(last.group(1)) == 1 or last.group(1).lower() in _TITLES
            if (gap.isspace() and len(gap) <= 2) or (dotted and re.fullmatch(r"\.\s{0,2}", gap)):
                runs[-1].append(match)
                continue
        runs.append([match])
    return runs


def _capitalised(text: str) -> list[re.Match]:
    """The capitalised words of ``text`` (not all capitals: PA, ICU), in any script with upper and lower case."""
    return [m for m in _LETTER_WORD.finditer(text) if _NAME_SHAPE.fullmatch(_shape(m.group(1)))]


def _shape(word: str) -> str:
    return "".join("A" if c.isupper() else "a" if c.islower() else c for c in word)


def _names(run: list[str]) -> set[str]:
    """A run of two or more capitalised words that are no common words is a name ("John Smith"); one such word
    alone is not: capitalised terms of the trade ("Hounsfield units", "lower T-spine") are not names."""
    return {f"name:{word}" for word in run} if len(run) >= 2 else set()


def _shared_identifiers(wordings: list[str], group: _Group, weights: np.ndarray, min_support: float,
                        common: frozenset = frozenset(), rare: frozenset = frozenset(),
                        sources: Sequence[str] | None = None) -> list[str]:
    """The wordings naming no date-like token or long number (``_dated``), no ``rare`` word (``rare_words``: used
    by fewer than ``MIN_CASES`` different reports), and no identifier (``_identifiers``: a number, a name) that
    fewer than ``MIN_CASES`` of the group's neighbours with different reports (``sources``: each neighbour's
    ``report_key``; without them, neighbours), or neighbours holding no more than ``min_support`` of the weight, name:
    a draft does not carry one neighbour's dates or names (another patient's), cited to every neighbour of the
    group, whatever k and the weights. A name is never shared, however many neighbours name it: a sentence naming a
    person (who was told, who read it) in other patients' reports is no finding of this one."""
    naming: dict[str, set[int]] = {}
    for i, text in group.members:
        for identifier in _identifiers(text, common):
            naming.setdefault(identifier, set()).add(i)
    def reports(cases: set[int]) -> int:  # one report under several images without a case id counts once
        return len(cases) if sources is None else len({sources[i] for i in cases})

    shared = {identifier for identifier, cases in naming.items() if not identifier.startswith("name:")
              and reports(cases) >= MIN_CASES and sum(float(weights[i]) for i in cases) > min_support}
    return [w for w in wordings if not _dated(w, common) and _identifiers(w, common) <= shared
            and not rare.intersection(_LETTERS.findall(w.lower()))]


def _dated(text: str, common: frozenset = frozenset()) -> bool:
    """The text names a date or time (3/12/2019, 2019-12-03, 10:45, a month or weekday name, "yesterday") or a
    number of ``LONG_NUMBER`` or more digits (a year, an accession or record number): never drafted."""
    if _DATE_LIKE.search(_MEASURE.sub(" ", text.lower())):
        return True
    return any(i.startswith("date:") or (i.isdigit() and len(i) >= LONG_NUMBER) for i in _identifiers(text, common))


def vocabulary(knowledge: KnowledgeBase) -> frozenset:
    """Words that name no one: the knowledge base's (titles, phrases, definitions, notes), the report labeller's
    (its negation, uncertainty and scope cues, section names), ordinary report words (``report_words``), stop
    words, titles, detail words and units."""
    return frozenset({w for text in _knowledge_texts(knowledge) for w in _LETTERS.findall(text.lower())}
                     | _fixed_vocabulary())


@lru_cache(maxsize=1)
def _fixed_vocabulary() -> frozenset:
    """``vocabulary`` less the knowledge base's words: the labeller's cues, ``report_words`` and the rest."""
    from . import labels

    cues = [*labels.PRE_NEGATION, *labels.NEAR_PRE_NEGATION, *labels.POST_NEGATION, *labels.FINAL_POST_NEGATION,
            *labels.FINAL_POST_UNCERTAIN, *labels.NEAR_POST_NEGATION, *labels.PRE_UNCERTAIN, *labels.POST_UNCERTAIN,
            *labels.NEGATED_UNCERTAIN, *labels.PSEUDO_NEGATION, *labels.TERMINATORS, *labels.SKIPPED_SECTIONS,
            *labels.IMPRESSION_SECTIONS, "findings", "finding", "report"]
    words = {w for text in [*cues, *report_words()] for w in _LETTERS.findall(text.lower())}
    return frozenset(words | _never_names() | {"mm", "cm"})


@lru_cache(maxsize=1)
def report_words() -> frozenset:
    """Ordinary words of radiology and pathology reports (``report_words.txt``, written by hand): anatomy,
    descriptors, change over time, devices, the examination, function words. None names anyone: no month or
    weekday names and no word that is also a common surname or given name, so a word a draft carries from fewer
    than ``MIN_CASES`` reports because it is listed here is no patient's or doctor's name, but for a few words
    reports use all the time (small, large, low, head, mass): where a person is named they are names anyway
    (``_named_in_place``)."""
    text = resources.files("medvl.rag").joinpath("report_words.txt").read_text(encoding="utf-8")
    return frozenset(word.lower() for line in text.splitlines() if not line.lstrip().startswith("#")
                     for word in line.split())


def rare_words(knowledge: KnowledgeBase, reports: Sequence[str | None]) -> frozenset:
    """The words (lower case, any script) outside ``vocabulary`` that fewer than ``MIN_CASES`` of the different
    ``reports`` use (identical texts count once, ``report_key``: one report stored under several images): a name
    ("Nakamura", whatever its case or title), or a word only one or two cases use, might be theirs alone and is
    never drafted."""
    known = vocabulary(knowledge)
    distinct = {report_key(text) for text in reports}
    used = Counter(w for text in distinct for w in set(_LETTERS.findall(text)) if w not in known)
    return frozenset(w for w, cases in used.items() if cases < MIN_CASES)


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
    """Lower-case runs of letters of any script ("左肺清晰" is one), stop words left out."""
    return frozenset(w for w in re.findall(r"[^\W\d_]+", text.lower()) if w not in _STOP)


def jaccard(first: str, second: str) -> float:
    """Token Jaccard similarity of two sentences (lower case words of any script, stop words and numbers left
    out); two sentences without such words are the same wording only when equal."""
    a, b = _tokens(first), _tokens(second)
    if not a and not b:
        return 1.0 if " ".join(first.lower().split()) == " ".join(second.lower().split()) else 0.0
    return len(a & b) / len(a | b)


def _sentence_case(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?", "\u3002", "\uff01", "\uff1f")) else text + "."

