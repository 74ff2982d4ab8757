"""A rule-based report labeller: which findings a report states as present, absent or possible.

NegEx / CheXpert-labeller style, with the finding vocabulary of a knowledge base
(``medvl.rag.knowledge``): each finding's ``synonyms`` are the phrases looked for.

1. Sections: text after ``INDICATION:``, ``HISTORY:``, ``COMPARISON:`` (and the like) is skipped;
   ``IMPRESSION:`` / ``CONCLUSION:`` sentences are marked as impression, the rest as findings.
2. Sentences end at ``.``, ``!`` or ``?`` followed by a space (so "0.57" stays whole; not the full stop of an
   abbreviation, ``ABBREVIATIONS``: "Dr. Smith", "atelectasis vs. pneumonia", "e.g.", "approx.", nor "no." before a
   number, nor a title's initial, "Dr. J. Smith"), at the full-width
   ``。``, ``！``, ``？`` (Chinese, Japanese), at a blank line, at a
   line starting with a bullet (``-``, ``*``, a digit), and at a line break before a capitalised word
   ("No pleural effusion⏎Large right pneumothorax": one finding per line, no full stops) unless the line
   before ends in a comma or a word that asks for more ("the", "of", "and", "with", "no", "is", ...), so
   hard-wrapped lines stay whole; fragments without letters ("1.") are dropped. The phrases and cues are
   English (``knowledge`` refuses a phrase without Latin letters or digits): text in another script is kept
   as sentences but states no finding.
3. Mentions: a synonym as whole words, case-insensitive, the last word also in its plural (+s / +es);
   "..." in a synonym matches up to ``GAP_WORDS`` words ("cardiac silhouette ... enlarged"). A
   mention inside one of the finding's ``exclude`` phrases ("pericardial effusion") is not one;
   a mention inside a longer mention of the same finding is counted once.
4. Status of a mention, first rule that applies (cues are whole words, same sentence, not across
   a scope terminator such as "but", "however", "although", ";", nor a colon or dash between two
   statements: "no effusion - large pneumothorax", "negative for effusion: pneumothorax is large"):
   - **uncertain** if a negated-uncertainty phrase is near ("cannot be excluded", "not ruled out", "not
     excluding", "does / could not exclude", "does not rule out", "has not been excluded", "difficult to (entirely)
     exclude", "difficult to rule out"; before or after the mention), unless a negation cue
     takes the mention over: one between the phrase and the mention ("cannot exclude pneumonia, no effusion"), or
     one right before the mention when the phrase after it is past another item ("no effusion, pneumonia cannot
     be excluded");
   - **negative** if a negation cue comes up to ``PRE_WINDOW`` words before it ("no", "without",
     "negative for", "free of", "no evidence of", "lack of", "resolved", "unlikely to represent", "doubtful for"; the
     bare "unlikely", "doubtful", "improbable" only just before it: "atelectasis, unlikely pneumonia"), or up
     to ``POST_WINDOW`` words after it ("is not seen", "not clearly seen", "absent", "has resolved", "excluded",
     "ruled out"), or a
     hedge follows right after it ("unlikely", "doubtful", "not favored", "not likely", ``NEAR_WINDOW`` words at
     most) ending the clause or qualified itself ("pneumonia is unlikely.", "pneumonia or edema is unlikely.",
     "... unlikely in this patient", "... unlikely to be present"), but not the opacity of "the opacity is
     unlikely to represent pneumonia", the nodule of "the nodule is unlikely to be malignant" nor the atelectasis
     of "atelectasis, pneumonia unlikely" (another list item between); the bare
     "unlikely" before a mention reaches ``NEAR_PRE_WINDOW`` words ("unlikely small effusion"), or a "not"/"no"
     falls inside a
     "..." gap ("the cardiac silhouette is not enlarged"), or a normal-range phrase follows at most
     ``NEAR_WINDOW`` words after it ("vascular engorgement appears within normal limits"), or a
     structured report's answer ends the clause right after it ("Pneumothorax: none.", "Effusion - no");
     pseudo-negations ("no change", "no appreciable interval change", "no changes in", "no worsening of", "not
     only", "partially resolved", "has not resolved", "not cleared", "no resolution of", "not absent") are not
     cues;
   - **uncertain** if a question mark follows it ("Pneumothorax?");
   - **uncertain** if an uncertainty cue comes before ("possible", "may represent", "suspicious
     for", "likely", "suggest(s)", "versus", "question", "correlate clinically for") or after ("is suspected", "is
     a possibility", "is less likely", a "less likely" right after it ending the clause; "may", "is likely" only
     where they end the clause, say it is there or are qualified themselves: "pneumonia is likely.", "atelectasis
     may also be present", not "the pneumothorax may be due to the biopsy", "is likely iatrogenic", "the opacity
     may represent atelectasis"), or lies inside the mention ("borderline heart size");
   - **positive** otherwise.

   A finding's ``signs`` (knowledge base: "blunting of the costophrenic angle" for a pleural effusion) stand for
   the finding where the sentence does not name it; where it does, what it says of the finding by name caps the
   sign: "blunted costophrenic angle without definite pleural effusion" is negative, "blunting of the costophrenic
   angle, which may represent / suggestive of / possibly a small effusion" uncertain, "blunting of the
   costophrenic angle with a small effusion" positive. Only signs: in "opacity may represent infiltrate" (both
   ``lung_opacity`` synonyms) the opacity is stated.

   Lists: a cue before a list of short items covers the whole list, however many items it has, up to
   ``MAX_REACH`` words from the cue ("no focal consolidation, suspicious pulmonary opacity, pneumothorax or
   definite pleural effusion"; "no opacity to suggest pneumonia"), as does a cue after a list joined by "and" /
   "or" ("infiltrates and venous engorgement have resolved"); an item holding a verb or "with" starts a new
   clause and ends the list. A cue before does not reach a mention in a new clause: after ", and" joined to the
   cue's one item ("no effusion, and large pneumothorax"), or after ", and the" / "and the" (a, an) in an item
   holding a verb, the mention's own ("no effusion, and the heart is enlarged"); "no a, b, and c are seen" stays
   one negated list. Hedged lists need an "and" / "or" or three items. An item that starts with a hedge
   after a comma ends a negated list: in "no effusion, possible atelectasis" (or "no pneumonia, more
   likely atelectasis") the atelectasis is uncertain.
5. A report's status per finding: positive if any mention is positive, else uncertain if any is,
   else negative; findings never mentioned are absent from the result. The knowledge base's
   ``normal`` entry (no finding) is positive when no abnormal finding is positive or uncertain,
   negative otherwise (CheXpert's rule; ``normal_compatible`` findings such as devices do not count).

Report text is patient data: nothing here logs it.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from .knowledge import KnowledgeBase, load_knowledge

POSITIVE, UNCERTAIN, NEGATIVE = "positive", "uncertain", "negative"
STATUSES = (POSITIVE, UNCERTAIN, NEGATIVE)
_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
FINDINGS_SECTION, IMPRESSION_SECTION = "findings", "impression"

GAP_WORDS = 5  # words a "..." in a synonym may stand for
PRE_WINDOW = 6  # words between a cue before a mention and the mention
POST_WINDOW = 3  # words between a mention and a cue after it
NEAR_WINDOW = 1  # words between a mention and a NEAR_POST_NEGATION cue ("engorgement appears within normal limits")
# the most words between a cue and a mention it can reach through a list, however many items it has ("no a, b,
# c, ... or z"; eight items of PRE_WINDOW words joined by two-word links such as "to suggest", with room); cues
# further away are not looked at (a long sentence without full stops would otherwise take time growing with the
# cube of its length)
MAX_REACH = 72

PRE_NEGATION = [
    "no", "not", "without", "negative for", "free of", "clear of", "no evidence of", "no radiographic evidence of",
    "no signs of", "no sign of", "no findings of", "absence of", "resolution of", "rules out", "ruled out",
    "never", "nor", "resolved", "clearing of", "unlikely to be", "unlikely to represent", "unlikely to reflect",
    "unlikely to indicate", "doubtful for", "lack of",
]
# hedges that negate the finding right after them ("atelectasis, unlikely pneumonia"), not one further on: in
# "unlikely with enhancing soft tissue mass" the mass is there
NEAR_PRE_NEGATION = ["unlikely", "doubtful", "improbable"]
POST_NEGATION = [
    "is not seen", "are not seen", "not seen", "is not identified", "not identified", "not present",
    "not appreciated", "not visualized", "not demonstrated", "is absent", "are absent", "absent", "not clearly seen",
    "has resolved", "have resolved", "resolved", "is ruled out", "no longer", "not evident",
    "has cleared", "have cleared", "cleared", "ruled out", "was ruled out", "were ruled out", "are ruled out",
    "has been ruled out", "have been ruled out", "excluded", "is excluded", "are excluded", "was excluded",
    "were excluded", "has been excluded", "have been excluded",
]
# hedges against the finding (NegBio reads them as negations): they negate (or, FINAL_POST_UNCERTAIN, leave
# possible) the finding at most NEAR_WINDOW words before them, and only where they end the clause: "pneumonia is
# unlikely." but not "atelectasis, unlikely pneumonia" (a cue before the pneumonia), the opacity of "opacity is
# unlikely to represent pneumonia" (the hedge is about the pneumonia) nor that of "opacity, likely atelectasis,
# pneumonia less likely"
FINAL_POST_NEGATION = ["unlikely", "doubtful", "improbable", "not favored", "not favoured", "not likely"]
# the same after "is" / "are": they also cover a list before them ("pneumonia or edema is unlikely.")
FINAL_LIST_NEGATION = [f"{verb} {hedge}" for verb in ("is", "are") for hedge in FINAL_POST_NEGATION]
FINAL_POST_UNCERTAIN = ["less likely"]
NEAR_POST_NEGATION = [  # normal-range statements: negations only right after the mention (NEAR_WINDOW words)
    "within normal limits", "within limits of normal", "within the limits of normal", "within normal range",
    "within the normal range",
]
PRE_UNCERTAIN = [
    "possible", "possibly", "probable", "probably", "likely", "may represent", "may be", "might be",
    "could be", "could represent", "may reflect", "may indicate", "questionable", "question of",
    "suspicious for", "suspected", "suspect", "concerning for", "concern for", "suggestive of",
    "suggest", "suggests", "suggesting", "worrisome for", "differential diagnosis includes", "differential includes",
    "borderline", "equivocal", "rule out", "r/o", "versus", "vs", "indeterminate", "presumed", "cannot tell",
    "may", "question", "questioned", "suggestion of", "differential", "considerations include", "could include",
    "evaluation for", "evaluate for", "for evaluation of", "to evaluate", "assess for", "to assess",
    "to exclude", "exclude", "could obscure", "could reflect", "could indicate", "maybe", "to identify", "to detect",
    "in detecting", "possibility of", "correlate clinically for", "clinically correlate for", "correlate for",
    "in the appropriate clinical setting", "suspicion for", "suspicion of",
]
POST_UNCERTAIN = [
    "is suspected", "are suspected", "suspected", "is possible", "are possible", "is questioned",
    "versus", "vs", "is not certain", "may be present",
    "is in the differential", "would be a consideration", "is a consideration", "is a possibility",
    "is less likely", "are less likely",  # a differential's second place: still possible
    # the finding itself doubted as an artefact of the technique ("opacity may be artifactual")
    "may be artifactual", "could be artifactual", "possibly artifactual", "is possibly artifactual",
    "may be artefactual", "could be artefactual", "may be an artifact", "could be an artifact",
    "may be artifact", "may be technical", "may be positional",
]
# hedges after the finding that are about it only where they end the clause, say that it is there or are qualified
# themselves ("pneumonia is likely.", "atelectasis may also be present", "fractures may not be demonstrated",
# "pneumonia is likely given the history");
# not a hedge about its cause, nature or consequence ("the pneumothorax may be due to the biopsy", "pneumothorax is
# likely iatrogenic", "effusion, which may represent hemothorax", "may require a chest tube"): _POST_HEDGE_FINAL
FINAL_POST_HEDGE = ["may", "is likely", "are likely"]
NEGATED_UNCERTAIN = [  # double negations meaning "possible": checked before negation, either side
    "cannot be excluded", "can not be excluded", "cannot exclude", "can not exclude", "not excluded",
    "cannot be ruled out", "can not be ruled out", "cannot rule out", "can not rule out", "not ruled out",
    "not be excluded", "not be ruled out", "can't exclude", "can't be excluded", "cannot be entirely excluded",
    "not entirely excluded", "not completely excluded", "is not excluded", "are not excluded", "is not ruled out",
    "are not ruled out", "is not entirely excluded", "are not entirely excluded", "not excluding", "without excluding",
    "not ruling out", "without ruling out",
    # "does / could / would not exclude", "does not rule out", "has not been excluded", "can't be ruled out"
    "not exclude", "not rule out", "not been excluded", "not been ruled out", "can't be ruled out", "can't rule out",
    "doesn't exclude", "doesn't rule out", "cannot be completely excluded", "cannot be entirely ruled out",
    # "edema (is) difficult to (entirely) exclude", "difficult to rule out a pneumothorax"
    "difficult to exclude", "difficult to entirely exclude", "difficult to completely exclude",
    "difficult to rule out", "difficult to entirely rule out", "difficult to completely rule out",
]
PSEUDO_NEGATION = [  # look like negations, are not ("no change in X" and its variants: _CHANGE_PSEUDO below)
    "not changed", "no increase", "no decrease", "not only", "not significantly changed", "gram negative",
    "not necessarily", "almost completely resolved", "nearly resolved", "almost resolved", "partially resolved",
    "incompletely resolved", "not completely resolved",
    # a finding still there: "pneumothorax has not resolved", "effusion has not cleared", "no resolution of the
    # pneumonia", "effusion is not absent"
    "not resolved", "not yet resolved", "not cleared", "not yet cleared", "no resolution of", "without resolution of",
    "no resolution", "failure of resolution", "not absent",
    "of doubtful",  # "nodule of doubtful significance": the nodule is there
]
# words that may stand between "no" / "without" and "change" in a pseudo-negation ("no appreciable interval change")
CHANGE_MODIFIERS = [
    "interval", "significant", "appreciable", "definite", "visible", "radiographic", "new", "further", "substantial",
    "major", "marked", "gross", "obvious", "apparent", "acute", "real", "notable", "measurable", "discernible",
    "detectable", "perceptible", "demonstrable", "evident", "overall", "clinically", "relevant", "important",
]
TERMINATORS = [
    "but", "however", "although", "though", "except", "aside from", "apart from", "whereas", "while", "yet",
    "nevertheless", "which is", "otherwise", "there is", "there are", ";",
]
# a colon or a dash between two statements ends a cue's scope too ("no effusion - large pneumothorax", "negative for
# effusion: pneumothorax is large"), but not right after the cue or the finding ("negative for: effusion, ...",
# "effusion: not seen"), nor a colon or dash between digits ("10:30", "2–3 mm"): _Cues._open
_CLAUSE_MARK = re.compile(r"(?<!\d):(?!\d)|\s-{1,2}\s|(?<!\d)[\u2013\u2014]|[\u2013\u2014](?!\d)")
SKIPPED_SECTIONS = {"indication", "indications", "history", "clinical history", "comparison", "comparisons",
                    "reason for exam", "reason for examination", "clinical information", "technique",
                    "examination", "exam", "procedure"}
IMPRESSION_SECTIONS = {"impression", "impressions", "conclusion", "conclusions", "summary", "opinion"}
_SECTIONS = sorted(SKIPPED_SECTIONS | IMPRESSION_SECTIONS | {"findings", "finding", "report"}, key=len, reverse=True)
_HEADER = re.compile(r"(?<![A-Za-z])(" + "|".join(re.escape(s) for s in _SECTIONS) + r")\s*:", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])\s*|\n\s*\n|\n(?=\s*[-*\d])")
# abbreviations whose full stop does not end a sentence ("discussed with Dr. Smith", "atelectasis vs. pneumonia"),
# "no." before a number ("tube no. 5"), and an initial after a title ("Dr. J. Smith", "Dr J. Smith")
ABBREVIATIONS = ["dr", "drs", "mr", "mrs", "ms", "prof", "st", "vs", "approx", "e.g", "i.e", "cf", "incl", "fig"]
_TITLE_ABBREVIATIONS = ["dr", "drs", "mr", "mrs", "ms", "prof"]
_ABBREVIATION = re.compile(r"(?<![\w.])(?:" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")\.$", re.I)
_INITIAL = re.compile(r"(?<![\w.])(?:" + "|".join(_TITLE_ABBREVIATIONS) + r")\.?\s+[^\W\d_]\.$", re.I)
_NUMBER_SIGN = re.compile(r"(?<![\w.])no\.$", re.I)
_NUMBER = re.compile(r"\d+(?!\d|\.(?:\s|$))")  # a number, not a list's ("Pneumothorax: no. 2. Effusion: yes.")
_WORD = re.compile(r"[a-z0-9]+(?:['/-][a-z0-9]+)*")
# a line break before a capitalised word ("No pleural effusion\nLarge right pneumothorax"): a report with one
# finding per line and no full stops; a sentence ends there unless the line before ends in a word that needs more
# ("compared with the\nPA view", "effusion and\nAtelectasis") or a comma (hard-wrapped lines stay whole)
_LINE_END = re.compile(r"([A-Za-z0-9)%]+)[ \t]*\r?\n(?=[ \t]*[A-Z][a-z])")
_CONTINUING = {"a", "an", "the", "of", "in", "on", "at", "to", "for", "from", "with", "without", "by", "and", "or",
               "nor", "but", "no", "not", "is", "are", "was", "were", "be", "been", "has", "have", "than", "as",
               "this", "that", "which", "its", "their", "his", "her", "dr", "mr", "mrs", "ms", "versus", "vs"}


def _line_end(match: re.Match) -> str:
    """A sentence end (a blank line) at a line break before a capitalised word, unless the word before asks
    for more."""
    word = match.group(1)
    return match.group(0) if word.lower() in _CONTINUING else word + "\n\n"


@dataclass
class Mention:
    """One phrase of a finding in a sentence, with the status the rules gave it."""

    finding: str
    status: str  # positive | uncertain | negative
    start: int  # character offsets in the sentence (lower-cased text has the same offsets)
    end: int
    sign: bool = False  # one of the finding's ``signs`` (knowledge base): an indirect sign, not its name


@dataclass
class Sentence:
    """A report sentence, the section it came from, and what it states per finding."""

    text: str = field(repr=False)  # patient data: kept out of repr
    section: str  # findings | impression
    findings: dict[str, str] = field(default_factory=dict)  # finding -> positive | uncertain | negative


def _cue_regex(phrases: Iterable[str]) -> re.Pattern:
    parts = []
    for phrase in sorted(set(phrases), key=len, reverse=True):  # longest first: "no evidence of" over "no"
        words = phrase.split()
        parts.append(r"\s+".join(re.escape(w) for w in words))
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(parts) + r")(?![a-z0-9])")


def _phrase_regex(phrase: str, plural: bool = True) -> str:
    """Regex of a synonym: whole words, "..." a gap of up to GAP_WORDS words (captured), the last
    word also in its plural ("opacity" -> "opacities", "nodule" -> "nodules")."""
    pieces = [p.split() for p in phrase.split("...")]
    chunks = [r"\s+".join(re.escape(w) for w in words) for words in pieces]
    gap = r"((?:\s+[^\s.;:!?]+){0," + str(GAP_WORDS) + r"}?)\s+"
    body = gap.join(chunks)
    last = pieces[-1][-1] if pieces[-1] else ""
    if plural and re.fullmatch(r"[a-z]*[^aeiou\W]y", last):
        body = body[: -len(re.escape(last))] + re.escape(last[:-1]) + r"(?:y|ies)"
    elif plural:
        body += r"(?:s|es)?"
    return r"(?<![a-z0-9])" + body + r"(?![a-z0-9])"


_PRE_NEG, _POST_NEG, _NEAR_NEG = _cue_regex(PRE_NEGATION), _cue_regex(POST_NEGATION), _cue_regex(NEAR_POST_NEGATION)
_NEAR_PRE_NEG = _cue_regex(NEAR_PRE_NEGATION)
# what precedes a hedge that starts an item of a list: a comma, then at most "more" / "most" ("..., more likely")
_ITEM_START = re.compile(r"[,;]\s*(?:(?:more|most)\s+)?$", re.I)
# a hedge about the finding before it: punctuation or the end of the sentence follows, or what qualifies the hedge
# itself ("unlikely in this patient", "given ...", "to be present"); not "unlikely to represent pneumonia" (a hedge
# about the pneumonia) nor "unlikely to be malignant" (about a property of the finding)
_FINAL = (r"(?=\s*(?:[.,;:!?)]|$|(?:in|given|as|because|since|due|based|considering|at this time|on this)\b"
          r"|to\s+be\s+(?:present|seen|visible|identified|there)\b))")
NEAR_PRE_WINDOW = 2  # words between a NEAR_PRE_NEGATION cue and the mention ("unlikely small effusion")
_FINAL_NEG = re.compile(_cue_regex(FINAL_POST_NEGATION).pattern + _FINAL)
_FINAL_LIST_NEG = re.compile(_cue_regex(FINAL_LIST_NEGATION).pattern + _FINAL)
_FINAL_UNC = re.compile(_cue_regex(FINAL_POST_UNCERTAIN).pattern + _FINAL)
_POST_HEDGE_FINAL = (r"(?=\s*(?:[.,;:!?)]|$|(?:in|given|as|because|since|based|considering|at this time|on this)\b"
                     r"|(?:(?:also|still|not)\s+)?(?:be|have\s+been)\s+(?:present|seen|visible|identified|there|noted"
                     r"|demonstrated|detected|evident|apparent|visualized|appreciated)\b"
                     r"|(?:also|still|exist|persist)\b|to\s+be\s+(?:present|seen|visible|identified|there)\b))")
_POST_HEDGE = _cue_regex(FINAL_POST_HEDGE)
_FINAL_HEDGE = re.compile(_POST_HEDGE.pattern + _POST_HEDGE_FINAL)
_PRE_UNC, _POST_UNC = _cue_regex(PRE_UNCERTAIN), _cue_regex(POST_UNCERTAIN)
_NEG_UNC, _PSEUDO, _TERM = _cue_regex(NEGATED_UNCERTAIN), _cue_regex(PSEUDO_NEGATION), _cue_regex(TERMINATORS[:-1])
# "no change / worsening / improvement / progression in X" (or "without", "lack of"), up to two CHANGE_MODIFIERS
# between ("no appreciable change", "without significant interval change"): X is there, unchanged. The plural
# "changes" only before "in" or after "interval" ("no changes in the effusion", "no interval changes"): "no changes of
# emphysema" negates
_CHANGE_MODIFIER = r"(?:(?:" + "|".join(CHANGE_MODIFIERS) + r")\s+)"
_CHANGE_PSEUDO = re.compile(
    r"(?<![a-z0-9])(?:no|without|lack\s+of)\s+(?:" + _CHANGE_MODIFIER + r"{0,2}(?:change|changes(?=\s+in\b)|worsening|"
    r"improvement|progression)|" + _CHANGE_MODIFIER + r"?interval\s+" + _CHANGE_MODIFIER + r"?changes)(?![a-z0-9])")
# what joins the items of a negated list: commas, "or", "nor", "and", "and/or", "/", and the links of
# "no opacity to suggest pneumonia"
_LIST_SEPARATOR = re.compile(r",|/|(?<![a-z0-9])(?:and/or|or|nor|and|to suggest|to indicate|suggestive of|"
                             r"suggesting|concerning for|worrisome for|consistent with)(?![a-z0-9])")
_CONJUNCTION = re.compile(r"(?<![a-z0-9])(?:and|or|nor)(?![a-z0-9])")
# what may join a negated statement to a new clause: ", and", or "and" before an article ("and the heart is enlarged")
_CLAUSE_JOIN = re.compile(r",\s*and(?![a-z0-9])(?:\s+(?P<article0>the|a|an)(?![a-z0-9]))?|(?<![a-z0-9])and\s+"
                          r"(?P<article>the|a|an)(?![a-z0-9])")
_CLAUSE_WORDS = {"is", "are", "was", "were", "be", "been", "there", "has", "have", "had", "with", "which", "that",
                 "shows", "show", "appears", "appear", "remains", "remain", "seen", "noted", "present", "demonstrated"}
_GAP_NEGATION = re.compile(r"(?<![a-z0-9])(?:not|no|never|without)(?![a-z0-9])")
# a structured report's answer right after the finding, ending its clause: "Pneumothorax: none.", "Effusion - no",
# "Consolidation: negative;" (not "consolidation, no air bronchograms": there "no" negates the next word)
_STRUCTURED_NEGATION = re.compile(r"\s*(?:[:=]|\s[-\u2013\u2014]|-)\s*(?:none|no|negative|nil|absent|not seen)"
                                  r"\s*(?:[.!,;]|$)")
_QUESTIONED = re.compile(r"\s*\?")  # "Pneumothorax?": asked, not stated


def split_sections(report: str) -> list[tuple[str, str]]:
    """(section name, text) pairs in order; text before any header is ``findings``."""
    parts: list[tuple[str, str]] = []
    position, section = 0, FINDINGS_SECTION
    for match in _HEADER.finditer(report):
        parts.append((section, report[position:match.start()]))
        section, position = " ".join(match.group(1).lower().split()), match.end()
    parts.append((section, report[position:]))
    return [(name, text) for name, text in parts if text.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of a section's text; pieces without letters of any script ("1.") are dropped."""
    text = _LINE_END.sub(_line_end, text)
    pieces, position = [], 0
    for match in _SENTENCE_END.finditer(text):
        if not _abbreviated(text, match):
            pieces.append(text[position:match.start()])
            position = match.end()
    pieces.append(text[position:])
    return [p for p in (" ".join(p.split()) for p in pieces) if re.search(r"[^\W\d_]", p)]


def _abbreviated(text: str, end: re.Match) -> bool:
    """The full stop before a sentence end ``end`` (a stop and a space, not a blank line) closes an
    abbreviation (``ABBREVIATIONS``; "no." before a number other than a list's) or a title's initial
    ("Dr. J. Smith")."""
    if not text.endswith(".", 0, end.start()) or "\n\n" in "".join(end.group(0).split(" ")):
        return False
    before = text[max(0, end.start() - 24):end.start()]
    return bool(_ABBREVIATION.search(before) or _INITIAL.search(before)
                or _NUMBER_SIGN.search(before) and _NUMBER.match(text, end.end()) is not None)


class ReportLabeller:
    """Labels report text with the findings of a knowledge base (see the module docstring)."""

    def __init__(self, knowledge: KnowledgeBase | None = None):
        self.knowledge = knowledge or load_knowledge()
        self._patterns = [(f.name, re.compile(_phrase_regex(s)), s in f.signs) for f in self.knowledge
                          for s in f.synonyms]
        self._excludes = {f.name: [re.compile(_phrase_regex(p)) for p in f.exclude] for f in self.knowledge}
        self.sentence_labels = lru_cache(maxsize=65536)(self._sentence_labels)

    def sentences(self, report: str | None) -> list[Sentence]:
        """The labelled sentences of a report's findings and impression sections, in order."""
        result = []
        for section, text in split_sections(report or ""):
            if section in SKIPPED_SECTIONS:
                continue
            kind = IMPRESSION_SECTION if section in IMPRESSION_SECTIONS else FINDINGS_SECTION
            result += [Sentence(s, kind, dict(self.sentence_labels(s))) for s in split_sentences(text)]
        return result

    def label(self, report: str | None) -> dict[str, str]:
        """Finding -> positive | uncertain | negative for a whole report (mentioned findings, plus
        the normal entry whenever the report has a sentence)."""
        sentences = self.sentences(report)
        return with_normal(merge(s.findings for s in sentences), self.knowledge) if sentences else {}

    def positives(self, report: str | None) -> set[str]:
        """The findings a report states as present (the normal entry included when it applies)."""
        return {name for name, status in self.label(report).items() if status == POSITIVE}

    def mentions(self, sentence: str) -> list[Mention]:
        """Every finding mention in one sentence with its status."""
        text = sentence.lower()
        cues = _Cues(text)
        matches = [(name, match, sign) for name, pattern, sign in self._patterns for match in pattern.finditer(text)
                   if not self._excluded(name, text, match.start(), match.end())]
        found = []
        for name, match, sign in matches:
            gaps = [match.group(i) or "" for i in range(1, (match.re.groups or 0) + 1)]
            status = cues.status(match.start(), match.end(), gaps)
            found.append(Mention(name, status, match.start(), match.end(), sign))
        return _named_over_signs(_outermost(found), text)

    def _sentence_labels(self, sentence: str) -> tuple[tuple[str, str], ...]:
        return tuple(merge({m.finding: m.status} for m in self.mentions(sentence)).items())

    def _excluded(self, name: str, text: str, start: int, end: int) -> bool:
        return any(m.start() <= start and end <= m.end() for p in self._excludes[name] for m in p.finditer(text))


class _Cues:
    """The cue spans of one lower-cased sentence, and the rules that turn them into a status."""

    def __init__(self, text: str):
        self.text = text
        blocked = [m.span() for pattern in (_PSEUDO, _CHANGE_PSEUDO) for m in pattern.finditer(text)]
        self.negated_uncertain = [m.span() for m in _NEG_UNC.finditer(text)]
        blocked += self.negated_uncertain
        self.pre_negation = _spans(_PRE_NEG, text, blocked)
        self.near_pre_negation = _spans(_NEAR_PRE_NEG, text, blocked)
        self.post_negation = _spans(_POST_NEG, text, blocked)
        self.final_negation = _spans(_FINAL_NEG, text, blocked)
        self.final_list_negation = _spans(_FINAL_LIST_NEG, text, blocked)
        self.near_post_negation = _spans(_NEAR_NEG, text, blocked)
        self.pre_uncertain = _spans(_PRE_UNC, text, blocked)
        self.post_uncertain = _spans(_POST_UNC, text, blocked) + _spans(_FINAL_HEDGE, text, blocked)
        self.final_uncertain = _spans(_FINAL_UNC, text, blocked)
        self.terminators = [m.start() for m in _TERM.finditer(text)] + [i for i, c in enumerate(text) if c == ";"]
        self.clause_marks = [m.span() for m in _CLAUSE_MARK.finditer(text)]
        self._word_starts = [m.start() for m in _WORD.finditer(text)]

    def _near(self, start: int, end: int) -> bool:
        """At most ``MAX_REACH`` words between the two offsets (counted by word starts: cheap)."""
        return bisect_left(self._word_starts, end) - bisect_left(self._word_starts, start) <= MAX_REACH

    def status(self, start: int, end: int, gaps: list[str]) -> str:
        negations = self._unhedged(self.pre_negation, start)
        if self._negated_uncertain(negations, start, end):
            return UNCERTAIN
        if self._before(negations, start, lists=True) \
                or self._after(self.post_negation, end, lists=True) \
                or self._before(self.near_pre_negation, start, window=NEAR_PRE_WINDOW) \
                or self._after(self.near_post_negation, end, NEAR_WINDOW) \
                or self._after(self._not_past_an_item(self.final_negation, end), end, NEAR_WINDOW) \
                or self._after(self.final_list_negation, end, 0, lists=True) \
                or any(_GAP_NEGATION.search(g) for g in gaps) or _STRUCTURED_NEGATION.match(self.text, end):
            return NEGATIVE
        if _QUESTIONED.match(self.text, end):
            return UNCERTAIN
        if self._before(self.pre_uncertain, start, lists=True, conjunction=True) \
                or self._after(self.post_uncertain, end) or self._after(self.final_uncertain, end, NEAR_WINDOW) \
                or self._inside(self.pre_uncertain + self.post_uncertain, start, end):
            return UNCERTAIN
        return POSITIVE

    def _not_past_an_item(self, spans: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
        """The hedges after a mention ending at ``end`` that no other list item stands between: in "opacity,
        atelectasis, pneumonia unlikely" the hedge is about the pneumonia, not the atelectasis before it."""
        return [(s, e) for s, e in spans if not (s >= end and self._words(end, s)
                                                  and _LIST_SEPARATOR.search(self.text, end, s))]

    def _negated_uncertain(self, negations: list[tuple[int, int]], start: int, end: int) -> bool:
        """A negated-uncertainty cue ("cannot be excluded") reaches the mention, and a direct negation does not
        take it over: one between the cue and the mention ("cannot exclude pneumonia, no effusion"), or one right
        before the mention when the cue after it is past another item ("no effusion, pneumonia cannot be
        excluded": the effusion is negated, the pneumonia possible)."""
        before = [(s, e) for s, e in self.negated_uncertain if e <= start and self._near(e, start)
                  and not self._before([n for n in negations if e <= n[0]], start, lists=True)]
        after = [(s, e) for s, e in self.negated_uncertain if s >= end and self._near(end, s)]
        if after and any(e <= start and self._near(e, start) and self._words(e, start) <= PRE_WINDOW
                         and self._open(e, start) and not _LIST_SEPARATOR.search(self.text, e, start)
                         for _, e in negations):  # the mention is negated directly
            after = [(s, e) for s, e in after if not _LIST_SEPARATOR.search(self.text, end, s)]
        return self._before(before, start) or self._after(after, end, lists=True)

    def _before(self, spans: list[tuple[int, int]], start: int, lists: bool = False, conjunction: bool = False,
                window: int = PRE_WINDOW) -> bool:
        return any(e <= start and self._near(e, start) and self._open(e, start) and not self._new_clause(e, start)
                   and (self._words(e, start) <= window or lists and self._listed(e, start, conjunction))
                   for _, e in spans)

    def _new_clause(self, cue_end: int, start: int) -> bool:
        """The mention at ``start`` is in a clause of its own after the cue's: its item follows ", and" right after
        the cue's one item ("no effusion, and large pneumothorax"), or "and the" (a, an) and holds a verb, up to the
        next item or the end ("no effusion, and the heart is enlarged", "without effusion and the heart
        is enlarged"). Not "no a, b, and c are seen" nor "no a, b or c is identified": a negated list."""
        joins = list(_CLAUSE_JOIN.finditer(self.text, cue_end, start))
        if not joins or _LIST_SEPARATOR.search(self.text, joins[-1].end(), start):  # the mention's item: the last
            return False
        join = joins[-1]
        if join.group(0).startswith(",") and not _LIST_SEPARATOR.search(self.text, cue_end, join.start()):
            return True
        if not (join.group("article0") or join.group("article")):  # "no a, b, and c are seen": one list
            return False
        rest = _LIST_SEPARATOR.search(self.text, start)
        item = self.text[join.end():rest.start() if rest else len(self.text)]
        return bool(_CLAUSE_WORDS.intersection(_WORD.findall(item)))

    def _unhedged(self, spans: list[tuple[int, int]], start: int) -> list[tuple[int, int]]:
        """The negation cues whose list does not reach the mention at ``start`` through a hedged item: in "no
        effusion, possible atelectasis" the "no" covers the effusion, the "possible" the atelectasis. An
        uncertainty cue that starts a new item (after a comma) ends the negation's reach; one inside the
        negated phrase does not ("no findings suggesting pneumonia")."""
        hedges = [s for s, _ in self.pre_uncertain if s < start]
        return [(s, e) for s, e in spans
                if not any(e <= h and _ITEM_START.search(self.text, e, h) for h in hedges)]

    def _inside(self, spans: list[tuple[int, int]], start: int, end: int) -> bool:
        """A cue within the mention itself ("borderline heart size")."""
        return any(start <= s and e <= end for s, e in spans)

    def _listed(self, start: int, end: int, conjunction: bool = False) -> bool:
        """The text between a cue and a mention is a list of short items ("no focal consolidation,
        suspicious pulmonary opacity, pneumothorax or definite pleural effusion"; "infiltrates and
        venous engorgement have resolved"), so the cue covers the whole list, however many items it has (up to
        ``MAX_REACH`` words from the cue: ``_near``); a verb or
        "with" in an item starts a new clause and ends it. With ``conjunction`` a list of two must have
        an "and" / "or": hedged lists ("possible atelectasis, effusion or edema") and lists before a cue
        after them ("infiltrates and engorgement have resolved"), where a bare comma often starts
        another statement ("suggestive of artifacts, healed rib fracture")."""
        between = self.text[start:end]
        items = _LIST_SEPARATOR.split(between)
        if conjunction and not _CONJUNCTION.search(between) and len(items) < 3:
            return False
        return len(items) > 1 and all(
            len(words := _WORD.findall(item)) <= PRE_WINDOW and not _CLAUSE_WORDS.intersection(words)
            for item in items)

    def _after(self, spans: list[tuple[int, int]], end: int, window: int = POST_WINDOW, lists: bool = False) -> bool:
        return any(s >= end and self._near(end, s) and self._open(end, s)
                   and (self._words(end, s) <= window or lists and self._listed(end, s, conjunction=True))
                   for s, _ in spans)

    def _words(self, start: int, end: int) -> int:
        return len(_WORD.findall(self.text[start:end]))

    def _open(self, start: int, end: int) -> bool:
        """No scope terminator between the cue and the mention (whichever comes first), nor a colon or dash
        after a word of the text between them ("negative for effusion: pneumothorax ...", not "negative for:
        effusion" nor "effusion: not seen")."""
        return not any(start <= t < end for t in self.terminators) and not any(
            start <= s and e <= end and bisect_left(self._word_starts, s) > bisect_left(self._word_starts, start)
            for s, e in self.clause_marks)


def _spans(pattern: re.Pattern, text: str, blocked: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)
            if not any(b0 <= m.start() < b1 or b0 < m.end() <= b1 for b0, b1 in blocked)]


def _outermost(mentions: list[Mention]) -> list[Mention]:
    """Drop a mention lying inside a longer mention of the same finding ("effusion" in "pleural
    effusion"), so each phrase counts once."""
    kept = []
    for m in mentions:
        inside = any(o is not m and o.finding == m.finding and o.start <= m.start and m.end <= o.end
                     and (o.end - o.start) > (m.end - m.start) for o in mentions)
        if not inside:
            kept.append(m)
    return sorted(kept, key=lambda m: (m.start, m.finding))


SIDES = frozenset({"left", "right", "bilateral"})
SIZES = frozenset({"large", "moderate", "significant", "sizable", "sizeable", "massive", "big"})


def _named_over_signs(mentions: list[Mention], text: str) -> list[Mention]:
    """A sign's status capped by what its sentence says of the finding by name: in "blunted costophrenic angle
    without definite pleural effusion" the effusion is negative, in "blunting of the costophrenic angle suggestive
    of a small effusion" possible, and the blunting does not make it positive. A sentence that does not name the
    finding, or names it as present too, keeps the sign's own status; so does one denying only a large finding ("left
    costophrenic blunting, no large effusion") or one on a side the sign does not name ("blunted left costophrenic
    angle, no right pleural effusion"; "blunted costophrenic angles, no effusion on the right"): the sign may be of
    a smaller or another one. ``text``: the lower-cased sentence the mentions' offsets are in."""
    capping = [(m.finding, _capping(m, mentions, text)) for m in mentions if not m.sign]
    named = merge({finding: status} for finding, status in capping if status is not None)
    return [replace(m, status=named[m.finding]) if m.sign and m.finding in named
            and _RANK[named[m.finding]] < _RANK[m.status] else m for m in mentions]


def _capping(named: Mention, mentions: list[Mention], text: str) -> str | None:
    """What a mention of a finding by name caps the finding's signs in its sentence to: its status, or None when it
    denies the finding only at a size or on a side the signs do not share (``SIZES``, ``SIDES`` in its clause)."""
    if named.status != NEGATIVE:
        return named.status
    qualifiers = _clause_words(text, named.start, named.end)
    if qualifiers & SIZES:
        return None
    sides = qualifiers & SIDES
    if sides:
        signs = [m for m in mentions if m.sign and m.finding == named.finding]
        if not signs or any(_clause_words(text, m.start, m.end) & SIDES != sides for m in signs):
            return None
    return named.status


def _clause_words(text: str, start: int, end: int, reach: int = 4) -> set[str]:
    """The words of a mention at ``start:end`` and up to ``reach`` words either side of it within its clause (not
    past a comma, semicolon, colon or full stop), as plain lower-case words."""
    before = re.split(r"[,;:.]", text[:start])[-1].split()[-reach:]
    after = re.split(r"[,;:.]", text[end:])[0].split()[:reach]
    return {word.strip("()'\"-") for word in (*before, *text[start:end].split(), *after)}


def merge(labels: Iterable[dict[str, str]]) -> dict[str, str]:
    """Combine statuses per finding: positive over uncertain over negative."""
    merged: dict[str, str] = {}
    for item in labels:
        for name, status in item.items():
            if name not in merged or _RANK[status] > _RANK[merged[name]]:
                merged[name] = status
    return merged


def with_normal(labels: dict[str, str], knowledge: KnowledgeBase) -> dict[str, str]:
    """``labels`` with the normal entry set: positive unless an abnormal finding is positive or
    uncertain (then negative). As in CheXpert, a report stating no finding at all (a clinical history only) counts
    as normal too; a draft whose normal consensus rests on such reports keeps no sentence and abstains
    (``medvl.rag.draft``: ``no_wording``)."""
    if knowledge.normal is None:
        return dict(labels)
    abnormal = set(knowledge.abnormal)
    found = any(status in (POSITIVE, UNCERTAIN) for name, status in labels.items() if name in abnormal)
    return {**labels, knowledge.normal: NEGATIVE if found else POSITIVE}
