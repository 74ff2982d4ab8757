"""Evaluation protocols; each returns a plain JSON-serialisable dict of metrics."""

from . import calibration as calibration
from .case_retrieval import case_retrieval as case_retrieval
from .linear_probe import linear_probe as linear_probe
from .retrieval import retrieval as retrieval
from .zero_shot import zero_shot as zero_shot
