"""How well a knowledge base covers the references a labeller reads (``knowledge_coverage``): used where
findings are read in reference reports, by report generation (``eval.report``) and case retrieval
(``eval.case_retrieval``), so neither imports the other for it."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.record import Record
from ..rag.knowledge import BUILTIN_DIR, KnowledgeBase, label_key
from ..rag.labels import ReportLabeller

log = logging.getLogger(__name__)
MOSTLY_UNMENTIONED = 0.5  # more than this share of references mentioning no knowledge-base finding: a warning


def knowledge_coverage(records: Sequence[Record], labeller: ReportLabeller, warn: bool = True) -> dict[str, Any]:
    """Whether the labeller's knowledge base holds the findings of ``records`` (the scored references).

    - ``unknown_labels``: finding labels of the records that name no knowledge-base finding
      (``KnowledgeBase.resolve``), each with the number of records holding it. A categorical label column
      counts as findings when at least two of its values, and at least half, name knowledge-base findings;
      the 0/1 columns, as a group, when at least two of their names, and half, do (the CT phantom's
      ``no_finding``, ``lung_nodule`` and ``pleural_effusion`` mark its ``kidney_cyst`` and ``liver_lesion``
      as unknown; a sex or view column names no finding and is not looked at).
    - ``reports_without_mention``: references in which the labeller finds no finding of the base at all,
      not even a negated one (CT / MR captions under the chest X-ray base). A warning when more than
      half of them do (``MOSTLY_UNMENTIONED``).

    Either way the labeller reads such references as "no finding" (CheXpert's rule), which credits a
    generator that writes nothing abnormal. ``sources`` names the base: ``built-in`` and / or the last
    component of the user's folder. Counts only: no report text.
    """
    knowledge = labeller.knowledge
    unknown = _unknown_finding_labels(records, knowledge)
    holding = sum(bool(names) for names in unknown)
    counts = Counter(name for names in unknown for name in names)
    texts = [r.text or "" for r in records]
    unmentioned = sum(not any(s.findings for s in labeller.sentences(text)) for text in texts)
    named = ["built-in" if Path(source) == BUILTIN_DIR else Path(source).name for source in knowledge.sources]
    result = {"sources": named, "findings": len(knowledge), "unknown_labels": dict(sorted(counts.items())),
              "records_with_unknown_labels": holding, "reports_without_mention": unmentioned,
              "references": len(texts)}
    if warn and holding:
        log.warning("%d of %d scored records have finding labels the knowledge base (%s) does not hold (%s): "
                    "the labeller reads their reports as if those findings were absent, often as no finding, so "
                    "finding precision / recall / F1 do not score them; use a knowledge base with these findings "
                    "(medvl eval report --knowledge DIR)", holding, len(texts), " + ".join(named),
                    ", ".join(sorted(counts)))
    if warn and unmentioned > MOSTLY_UNMENTIONED * len(texts):
        log.warning("%d of %d reference reports mention no finding of the knowledge base (%s), not even a negated "
                    "one: the labeller reads them as no finding, so finding F1 measures little on this data; use a "
                    "knowledge base with its findings (medvl eval report --knowledge DIR)", unmentioned, len(texts),
                    " + ".join(named))
    return result


def _unknown_finding_labels(records: Sequence[Record], knowledge: KnowledgeBase) -> list[set[str]]:
    """Per record, its finding labels that name no knowledge-base finding (``knowledge_coverage``)."""
    values = {column: {str(v).strip() for r in records if (v := r.labels.get(column)) is not None}
              for column in sorted({c for r in records for c in r.labels})}
    flags = [column for column, seen in values.items() if seen <= {"0", "1"}]
    unknown_flags = [c for c in flags if knowledge.resolve(c) is None] if _name_findings(flags, knowledge) else []
    categorical = [column for column, seen in values.items()
                   if column not in flags and _name_findings(sorted(seen), knowledge)]
    found = []
    for record in records:
        names = {label_key(c) for c in unknown_flags if str(record.labels.get(c)).strip() == "1"}
        for column in categorical:
            value = record.labels.get(column)
            if value is not None and knowledge.resolve(value) is None:
                names.add(label_key(value))
        found.append(names)
    return found


def _name_findings(names: Sequence[str], knowledge: KnowledgeBase) -> bool:
    """At least two of ``names``, and at least half, name knowledge-base findings."""
    known = sum(knowledge.resolve(name) is not None for name in names)
    return known >= 2 and 2 * known >= len(names)
