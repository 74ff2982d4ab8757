"""Radiology-style reports for phantom cases, and the caption config for zero-shot prompts.

A report is one line, ``"FINDINGS: ... IMPRESSION: ..."``, written from the case's ground truth
with varied phrasing and sentence order. Positive sentences name the side, zone, size and
severity where they apply (sides are the patient's). Absent findings are either not mentioned or
explicitly negated ("No pleural effusion or pneumothorax."); a report never affirms a finding the
case does not have. Every negating sentence contains the word "no" or "not".
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Class descriptions reuse the words of the reports' positive sentences, so a model trained on
# the reports can be prompted zero-shot with them (see medvl.data.captions.CaptionConfig).
PHANTOM_CAPTIONS: dict[str, Any] = {
    "templates": [
        "a chest x-ray showing {}.",
        "chest radiograph with {}.",
        "frontal chest film: {}.",
        "a frontal chest radiograph demonstrating {}.",
        "an x-ray of the chest with {}.",
        "findings: {}.",
    ],
    "classes": {
        "finding": {
            "no_finding": [
                "no acute cardiopulmonary abnormality",
                "normal chest",
                "clear lungs and normal heart size",
                "a normal chest radiograph",
            ],
            "cardiomegaly": [
                "cardiomegaly",
                "an enlarged cardiac silhouette",
                "enlargement of the cardiac silhouette",
                "an enlarged heart",
            ],
            "pleural_effusion": [
                "a pleural effusion",
                "blunting of the costophrenic angle",
                "a pleural effusion with a meniscus",
                "pleural fluid at the lung base",
            ],
            "nodule": [
                "a pulmonary nodule",
                "a solitary pulmonary nodule",
                "a rounded opacity consistent with a pulmonary nodule",
                "a nodular opacity in the lung",
            ],
            "consolidation": [
                "consolidation",
                "patchy airspace consolidation",
                "airspace opacity consistent with consolidation",
                "focal consolidation",
            ],
            "pneumothorax": [
                "a pneumothorax",
                "a visible visceral pleural line with absent lung markings peripherally",
                "pneumothorax with a visceral pleural line",
            ],
        }
    },
}

_POSITIVE = {
    "cardiomegaly": [
        "The cardiac silhouette is enlarged.",
        "{Sev} cardiomegaly.",
        "There is {sev} enlargement of the cardiac silhouette.",
        "The heart is enlarged, with a cardiothoracic ratio of about {ctr}.",
        "Enlarged cardiac silhouette, consistent with cardiomegaly.",
    ],
    "pleural_effusion": [
        "There is a {sev} {side} pleural effusion.",
        "{Sev} {side} pleural effusion.",
        "A {sev} {side} pleural effusion with a meniscus at the {side} base.",
        "{Sev} {side}-sided pleural effusion.",
    ],
    "nodule": [
        "A {mm} mm nodule in the {zone}.",
        "There is a {mm} mm pulmonary nodule in the {zone}.",
        "A well-defined {mm} mm rounded opacity projects over the {zone}, consistent with a "
        "pulmonary nodule.",
        "Solitary pulmonary nodule in the {zone}, measuring {mm} mm.",
        "{mm} mm nodular opacity in the {zone}.",
    ],
    "consolidation": [
        "Patchy airspace consolidation in the {zone}{bronchograms}.",
        "There is airspace opacity in the {zone}, consistent with consolidation{bronchograms}.",
        "Focal consolidation in the {zone}{bronchograms}.",
        "Consolidation is seen in the {zone}{bronchograms}.",
    ],
    "pneumothorax": [
        "There is a {sev} {side} {apical}pneumothorax.",
        "{Sev} {side} {apical}pneumothorax.",
        "A {side} visceral pleural line is visible with absent lung markings peripherally, "
        "consistent with a {sev} pneumothorax.",
        "{Side} {apical}pneumothorax with a visible visceral pleural line.",
    ],
}

_IMPRESSION = {
    "cardiomegaly": ["Cardiomegaly.", "{Sev} cardiomegaly.", "Enlarged cardiac silhouette."],
    "pleural_effusion": ["{Sev} {side} pleural effusion.", "{Side} pleural effusion."],
    "nodule": ["{mm} mm {zone} nodule.", "{Zone} pulmonary nodule ({mm} mm)."],
    "consolidation": [
        "{Zone} consolidation, possibly pneumonia in the appropriate clinical setting.",
        "{Zone} consolidation.",
        "Airspace consolidation in the {zone}.",
    ],
    "pneumothorax": ["{Sev} {side} pneumothorax.", "{Side} pneumothorax."],
}

_NORMAL_IMPRESSION = [
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No acute cardiopulmonary process.",
    "No radiographic evidence of acute disease.",
]
_TECHNIQUE = {
    "PA": ["PA view of the chest.", "Frontal radiograph of the chest.", "Single PA chest view."],
    "AP": ["AP portable view of the chest.", "Single AP view of the chest.", "Portable AP film."],
}
_HEART_NORMAL = [
    "The heart size is normal.",
    "Normal heart size.",
    "The cardiac silhouette is not enlarged.",
    "Heart size is within normal limits.",
    "The cardiomediastinal silhouette is within normal limits.",
    "No cardiomegaly.",
]
_HEART_NORMAL_AP = ["Heart size is normal for an AP projection."]
_MEDIASTINUM = [
    "The mediastinal contours are normal.",
    "Mediastinal contours are unremarkable.",
    "The mediastinum is not widened.",
    "Normal mediastinal and hilar contours.",
]
_LUNGS_CLEAR = [
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "Both lungs are clear.",
    "The lungs are well expanded and clear.",
]
_OTHER_LUNG_CLEAR = ["The {side} lung is clear.", "The {side} lung is clear and well expanded."]
_NEGATIONS = {
    ("pleural_effusion", "pneumothorax"): [
        "No pleural effusion or pneumothorax.",
        "There is no pleural effusion or pneumothorax.",
        "No pneumothorax or pleural effusion is seen.",
        "No pleural effusion. No pneumothorax.",
    ],
    ("pleural_effusion",): ["No pleural effusion.", "There is no pleural effusion."],
    ("pneumothorax",): ["No pneumothorax.", "There is no pneumothorax."],
    ("consolidation",): [
        "No focal consolidation.",
        "No focal airspace consolidation.",
        "There is no consolidation.",
    ],
    ("nodule",): ["No pulmonary nodule is seen.", "No suspicious pulmonary nodules.",
                  "No nodules or masses."],
}
_NEGATION_PROB = {"pleural_effusion": 0.9, "pneumothorax": 0.9, "consolidation": 0.6, "nodule": 0.4}
_BONES = [
    "No acute osseous abnormality.",
    "The visualized osseous structures are unremarkable.",
    "The bony thorax is intact.",
]
_FOLLOW_UP = ["Recommend CT follow-up.", "Follow-up chest CT is suggested.",
              "Consider CT for further characterisation."]
_LUNG_FINDINGS = ("nodule", "consolidation", "pleural_effusion", "pneumothorax")


def _choice(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(template: str, finding: dict[str, Any], meta: dict[str, Any]) -> str:
    """Fill a template; lower-case keys give lower-case words, capitalised keys capitalise them."""
    detail = finding.get("detail")
    words = {
        "sev": finding.get("severity") or "",
        "side": finding.get("side") or "",
        "zone": finding.get("zone") or "",
        "mm": f"{finding['size_mm']:.0f}" if finding.get("size_mm") else "",
        "ctr": f"{meta.get('ctr', 0.0):.2f}",
        "bronchograms": " with air bronchograms" if detail == "air bronchograms" else "",
        "apical": "apical " if detail == "apical" else "",
    }
    words.update({key.capitalize(): value[:1].upper() + value[1:] for key, value in words.items()})
    return template.format(**words)


_BLUNTING = [
    "Blunting of the {side} costophrenic angle, consistent with a small pleural effusion.",
    "Blunting of the {side} costophrenic angle, in keeping with a small {side} pleural effusion.",
    "Small {side} pleural effusion blunting the costophrenic angle.",
]


def _positive(name: str, finding: dict[str, Any], meta: dict[str, Any],
              rng: np.random.Generator) -> str:
    options = _POSITIVE[name]
    if name == "pleural_effusion" and finding.get("detail") == "blunting":
        options = _BLUNTING
    elif name == "pleural_effusion" and finding.get("severity") == "small":
        options = options + _BLUNTING[:1]
    return _fill(_choice(rng, options), finding, meta)


def _cardiac_sentences(present: dict[str, dict], meta: dict[str, Any],
                       rng: np.random.Generator) -> list[str]:
    if "cardiomegaly" in present:
        sentences = [_positive("cardiomegaly", present["cardiomegaly"], meta, rng)]
    else:
        pool = _HEART_NORMAL + (_HEART_NORMAL_AP if meta.get("view") == "AP" else [])
        sentences = [_choice(rng, pool)]
    if rng.uniform() < 0.6:
        sentences.append(_choice(rng, _MEDIASTINUM))
    return sentences


def _lung_sentences(present: dict[str, dict], meta: dict[str, Any],
                    rng: np.random.Generator) -> list[str]:
    sentences = [_positive(name, present[name], meta, rng) for name in _LUNG_FINDINGS
                 if name in present]
    rng.shuffle(sentences)
    sides = {present[name]["side"] for name in _LUNG_FINDINGS if name in present}
    if not sides:
        sentences.insert(0, _choice(rng, _LUNGS_CLEAR))
    elif len(sides) == 1 and rng.uniform() < 0.4:
        other = "left" if sides == {"right"} else "right"
        sentences.append(_choice(rng, _OTHER_LUNG_CLEAR).format(side=other))
    return sentences


def _negations(present: dict[str, dict], rng: np.random.Generator) -> list[str]:
    """Explicit negations of some absent findings (effusion and pneumothorax most often)."""
    negated = [name for name, prob in _NEGATION_PROB.items()
               if name not in present and rng.uniform() < prob]
    if not negated:
        absent = [name for name in _NEGATION_PROB if name not in present]
        negated = absent[:1]
    sentences = []
    if "pleural_effusion" in negated and "pneumothorax" in negated:
        sentences.append(_choice(rng, _NEGATIONS[("pleural_effusion", "pneumothorax")]))
        negated = [name for name in negated if name not in ("pleural_effusion", "pneumothorax")]
    sentences += [_choice(rng, _NEGATIONS[(name,)]) for name in negated]
    return sentences


def _impression(findings: list[dict[str, Any]], meta: dict[str, Any],
                rng: np.random.Generator) -> str:
    positives = [f for f in findings if f["name"] != "no_finding"]
    if not positives:
        return _choice(rng, _NORMAL_IMPRESSION)
    parts = []
    for finding in positives:
        part = _fill(_choice(rng, _IMPRESSION[finding["name"]]), finding, meta)
        if finding["name"] == "nodule" and finding["size_mm"] >= 6 and rng.uniform() < 0.5:
            part += " " + _choice(rng, _FOLLOW_UP)
        parts.append(part)
    if len(parts) > 1 and rng.uniform() < 0.5:
        return " ".join(f"{i}. {part}" for i, part in enumerate(parts, start=1))
    return " ".join(parts)


def write_report(findings: list[dict[str, Any]], meta: dict[str, Any],
                 rng: np.random.Generator) -> str:
    """A one-line "FINDINGS: ... IMPRESSION: ..." report for a case's ground truth."""
    present = {f["name"]: f for f in findings if f["name"] != "no_finding"}
    groups = [
        _cardiac_sentences(present, meta, rng),
        _lung_sentences(present, meta, rng),
        _negations(present, rng),
    ]
    order = rng.permutation(len(groups))
    body = [sentence for i in order for sentence in groups[int(i)]]
    if rng.uniform() < 0.4:
        body.insert(0, _choice(rng, _TECHNIQUE[meta.get("view", "PA")]))
    if rng.uniform() < 0.4:
        body.append(_choice(rng, _BONES))
    return f"FINDINGS: {' '.join(body)} IMPRESSION: {_impression(findings, meta, rng)}"
