"""The report labeller on IU X-ray (Open-i) phrasing: one case per fix that the disagreements with the
IU MeSH terms led to (each failed before its fix), and the agreement on the real test split.

The sentences are short, in the style of the Open-i reports (``[redacted]`` is the loader's token for
the source's ``XXXX`` placeholders). The benchmark is ``benchmarks/labeller_iu.py``; the figures and
the examples behind each fix are in docs/benchmarks.md, "Report labeller vs IU X-ray MeSH".
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from medvl import load_dataset
from medvl.rag.labels import ReportLabeller

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "labeller_iu.py"
# test-split F1 (uncertain counted as negative) a little below what was measured after the fixes (docs/benchmarks.md:
# normal 0.694, cardiomegaly 0.921, effusion 1.000, opacity/consolidation 0.993, nodule 0.632, pneumothorax 1.000,
# atelectasis 0.909, edema 0.929, emphysema 0.958, no compared finding 0.974); small supports (pneumothorax 6,
# nodule 8, edema 15) get more room, as one report moves their F1 by 0.05-0.1. Before the fixes normal was 0.642,
# effusion 0.837, pneumothorax 0.545, edema 0.786, emphysema 0.762 and no compared finding 0.908: under these floors.
TEST_F1_FLOORS = {
    "normal": 0.67, "cardiomegaly": 0.89, "effusion": 0.93, "opacity/consolidation": 0.96, "nodule": 0.55,
    "pneumothorax": 0.85, "atelectasis": 0.86, "edema": 0.85, "emphysema": 0.90, "no compared finding": 0.95,
}


@pytest.fixture(scope="module")
def labeller():
    return ReportLabeller()


@pytest.mark.parametrize("sentence, expected", [
    # a negation covers a whole list, however long
    ("No focal consolidation, suspicious pulmonary opacity, pneumothorax or definite pleural effusion.",
     {"consolidation": "negative", "lung_opacity": "negative", "pneumothorax": "negative",
      "pleural_effusion": "negative"}),
    ("The lungs are normally inflated without evidence of focal airspace disease, pleural effusion, or "
     "pneumothorax.", {"consolidation": "negative", "pleural_effusion": "negative", "pneumothorax": "negative"}),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.",
     {"pneumonia": "negative", "pleural_effusion": "negative", "edema": "negative", "pneumothorax": "negative",
      "nodule": "negative", "mass": "negative"}),
    # ... and what the negated finding would "suggest"
    ("There is no focal air space opacity to suggest a pneumonia.",
     {"lung_opacity": "negative", "pneumonia": "negative"}),
    # a list after a hedge is hedged as a whole
    ("Differential diagnosis includes chronic interstitial lung disease, infectious process, or interstitial edema.",
     {"pneumonia": "uncertain", "edema": "uncertain"}),
    # plurals of words in -y
    ("Nodular opacities in the right lung base.", {"nodule": "positive", "lung_opacity": "positive"}),
    ("Patchy nodular densities in both lower lungs.", {"nodule": "positive"}),
    # borderline: the hedge is inside the phrase
    ("Borderline heart size.", {"cardiomegaly": "uncertain"}),
    ("The heart is borderline in size.", {"cardiomegaly": "uncertain"}),
    # synonyms
    ("The heart is large.", {"cardiomegaly": "positive"}),
    ("Stable mild heart enlargement.", {"cardiomegaly": "positive"}),
    ("Right lower lobe infiltrate.", {"lung_opacity": "positive"}),
    ("No infiltrates.", {"lung_opacity": "negative"}),
    ("Lungs are hyperexpanded but clear.", {"emphysema": "positive"}),
    ("Mild central vascular prominence.", {"edema": "positive"}),
    ("Small medial left upper lobe pleural air collection.", {"pneumothorax": "positive"}),
    # the costophrenic "angle" is often a placeholder in the source
    ("Blunting of the right costophrenic [redacted].", {"pleural_effusion": "positive"}),
    ("Bilateral costophrenic [redacted] blunting is present.", {"pleural_effusion": "positive"}),
    # normal-range statements negate the phrase right before them; soft tissue edema is not pulmonary edema
    ("Heart size and pulmonary vascular engorgement appear within limits of normal.", {"edema": "negative"}),
    ("Soft tissue edema with no visible bony injury.", {}),
    # hedges
    ("Question edema or atypical infection?", {"edema": "uncertain"}),
    ("Pneumonia is in the differential.", {"pneumonia": "uncertain"}),
    ("Please note that fractures may not be demonstrated.", {"fracture": "uncertain"}),
    ("Limited exam, for evaluation of fractures.", {"fracture": "uncertain"}),
    ("Consider oblique images to exclude true nodule.", {"nodule": "uncertain"}),
    ("Bony overlap in the lung apices could obscure a small pulmonary nodule.", {"nodule": "uncertain"}),
    ("There is suggestion of minimal bibasilar airspace disease.", {"consolidation": "uncertain"}),
    ("Upper lobe airspace disease or pulmonary nodule is not entirely excluded.",
     {"consolidation": "uncertain", "nodule": "uncertain"}),
    ("However, true pulmonary nodule is a possibility.", {"nodule": "uncertain"}),
    ("Minimal perihilar opacity which could indicate an atypical pneumonia.",
     {"lung_opacity": "positive", "pneumonia": "uncertain"}),
    ("Please correlate clinically for pneumonia.", {"pneumonia": "uncertain"}),
    ("In the appropriate clinical setting this appearance is compatible with pneumonia.", {"pneumonia": "uncertain"}),
    ("Followup radiographs to ensure resolution and exclude an underlying mass.", {"mass": "uncertain"}),
    ("Possibility of left rib 7 anterior nondisplaced fracture.", {"fracture": "uncertain"}),
    ("Suspicion for small bilateral pleural effusions.", {"pleural_effusion": "uncertain"}),
    # an adjective-like participle stays inside a negated list
    ("There is no evidence of focal infiltrate, pneumothorax, pleural effusion, or identified mass lesion.",
     {"lung_opacity": "negative", "pneumothorax": "negative", "pleural_effusion": "negative", "mass": "negative"}),
    # more synonyms
    ("Cardiac size remains mildly enlarged but stable.", {"cardiomegaly": "positive"}),
    ("There is a marked interval increase in heart size.", {"cardiomegaly": "positive"}),
    ("Stable increased lung volumes consistent with chronic lung disease.", {"emphysema": "positive"}),
    ("Chronic blunting of both lateral costophrenic [redacted].", {"pleural_effusion": "positive"}),
    ("Stable left upper lobe collapse.", {"atelectasis": "positive"}),
    # guard for the list rule: a cue does not reach across a new clause ("densities not seen before, ... fracture")
    ("Axillary densities not seen on the previous exam, healed right rib fracture noted.", {"fracture": "positive"}),
    # resolution and unchanged findings
    ("The left lower lobe consolidation has cleared.", {"consolidation": "negative"}),
    ("Essentially resolved bibasilar atelectasis.", {"atelectasis": "negative"}),
    ("There has been clearing of left base airspace opacities.", {"lung_opacity": "negative"}),
    ("Bibasilar interstitial infiltrates and pulmonary venous engorgement have resolved.",
     {"lung_opacity": "negative", "edema": "negative"}),
    ("COPD with almost completely resolved right apical pleural air collection.",
     {"emphysema": "positive", "pneumothorax": "positive"}),
    ("Redemonstration without significant interval change of mild subsegmental atelectasis.",
     {"atelectasis": "positive"}),
])
def test_labeller_reads_iu_xray_phrasing(labeller, sentence, expected):
    assert dict(labeller.sentence_labels(sentence)) == expected


def test_a_normal_report_with_a_long_negated_list_is_normal(labeller):
    report = ("The heart is normal in size. No focal consolidation, suspicious pulmonary opacity, large pleural "
              "effusion, or pneumothorax is identified. No acute cardiopulmonary abnormality.")
    assert labeller.positives(report) == {"no_finding"}


def test_a_new_clause_ends_the_negated_list(labeller):
    assert dict(labeller.sentence_labels("No pneumothorax, there is a small left effusion with adjacent "
                                         "atelectasis.")) == {"pneumothorax": "negative", "pleural_effusion":
                                                              "positive", "atelectasis": "positive"}


@pytest.mark.parametrize("sentence, expected", [
    ("Small right juxtahilar opacity may represent infiltrate.", {"lung_opacity": "positive"}),
    ("Patchy opacity left base, may represent evolving infiltrate.", {"lung_opacity": "positive"}),
    ("Minimal bibasilar opacities which may reflect atelectasis or infiltrate.",
     {"lung_opacity": "positive", "atelectasis": "uncertain"}),
    # a sign of the finding hedged as the finding stays possible
    ("There is mild blunting of the right costophrenic [redacted] which may represent a small right pleural "
     "effusion.", {"pleural_effusion": "uncertain"}),
])
def test_an_opacity_hedged_as_an_infiltrate_is_stated(shared_data, labeller, sentence, expected):
    """A hedge naming a second synonym of the same entry made the first mention uncertain, which is right when the
    first is a sign (blunting, "which may represent a small effusion") and wrong when both are the finding: "opacity
    may represent infiltrate" (both lung_opacity) made a stated opacity possible (CXR1200, CXR2886). Only a
    synonym the knowledge file lists under ``signs`` is renamed now."""
    assert dict(labeller.sentence_labels(sentence)) == expected
    reports = {r.id: r.text for r in load_dataset(shared_data / "iu-xray-reports") if r.id in ("CXR1200", "CXR2886")}
    assert {i: labeller.label(text)["lung_opacity"] for i, text in reports.items()} == \
        {"CXR1200": "positive", "CXR2886": "positive"}


@pytest.mark.parametrize("sentence, expected", [
    ("Mildly blunted right costophrenic angle without definite pleural effusion.", "negative"),
    ("Blunting of the right costophrenic angle, no pleural effusion.", "negative"),
    ("Blunting of the costophrenic angle suggestive of small pleural effusions.", "uncertain"),
    ("Blunted costophrenic angles, possibly small effusions.", "uncertain"),
    ("Blunting of the costophrenic angle likely represents scarring rather than effusion.", "uncertain"),
    ("Blunting of the costophrenic angle, which may represent a small effusion.", "uncertain"),
    # the sign alone, or beside the finding stated, is the finding
    ("Blunting of the costophrenic angle with a small effusion.", "positive"),
    ("Chronic blunting of both lateral costophrenic [redacted].", "positive"),
    # a finding denied only at a size, or on a side the sign does not name, leaves the sign's finding (these were
    # read negative, with no_finding positive, by the first version of the rule)
    ("Left costophrenic blunting, no large effusion.", "positive"),
    ("Blunted left costophrenic angle, no right pleural effusion.", "positive"),
    ("Blunted costophrenic angles, no pleural effusion on the right.", "positive"),
    ("Blunted left costophrenic angle, no left pleural effusion.", "negative"),
    ("Blunted right costophrenic angle without definite right pleural effusion.", "negative"),
])
def test_a_sign_does_not_outweigh_what_its_sentence_says_of_the_finding(labeller, sentence, expected):
    """A costophrenic blunting (a ``signs`` synonym of the effusion) made the effusion positive even where the same
    sentence negated or hedged the effusion by name (positive outranks the other statuses)."""
    assert dict(labeller.sentence_labels(sentence))["pleural_effusion"] == expected


def test_iu_reports_negating_or_hedging_the_effusion_beside_a_blunting_are_not_positive(shared_data, labeller):
    """CXR2946 ("Mildly blunted right costophrenic [redacted] without definite pleural effusion.") was effusion
    positive, so a generated "no pleural effusion" scored a false negative; CXR2548 ("Blunting of the costophrenic
    [redacted] suggestive of small pleural effusions.") too. Six IU reports' labels move (docs/benchmarks.md)."""
    reports = {r.id: r.text for r in load_dataset(shared_data / "iu-xray-reports") if r.id in ("CXR2946", "CXR2548")}
    assert {i: labeller.label(text)["pleural_effusion"] for i, text in reports.items()} == \
        {"CXR2946": "negative", "CXR2548": "uncertain"}


@pytest.mark.parametrize("sentence, expected", [
    # a negated-uncertainty phrase after the finding, as before it (the first three were read as positive)
    ("Pulmonary edema is difficult to exclude.", {"edema": "uncertain"}),
    ("Pneumothorax is difficult to exclude on this supine film.", {"pneumothorax": "uncertain"}),
    ("Small pneumothorax difficult to rule out.", {"pneumothorax": "uncertain"}),
    ("Difficult to exclude a small pneumothorax.", {"pneumothorax": "uncertain"}),
    ("Pneumothorax cannot be ruled out.", {"pneumothorax": "uncertain"}),
    ("Pneumothorax not excluded.", {"pneumothorax": "uncertain"}),
    # "lack of" and "not clearly seen" negate, "suggest" hedges (all were read as positive)
    ("Lack of pleural effusion.", {"pleural_effusion": "negative"}),
    ("Pleural effusion not clearly seen.", {"pleural_effusion": "negative"}),
    ("Appearance suggest atelectasis.", {"atelectasis": "uncertain"}),
    ("Lack of interval change in the left pleural effusion.", {"pleural_effusion": "positive"}),  # still there
    ("There is no focal air space opacity to suggest a pneumonia.",
     {"lung_opacity": "negative", "pneumonia": "negative"}),
])
def test_hedges_and_negations_after_the_finding_and_the_missing_cues(labeller, sentence, expected):
    assert dict(labeller.sentence_labels(sentence)) == expected


def test_iu_reports_hedging_a_finding_after_it_or_with_suggest_are_not_positive(shared_data, labeller):
    """CXR1355 "..., pulmonary edema difficult to entirely exclude." was edema positive (scored as such by the
    clinical F1 of ``eval report``); CXR1417 "This could suggest emphysematous bullae." emphysema positive."""
    wanted = {"CXR1355": "edema", "CXR1417": "emphysema", "CXR1015": "consolidation"}
    reports = {r.id: r.text for r in load_dataset(shared_data / "iu-xray-reports") if r.id in wanted}
    assert {i: labeller.label(text)[wanted[i]] for i, text in reports.items()} == \
        {"CXR1355": "uncertain", "CXR1417": "uncertain", "CXR1015": "uncertain"}


def _benchmark():
    spec = importlib.util.spec_from_file_location("labeller_iu", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_agreement_with_the_iu_mesh_terms_on_the_test_split(shared_data, labeller):
    benchmark = _benchmark()
    dataset = load_dataset(shared_data / "iu-xray-reports")
    records = [r for r in dataset if r.split == "test" and "status" in r.labels]
    assert len(records) == 403
    result, _ = benchmark.compare(records, labeller)
    f1 = {name: result[name]["uncertain_negative"]["f1"] for name in TEST_F1_FLOORS}
    assert {name: value for name, value in f1.items() if value < TEST_F1_FLOORS[name]} == {}
    assert result["cardiomegaly"]["support"] == 41 and result["pneumothorax"]["support"] == 6


def test_the_benchmark_refuses_an_unknown_split(shared_data, tmp_path):
    """An unknown split printed an all-zero table and wrote it as a result (exit 0)."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCHMARK), "--data", str(shared_data / "iu-xray-reports"),
                           "--split", "nosuch", "--json", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no split 'nosuch'" in done.stderr
    assert not (tmp_path / "out.json").exists()
