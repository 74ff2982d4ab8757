"""Radiology-style CT reports for the 3D phantom, and its caption config for zero-shot prompts.

A report is one line, ``"FINDINGS: ... IMPRESSION: ..."``, written from the case's ground truth in
anatomical order (lung bases, pleura, liver, spleen, kidneys, other), sometimes with organ
headings, with varied phrasing and sizes in mm or cm. Positive sentences give the size, location
and side (the patient's). Absent findings are either not mentioned, described in words that do not
name them ("The liver is normal in size and attenuation."), or explicitly negated; every negating
sentence that names a finding contains "no", "not" or "without", and a report never affirms a
finding the case does not have. Words that name a finding: ``lesion`` / ``hypodens`` /
``hypoattenuat`` / ``low-attenuation`` (liver lesion), ``cyst`` (kidney cyst), ``nodul`` (lung
nodule), ``effusion`` / ``pleural fluid`` (pleural effusion).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .reports import _choice

CT3D_CAPTIONS: dict[str, Any] = {
    "templates": [
        "a CT scan showing {}.",
        "CT of the chest and abdomen with {}.",
        "axial CT images demonstrating {}.",
        "findings: {}.",
        "impression: {}.",
        "a computed tomography volume with {}.",
    ],
    "classes": {
        "finding": {
            "no_finding": [
                "no acute abnormality",
                "a normal CT of the lower chest and abdomen",
                "normal liver, kidneys and lung bases",
                "an unremarkable examination",
            ],
            "liver_lesion": [
                "a hypodense liver lesion",
                "a focal hepatic lesion",
                "a low-attenuation lesion in the liver",
                "a hypodense lesion in the right hepatic lobe",
            ],
            "kidney_cyst": [
                "a simple renal cyst",
                "a cyst of the kidney",
                "a fluid-attenuation renal cyst",
                "a simple cyst arising from the kidney",
            ],
            "lung_nodule": [
                "a pulmonary nodule",
                "a solid pulmonary nodule",
                "a nodule in the lung",
                "a solid nodule in the lower lobe",
            ],
            "pleural_effusion": [
                "a pleural effusion",
                "a layering pleural effusion",
                "pleural fluid",
                "a dependent pleural effusion",
            ],
        }
    },
}

_POSITIVE = {
    "liver_lesion": [
        "There is a {size} hypodense lesion in the {location}.",
        "A {size} low-attenuation lesion is seen in the {location}.",
        "{Size} hypoattenuating focal lesion in the {location}.",
        "The liver contains a {size} hypodense lesion in the {location}.",
    ],
    "kidney_cyst": [
        "A {size} simple cyst arises from the {location}.",
        "There is a {size} fluid-attenuation cyst in the {location}.",
        "{Size} simple renal cyst in the {location}.",
        "A {size} cyst in the {location}, of fluid attenuation ({hu} HU).",
    ],
    "lung_nodule": [
        "A {size} solid pulmonary nodule in the {location}.",
        "There is a {size} nodule in the {location}.",
        "{Size} solid nodule in the {location}.",
        "A {size} pulmonary nodule is present in the {location}.",
    ],
    "pleural_effusion": [
        "{Sev} {side} pleural effusion.",
        "There is a {sev} {side} pleural effusion.",
        "A {sev} layering {side} pleural effusion.",
        "{Sev} amount of {side} pleural fluid.",
    ],
}
_IMPRESSION = {
    "liver_lesion": ["{Size} hypodense lesion in the {location}, indeterminate; MRI is recommended for "
                     "characterisation.", "Hypodense lesion in the {location} ({size}).",
                     "Focal liver lesion in the {location}."],
    "kidney_cyst": ["Simple {side} renal cyst ({size}), benign.", "{Side} renal cyst.",
                    "{Size} simple cyst of the {side} kidney."],
    "lung_nodule": ["{Size} pulmonary nodule in the {location}.", "Solid pulmonary nodule in the {location} ({size})."],
    "pleural_effusion": ["{Sev} {side} pleural effusion.", "{Side} pleural effusion."],
}
_NORMAL_IMPRESSION = ["No acute abnormality in the lower chest or abdomen.",
                      "Normal CT of the lower chest and abdomen.", "No acute findings.", "Unremarkable examination."]
_FOLLOW_UP = ["Follow-up chest CT is recommended per Fleischner Society guidelines.",
              "Recommend follow-up CT in 3 to 6 months."]
_TECHNIQUE = {
    "portal venous": ["CT of the chest and abdomen with intravenous contrast, portal venous phase.",
                      "Contrast-enhanced CT of the lower chest and abdomen.", "CT abdomen with IV contrast."],
    "non-contrast": ["Non-contrast CT of the chest and abdomen.", "Unenhanced CT of the lower chest and abdomen.",
                     "CT abdomen without intravenous contrast."],
}
# (negations that name the absent finding, neutral normal sentences that do not)
_ABSENT = {
    "lung_nodule": (["No pulmonary nodules.", "No suspicious pulmonary nodule at the lung bases.",
                     "The visualized lungs are clear without nodules."],
                    ["The lung bases are clear.", "The visualized lung parenchyma is unremarkable."]),
    "pleural_effusion": (["No pleural effusion.", "There is no pleural effusion.", "No pleural fluid.",
                          "The pleural spaces are clear without effusion."], []),
    "liver_lesion": (["No focal liver lesion.", "The liver is unremarkable without focal lesions.",
                      "No focal hepatic lesion is seen."],
                     ["The liver is normal in size and attenuation.", "Normal liver."]),
    "kidney_cyst": (["No renal cyst or mass.", "The kidneys are normal in size without cysts or hydronephrosis.",
                     "No renal cysts."], ["The kidneys are unremarkable.", "Normal kidneys, no hydronephrosis."]),
}
_NEGATION_PROB = {"lung_nodule": 0.6, "pleural_effusion": 0.85, "liver_lesion": 0.75, "kidney_cyst": 0.65}
_SPLEEN = ["The spleen is normal in size.", "The spleen is unremarkable.", "Normal spleen."]
_OTHER = ["No free intraperitoneal air.", "The bowel is unremarkable.", "No lymphadenopathy.",
          "No acute osseous abnormality."]
_DEGENERATIVE = ["Mild degenerative changes of the spine.", "Degenerative changes of the thoracolumbar spine."]
_OTHER_KIDNEY = ["The {other} kidney is unremarkable.", "The {other} kidney is normal."]
_SECTIONS = (("LUNG BASES", "lung_nodule"), ("PLEURA", "pleural_effusion"), ("LIVER", "liver_lesion"),
             ("SPLEEN", None), ("KIDNEYS", "kidney_cyst"), ("OTHER", None))


def _size(finding: dict[str, Any], rng: np.random.Generator) -> str:
    mm = float(finding["size_mm"])
    return f"{mm / 10:.1f} cm" if rng.uniform() < 0.4 else f"{mm:.0f} mm"


def _fill(template: str, finding: dict[str, Any], rng: np.random.Generator) -> str:
    """Fill a template; lower-case keys give lower-case words, capitalised keys capitalise them."""
    words = {"size": _size(finding, rng), "location": finding.get("location") or "",
             "side": finding.get("side") or "", "sev": finding.get("severity") or "",
             "hu": f"{finding['hu']:.0f}" if finding.get("hu") is not None else ""}
    words.update({key.capitalize(): value[:1].upper() + value[1:] for key, value in words.items()})
    return template.format(**words)


def _section(name: str | None, present: dict[str, dict], meta: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Sentences about one organ: positive, negated, neutral or nothing."""
    if name is None:
        return []
    if name in present:
        sentences = [_fill(_choice(rng, _POSITIVE[name]), present[name], rng)]
        if name == "kidney_cyst" and rng.uniform() < 0.4:
            other = "left" if present[name]["side"] == "right" else "right"
            sentences.append(_choice(rng, _OTHER_KIDNEY).format(other=other))
        return sentences
    negations, neutral = _ABSENT[name]
    if name == "lung_nodule" and "pleural_effusion" in present:
        neutral = []  # "the lung bases are clear" would contradict the effusion
    draw = rng.uniform()
    if draw < _NEGATION_PROB[name]:
        return [_choice(rng, negations)]
    if neutral and draw < _NEGATION_PROB[name] + 0.6 * (1 - _NEGATION_PROB[name]):
        return [_choice(rng, neutral)]
    return []


def _extras(title: str, meta: dict[str, Any], rng: np.random.Generator) -> list[str]:
    if title == "SPLEEN":
        return [_choice(rng, _SPLEEN)] if rng.uniform() < 0.6 else []
    if title == "OTHER":
        pool = _OTHER + (_DEGENERATIVE if meta.get("age", 0) >= 60 else [])
        count = int(rng.integers(0, 3))
        return [pool[int(i)] for i in sorted(rng.choice(len(pool), size=count, replace=False))]
    return []


def _impression(findings: list[dict[str, Any]], rng: np.random.Generator) -> str:
    positives = [f for f in findings if f["name"] != "no_finding"]
    if not positives:
        return _choice(rng, _NORMAL_IMPRESSION)
    parts = []
    for finding in positives:
        part = _fill(_choice(rng, _IMPRESSION[finding["name"]]), finding, rng)
        if finding["name"] == "lung_nodule" and finding["size_mm"] >= 8 and rng.uniform() < 0.5:
            part += " " + _choice(rng, _FOLLOW_UP)
        parts.append(part)
    if len(parts) > 1 and rng.uniform() < 0.5:
        return " ".join(f"{i}. {part}" for i, part in enumerate(parts, start=1))
    return " ".join(parts)


def write_ct_report(findings: list[dict[str, Any]], meta: dict[str, Any], rng: np.random.Generator) -> str:
    """A one-line "FINDINGS: ... IMPRESSION: ..." CT report for a case's ground truth."""
    present = {f["name"]: f for f in findings if f["name"] != "no_finding"}
    headings = rng.uniform() < 0.4
    body = [_choice(rng, _TECHNIQUE[meta["phase"]])] if rng.uniform() < 0.5 else []
    for title, name in _SECTIONS:
        sentences = _section(name, present, meta, rng) + _extras(title, meta, rng)
        if sentences and headings:
            sentences[0] = f"{title.capitalize()}: {sentences[0]}"
        body += sentences
    if not body:
        body = [_choice(rng, _TECHNIQUE[meta["phase"]])]
    return f"FINDINGS: {' '.join(body)} IMPRESSION: {_impression(findings, rng)}"
