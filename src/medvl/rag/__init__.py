"""Retrieval-augmented answers: report drafts from similar cases, a knowledge base of finding
definitions, and the report labeller that scores them.

``draft_report(index, model, image)`` -> a ``Draft`` whose sentences cite case ids (or an
abstention with its reason); ``load_knowledge(folder)`` -> the finding definitions (shipped in
``medvl/rag/knowledge``, one editable file per finding); ``ReportLabeller(knowledge).label(text)``
-> positive / uncertain / negative per finding.
"""

from .draft import Draft as Draft
from .draft import DraftSentence as DraftSentence
from .draft import draft_from_hits as draft_from_hits
from .draft import draft_report as draft_report
from .knowledge import Finding as Finding
from .knowledge import KnowledgeBase as KnowledgeBase
from .knowledge import load_knowledge as load_knowledge
from .labels import ReportLabeller as ReportLabeller
