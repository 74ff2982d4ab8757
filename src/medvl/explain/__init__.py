"""Explanations of a dual encoder's findings: heatmaps, their grounding quality, concept bottlenecks.

``heatmaps``: patch-text similarity and Grad-CAM maps for a class's text; ``grounding``: pointing
game, energy in box, IoU / Dice against boxes and masks beside a random and a centre-prior map; ``sanity``: whether
a method's maps depend on the model's weights and on the finding (model randomisation, class sensitivity).
"""

from .grounding import evaluate_grounding as evaluate_grounding
from .heatmaps import METHODS as METHODS
from .heatmaps import heatmaps as heatmaps
