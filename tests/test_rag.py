"""Retrieval-augmented reports: the report labeller, the knowledge base, drafts with citations and
abstention, and ``medvl eval case-retrieval`` (metrics checked against plain references)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from cli_helpers import invoke
from medvl import DataError, InputError, create_model, load_dataset, load_model
from medvl.data.images import read_image
from medvl.data.phantom import FINDINGS, LABEL_COLUMNS, generate_phantom
from medvl.eval.case_retrieval import (
    average_precision,
    case_retrieval,
    finding_f1,
    label_set,
    random_average_precision,
)
from medvl.index import build_index, open_index
from medvl.index.base import Hit
from medvl.index.cases import pixel_sha256
from medvl.rag import ReportLabeller, draft_from_hits, draft_report, load_knowledge
from medvl.rag.draft import (
    DISAGREE,
    FAR,
    FEW_REPORTS,
    NO_CASES,
    NO_WORDING,
    _identifiers,
    check_settings,
    common_words,
    jaccard,
    report_words,
)
from medvl.rag.knowledge import case_region, region_key
from medvl.rag.labels import MAX_REACH, split_sentences

NEW_FINDING = """---
name: pleural_plaque
title: Pleural plaque
synonyms: [pleural plaque, calcified plaque ... pleura]
labels: [plaques]
definition: Focal pleural thickening from asbestos exposure.
appearance: Calcified plaques along the diaphragm and chest wall.
---
Added by a user.
"""


@pytest.fixture(scope="module")
def labeller():
    return ReportLabeller()


@pytest.mark.parametrize("sentence, expected", [
    ("There is a small left pleural effusion.", {"pleural_effusion": "positive"}),
    ("No pleural effusion or pneumothorax.", {"pleural_effusion": "negative", "pneumothorax": "negative"}),
    ("There is no evidence of focal consolidation, pleural effusion or pneumothorax.",
     {"consolidation": "negative", "pleural_effusion": "negative", "pneumothorax": "negative"}),
    ("The cardiac silhouette is not enlarged.", {"cardiomegaly": "negative"}),
    ("The heart is enlarged.", {"cardiomegaly": "positive"}),
    ("Enlargement of the cardiac silhouette, consistent with cardiomegaly.", {"cardiomegaly": "positive"}),
    ("Pneumothorax is not seen.", {"pneumothorax": "negative"}),
    ("Lungs are free of focal airspace disease.", {"consolidation": "negative"}),
    ("Interval resolution of the right pneumothorax.", {"pneumothorax": "negative"}),
    ("No nodules or masses.", {"nodule": "negative", "mass": "negative"}),
    ("Blunting of the right costophrenic angle.", {"pleural_effusion": "positive"}),
    ("Possible small left pleural effusion.", {"pleural_effusion": "uncertain"}),
    ("Pneumonia cannot be excluded.", {"pneumonia": "uncertain"}),
    ("Findings may represent atelectasis.", {"atelectasis": "uncertain"}),
    ("No change in the moderate left pleural effusion.", {"pleural_effusion": "positive"}),  # pseudo-negation
    # variants of "no change in X" (all read as negations of X): X is there, unchanged
    ("No changes in the left pleural effusion.", {"pleural_effusion": "positive"}),
    ("No appreciable change in the right pleural effusion.", {"pleural_effusion": "positive"}),
    ("No interval changes in cardiomegaly.", {"cardiomegaly": "positive"}),
    ("No definite interval change in the right pleural effusion.", {"pleural_effusion": "positive"}),
    ("No worsening of the left pleural effusion.", {"pleural_effusion": "positive"}),
    ("No changes of emphysema.", {"emphysema": "negative"}),  # "changes" as findings: a negation
    ("No new or worsening consolidation.", {"consolidation": "negative"}),
    ("No pneumothorax, but there is a small right effusion.",
     {"pneumothorax": "negative", "pleural_effusion": "positive"}),  # "but" ends the negation's scope
    ("Small pericardial effusion.", {}),  # an excluded phrase is not a pleural effusion
    ("Mild pulmonary edema and bilateral pleural effusions.", {"edema": "positive", "pleural_effusion": "positive"}),
    ("No acute cardiopulmonary abnormality.", {"no_finding": "positive"}),
    # negations after the finding, and structured reports' answers (all were read as positive)
    ("Pneumothorax was excluded.", {"pneumothorax": "negative"}),
    ("Pneumothorax excluded.", {"pneumothorax": "negative"}),
    ("Tension pneumothorax ruled out.", {"pneumothorax": "negative"}),
    ("Pneumothorax has been ruled out.", {"pneumothorax": "negative"}),
    ("Pneumothorax: none.", {"pneumothorax": "negative"}),
    ("PNEUMOTHORAX: NO.", {"pneumothorax": "negative"}),
    ("Pneumothorax - none. ", {"pneumothorax": "negative"}),
    ("Pleural effusion: negative; consolidation: present.",
     {"pleural_effusion": "negative", "consolidation": "positive"}),
    ("Pneumothorax?", {"pneumothorax": "uncertain"}),
    ("Pneumothorax is not excluded.", {"pneumothorax": "uncertain"}),  # the double negation still wins
    # a direct negation nearer the mention than a double negation (both read as uncertain), and "not excluding"
    ("Pneumonia cannot be excluded, no effusion.", {"pneumonia": "uncertain", "pleural_effusion": "negative"}),
    ("No effusion, pneumonia cannot be excluded.", {"pleural_effusion": "negative", "pneumonia": "uncertain"}),
    ("Cannot exclude pneumonia, no effusion or pneumothorax.",
     {"pneumonia": "uncertain", "pleural_effusion": "negative", "pneumothorax": "negative"}),
    ("Pneumonia or effusion cannot be excluded.", {"pneumonia": "uncertain", "pleural_effusion": "uncertain"}),
    ("Not excluding pneumonia.", {"pneumonia": "uncertain"}),
    # a colon or dash between two statements ends a negation's scope (the pneumothorax was read as absent) ...
    ("Negative for effusion: pneumothorax is large.", {"pleural_effusion": "negative", "pneumothorax": "positive"}),
    ("No effusion - large pneumothorax.", {"pleural_effusion": "negative", "pneumothorax": "positive"}),
    ("No effusion\u2014large pneumothorax.", {"pleural_effusion": "negative", "pneumothorax": "positive"}),
    # ... not one right after the cue or the finding, nor one between digits
    ("Negative for: effusion, pneumothorax.", {"pleural_effusion": "negative", "pneumothorax": "negative"}),
    ("Effusion: not identified.", {"pleural_effusion": "negative"}),
    ("No 2\u20133 mm nodules.", {"nodule": "negative"}),
    ("Right lower lobe consolidation, no air bronchograms.", {"consolidation": "positive"}),
    ("Consolidation - no change.", {"consolidation": "positive"}),
    # hedges against a finding (all were read as positive)
    ("Cardiomegaly is unlikely.", {"cardiomegaly": "negative"}),
    ("Pneumonia very unlikely.", {"pneumonia": "negative"}),
    ("Unlikely to represent pneumonia.", {"pneumonia": "negative"}),
    ("Doubtful pneumothorax.", {"pneumothorax": "negative"}),
    ("Pneumothorax is doubtful.", {"pneumothorax": "negative"}),
    ("Improbable effusion.", {"pleural_effusion": "negative"}),
    ("Pleural effusions are improbable.", {"pleural_effusion": "negative"}),
    ("Pneumonia is not favored.", {"pneumonia": "negative"}),
    ("Pneumothorax not favoured.", {"pneumothorax": "negative"}),
    ("Pneumonia is not likely.", {"pneumonia": "negative"}),
    ("Pneumonia or edema is unlikely.", {"pneumonia": "negative", "edema": "negative"}),
    ("Pneumonia less likely.", {"pneumonia": "uncertain"}),
    ("Atelectasis is less likely.", {"atelectasis": "uncertain"}),
    # ... and where those words are not about the finding before them
    ("Atelectasis, unlikely pneumonia.", {"atelectasis": "positive", "pneumonia": "negative"}),
    # a bare hedge after a list item is about that item, not the one before it (the atelectasis was negated)
    ("Opacity, atelectasis, pneumonia unlikely.",
     {"lung_opacity": "positive", "atelectasis": "positive", "pneumonia": "negative"}),
    ("Effusion, pneumonia doubtful.", {"pleural_effusion": "positive", "pneumonia": "negative"}),
    ("Pneumonia, unlikely.", {"pneumonia": "negative"}),
    ("Atelectasis or less likely pneumonia.", {"atelectasis": "positive", "pneumonia": "uncertain"}),
    ("Left lower lobe opacity, likely atelectasis, pneumonia less likely.",
     {"lung_opacity": "positive", "atelectasis": "uncertain", "pneumonia": "uncertain"}),
    ("Small nodule of doubtful significance.", {"nodule": "positive"}),
    # a hedge about what follows the finding, not the finding ("... is unlikely to be X")
    ("The opacity is not likely to be pneumonia.", {"lung_opacity": "positive", "pneumonia": "negative"}),
    ("Right lower lobe opacity is unlikely to represent pneumonia, more likely atelectasis.",
     {"lung_opacity": "positive", "pneumonia": "negative", "atelectasis": "uncertain"}),
    ("The nodule is unlikely to be malignant.", {"nodule": "positive"}),
    ("Small left pleural effusion is unlikely to be clinically significant.", {"pleural_effusion": "positive"}),
    ("The pneumothorax is unlikely to require a chest tube.",
     {"pneumothorax": "positive", "support_devices": "positive"}),
    ("Contusion - no history of trauma, and unlikely with enhancing soft tissue mass", {"mass": "positive"}),
    # ... and hedges about the finding that the clause goes on to qualify
    ("Pneumonia is unlikely in this patient.", {"pneumonia": "negative"}),
    ("Pneumothorax is unlikely given the absence of a pleural line.", {"pneumothorax": "negative"}),
    ("A pleural effusion is unlikely to be present.", {"pleural_effusion": "negative"}),
    ("Unlikely small effusion.", {"pleural_effusion": "negative"}),
    # a hedge after the finding about its cause, nature or consequence leaves it stated (all read as uncertain) ...
    ("The pneumothorax may be due to the recent biopsy.", {"pneumothorax": "positive"}),
    ("Pneumothorax is likely iatrogenic.", {"pneumothorax": "positive"}),
    ("Large effusion, which may represent hemothorax.", {"pleural_effusion": "positive"}),
    ("Left base opacity may represent atelectasis.", {"lung_opacity": "positive", "atelectasis": "uncertain"}),
    # ... but not one about the finding itself, nor one going on to name the same finding
    ("Pneumonia is likely.", {"pneumonia": "uncertain"}),
    ("Atelectasis may also be present.", {"atelectasis": "uncertain"}),
    ("Left basilar opacity may be artifactual.", {"lung_opacity": "uncertain"}),  # the finding doubted
    ("Mild cardiomegaly may be positional.", {"cardiomegaly": "uncertain"}),
    ("Blunting of the right costophrenic angle, which may represent a small effusion.",
     {"pleural_effusion": "uncertain"}),
    # an item starting with a hedge after a comma ends a negated list
    ("No effusion, possible atelectasis.", {"pleural_effusion": "negative", "atelectasis": "uncertain"}),
    ("No pneumothorax, likely atelectasis.", {"pneumothorax": "negative", "atelectasis": "uncertain"}),
    ("No pneumonia, more likely atelectasis.", {"pneumonia": "negative", "atelectasis": "uncertain"}),
    ("No findings suggesting pneumonia.", {"pneumonia": "negative"}),
])
def test_labeller_reads_negation_uncertainty_and_synonyms(labeller, sentence, expected):
    assert dict(labeller.sentence_labels(sentence)) == expected


@pytest.mark.parametrize("sentence, expected", [
    ("Pneumothorax has not resolved.", {"pneumothorax": "positive"}),
    ("The pneumothorax is not resolved.", {"pneumothorax": "positive"}),
    ("Effusion has not cleared.", {"pleural_effusion": "positive"}),
    ("No resolution of the pneumonia.", {"pneumonia": "positive"}),
    ("Pneumonia: not resolved.", {"pneumonia": "positive"}),
    ("Effusion is not absent.", {"pleural_effusion": "positive"}),
    ("Could not exclude pneumonia.", {"pneumonia": "uncertain"}),
    ("Does not exclude pneumonia.", {"pneumonia": "uncertain"}),
    ("Would not exclude early pneumonia.", {"pneumonia": "uncertain"}),
    ("Does not rule out pneumonia.", {"pneumonia": "uncertain"}),
    ("Pneumonia can't be ruled out.", {"pneumonia": "uncertain"}),
    ("The pneumothorax has not been excluded.", {"pneumothorax": "uncertain"}),
    ("The pneumothorax has resolved.", {"pneumothorax": "negative"}),  # the plain negations stay
    ("Pneumonia is excluded.", {"pneumonia": "negative"}),
])
def test_a_negated_resolution_or_exclusion_is_not_a_negation(labeller, sentence, expected):
    """"has not resolved", "not cleared", "no resolution of", "not absent" read as negations (the bare "resolved",
    "cleared", "absent", "no"), and "does / could / would not exclude", "does not rule out", "can't be ruled out",
    "has not been excluded" as well (the bare "not"): a persisting pneumothorax was labelled absent and the study
    normal. They are pseudo-negations and negated uncertainty now."""
    assert dict(labeller.sentence_labels(sentence)) == expected


@pytest.mark.parametrize("sentence, expected", [
    ("There is no pleural effusion, and the heart is enlarged.",
     {"pleural_effusion": "negative", "cardiomegaly": "positive"}),
    ("The lungs are clear without effusion and the heart is enlarged.",
     {"pleural_effusion": "negative", "cardiomegaly": "positive"}),
    ("No pneumothorax and the cardiac silhouette is enlarged.",
     {"pneumothorax": "negative", "cardiomegaly": "positive"}),
    ("No effusion, and a large pneumothorax is present.", {"pleural_effusion": "negative", "pneumothorax": "positive"}),
    ("No effusion, and large pneumothorax.", {"pleural_effusion": "negative", "pneumothorax": "positive"}),
    # negated lists stay negated, with a verb after the last item and an Oxford comma
    ("No pneumothorax, pleural effusion, and consolidation are seen.",
     {"pneumothorax": "negative", "pleural_effusion": "negative", "consolidation": "negative"}),
    ("No focal consolidation, pneumothorax or pleural effusion is identified.",
     {"consolidation": "negative", "pneumothorax": "negative", "pleural_effusion": "negative"}),
    ("No pneumothorax and pleural effusion are seen.", {"pneumothorax": "negative", "pleural_effusion": "negative"}),
])
def test_a_negation_does_not_reach_a_finding_stated_in_the_next_clause(labeller, sentence, expected):
    """The list rule looked only at the text between the cue and the mention: in "No effusion, and a large
    pneumothorax is present" the pneumothorax was negative and the study normal. A mention after ", and" joined to
    the cue's one item, or after ", and the" / "and the" (a, an) in an item holding a verb, is a new clause."""
    assert dict(labeller.sentence_labels(sentence)) == expected


def test_a_long_sentence_without_full_stops_is_labelled_like_its_short_parts(labeller):
    """Cues further than any list can reach (MAX_REACH words) are not looked at: one 1,750-word 'sentence' took
    46 s (every cue against every mention, each re-reading the text between), now about 0.5 s; the statuses
    are those of the short sentence, and a cue still reaches the end of the longest list."""
    short = "no focal consolidation pleural effusion or pneumothorax"
    assert labeller.label(" ".join([short] * 250)) == labeller.label(short)
    items = ", ".join(["small bilateral apical pleural thickening here"] * (MAX_REACH // 6 - 1))
    assert dict(labeller.sentence_labels(f"No {items} or pneumothorax.")) == {"pneumothorax": "negative"}


def test_a_negation_covers_a_list_of_more_than_eight_items(labeller):
    """A list past eight items fell out of the negation's reach: in a normal report's "No pneumonia, ..., mass,
    fracture or emphysema." the fracture and the emphysema were read as present."""
    items = "pneumonia, consolidation, edema, atelectasis, effusion, pneumothorax, nodule, mass, fracture or emphysema"
    labels = labeller.label(f"No {items}.")
    assert len(labels) == 11 and labels.pop("no_finding") == "positive" and set(labels.values()) == {"negative"}


def test_report_labels_add_normality_and_skip_the_indication(labeller):
    assert labeller.label("INDICATION: rule out pneumonia. FINDINGS: No pneumothorax. Heart size is normal.") == \
        {"pneumothorax": "negative", "no_finding": "positive"}
    assert labeller.label("IMPRESSION: 1. Cardiomegaly. 2. Possible right pleural effusion.") == \
        {"cardiomegaly": "positive", "pleural_effusion": "uncertain", "no_finding": "negative"}
    assert labeller.positives("Endotracheal tube in place. No acute process.") == {"support_devices", "no_finding"}
    assert labeller.label("") == {}
    sections = [s.section for s in labeller.sentences("FINDINGS: Small effusion. IMPRESSION: Effusion.")]
    assert sections == ["findings", "impression"]


def test_sentences_keep_decimals_and_drop_list_numbers():
    assert split_sentences("Ratio of about 0.57. 1. Cardiomegaly. 2. Effusion.") == \
        ["Ratio of about 0.57.", "Cardiomegaly.", "Effusion."]


def test_an_abbreviations_full_stop_does_not_end_the_sentence(labeller):
    """Every full stop before a space ended a sentence: "Atelectasis vs." was one sentence and "pneumonia." the
    next, so the hedge "vs" did not reach the pneumonia (read as present)."""
    assert split_sentences("Discussed with Dr. J. Smith today. Atelectasis vs. pneumonia. Nodule (e.g. granuloma), "
                           "approx. 5 mm, cf. prior. Tube no. 5 in place. Pneumothorax: no. 2. Effusion.") == \
        ["Discussed with Dr. J. Smith today.", "Atelectasis vs. pneumonia.",
         "Nodule (e.g. granuloma), approx. 5 mm, cf. prior.", "Tube no. 5 in place.", "Pneumothorax: no.", "Effusion."]
    assert labeller.label("Atelectasis vs. pneumonia.") == \
        {"atelectasis": "uncertain", "pneumonia": "uncertain", "no_finding": "negative"}


def test_a_report_with_one_finding_per_line_and_no_full_stops_is_read_line_by_line(labeller):
    """A single line break did not end a sentence, so the 'no' of one line negated the next line's finding: a
    large pneumothorax was labelled absent and the study normal. A line break before a capitalised word now ends
    the sentence, unless the line before ends in a comma or a word asking for more (hard-wrapped lines)."""
    assert labeller.label("No pleural effusion\nLarge right pneumothorax") == \
        {"pleural_effusion": "negative", "pneumothorax": "positive", "no_finding": "negative"}
    report = "FINDINGS:\nNo pleural effusion\r\nLarge right pneumothorax\nIMPRESSION:\nRight pneumothorax"
    assert [(s.text, s.findings) for s in labeller.sentences(report)] == [
        ("No pleural effusion", {"pleural_effusion": "negative"}),
        ("Large right pneumothorax", {"pneumothorax": "positive"}),
        ("Right pneumothorax", {"pneumothorax": "positive"})]
    assert split_sentences("There is no focal consolidation, pleural\neffusion or pneumothorax. Compared with "
                           "the\nPA view, no\nPneumothorax") == \
        ["There is no focal consolidation, pleural effusion or pneumothorax.", "Compared with the PA view, no "
         "Pneumothorax"]


def phantom_truth(record, knowledge) -> set[str]:
    return {knowledge.resolve(c) for c in LABEL_COLUMNS if record.labels[c] == "1"}


def test_labeller_recovers_the_phantom_ground_truth(labeller, phantom_dir, tmp_path):
    multi = tmp_path / "multi"
    generate_phantom(multi, n=60, seed=5, size=32, extra_finding_prob=0.6)
    records = list(load_dataset(phantom_dir)) + list(load_dataset(multi))
    assert sum(len(phantom_truth(r, labeller.knowledge)) > 1 for r in records) > 10
    vocabulary = set(FINDINGS)
    agree = [phantom_truth(r, labeller.knowledge) == labeller.positives(r.text) & vocabulary for r in records]
    assert np.mean(agree) == 1.0


def test_knowledge_base_covers_the_phantom_and_common_chest_findings():
    knowledge = load_knowledge()
    for name in (*FINDINGS, "atelectasis", "edema", "mass", "pneumonia", "support_devices"):
        assert name in knowledge and knowledge[name].definition
    assert knowledge.normal == "no_finding" and "support_devices" not in knowledge.abnormal
    assert knowledge.resolve("effusion_left") == knowledge.resolve("Pleural Effusion") == "pleural_effusion"
    assert knowledge.resolve("finding") is None


def test_a_user_folder_adds_and_replaces_findings(tmp_path):
    (tmp_path / "pleural_plaque.md").write_text(NEW_FINDING)
    (tmp_path / "nodule.md").write_text("---\nname: nodule\nsynonyms: [granuloma]\n---\n")
    knowledge = load_knowledge(tmp_path)
    assert knowledge["pleural_plaque"].notes == "Added by a user." and knowledge.resolve("plaques") == "pleural_plaque"
    assert knowledge["nodule"].synonyms == ["granuloma"] and "cardiomegaly" in knowledge
    labeller = ReportLabeller(knowledge)
    assert labeller.label("Calcified plaque along the left pleura. No granulomas.") == \
        {"pleural_plaque": "positive", "nodule": "negative", "no_finding": "negative"}
    alone = load_knowledge(tmp_path, builtin=False)
    assert alone.names == ["nodule", "pleural_plaque"] and alone.normal is None
    # a drafted report shows an entry's file name, never the folders above it (they may name anyone)
    assert knowledge.cards(["pleural_plaque"])[0]["source"] == "pleural_plaque.md"
    assert knowledge["pleural_plaque"].path == str(tmp_path / "pleural_plaque.md")  # kept for messages


@pytest.mark.parametrize("text, message", [
    ("name: x\nsynonyms: [x]\n", "front matter"),
    ("---\nname: Bad Name\nsynonyms: [x]\n---\n", "'name'"),
    ("---\nname: x\nsynonyms: [x]\ncolour: red\n---\n", "unknown fields"),
    ("---\nname: x\n---\n", "'synonyms'"),
    ("---\nname: x\nsynonyms: ['... x']\n---\n", "only between words"),
    ("---\nname: x\nsynonyms: [x\n---\n", "not valid YAML"),
    ("---\nname: x\nsynonyms: [x]\nsigns: [y]\n---\n", "'signs' phrase 'y' is not one of the 'synonyms'"),
])
def test_malformed_finding_files_name_the_file_and_problem(tmp_path, text, message):
    (tmp_path / "x.md").write_text(text)
    with pytest.raises(DataError, match=message) as caught:
        load_knowledge(tmp_path)
    assert "x.md" in str(caught.value)


def test_a_second_normal_entry_is_refused_naming_its_file(tmp_path):
    """The error named no file (every other knowledge error does), so a user could not tell which one to fix."""
    (tmp_path / "n.md").write_text("---\nname: normal2\nkind: normal\nsynonyms: [all normal]\n---\n")
    with pytest.raises(DataError, match="a second 'normal' entry") as caught:
        load_knowledge(tmp_path)
    assert caught.value.path == str(tmp_path / "n.md") and "no_finding" in str(caught.value)
    result, output = invoke("report", "knowledge", "--knowledge", tmp_path)
    assert result.exit_code == 2 and "n.md: a second 'normal' entry" in " ".join(output.split())


def test_a_phrase_in_another_script_is_refused_saying_why(tmp_path):
    """A Chinese or Cyrillic synonym was refused as "must have words", which it has: the limit is the script."""
    for phrase in ("胸腔积液", "плевральный выпот"):
        (tmp_path / "x.md").write_text(f"---\nname: x\nsynonyms: [{phrase}]\n---\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"has no Latin letters or digits: only English \(Latin-script\)"):
            load_knowledge(tmp_path)
    (tmp_path / "x.md").write_text("---\nname: x\nsynonyms: [épanchement pleural]\n---\n", encoding="utf-8")
    assert load_knowledge(tmp_path)["x"].synonyms == ["épanchement pleural"]


def test_a_field_given_twice_is_refused_naming_the_file_and_field(tmp_path):
    """YAML keeps the last of two equal keys: a second 'synonyms' list dropped the first without a word."""
    (tmp_path / "d.md").write_text("---\nname: dupkeys\nsynonyms: [alpha]\nsynonyms: [beta]\n---\n")
    with pytest.raises(DataError, match=r"field 'synonyms' is given twice in the front matter \(line 3\)") as caught:
        load_knowledge(tmp_path)
    assert caught.value.path == str(tmp_path / "d.md")
    result, output = invoke("report", "knowledge", "--knowledge", tmp_path, "--finding", "dupkeys")
    assert result.exit_code == 2 and "d.md: field 'synonyms' is given twice" in " ".join(output.split())


def test_replacing_the_normal_entry_with_a_finding_is_refused(tmp_path):
    """A user's no_finding.md without 'kind: normal' replaced the shipped normal entry by an abnormal finding:
    "No acute disease." then made a study abnormal, and drafts of normal studies abstained. A replacement of
    another kind is refused naming the file; with 'kind: normal' it replaces the entry."""
    entry = "---\nname: no_finding\ntitle: No finding\n{}synonyms: [no acute disease]\n---\n"
    (tmp_path / "no_finding.md").write_text(entry.format(""))
    with pytest.raises(DataError, match="replaces the entry 'no_finding' of kind normal \\(no_finding.md\\) with "
                                        "kind finding; write 'kind: normal'") as caught:
        load_knowledge(tmp_path)
    assert caught.value.path == str(tmp_path / "no_finding.md")
    result, output = invoke("report", "knowledge", "--knowledge", tmp_path)
    assert result.exit_code == 2 and "no_finding.md: replaces the entry" in " ".join(output.split())
    (tmp_path / "no_finding.md").write_text(entry.format("kind: normal\n"))
    knowledge = load_knowledge(tmp_path)
    assert knowledge.normal == "no_finding" and "no_finding" not in knowledge.abnormal
    assert ReportLabeller(knowledge).label("Heart normal. No acute disease.") == {"no_finding": "positive"}


@pytest.mark.parametrize("options, message", [
    (["-k", "-3"], "-k needs --query"),
    (["--model", "nowhere"], "--model needs --query"),
    (["--finding", "nodule", "--query", "fluid"], "--finding and --query cannot be combined"),
])
def test_knowledge_command_refuses_options_it_would_ignore(options, message):
    """-k and --model without --query, and --query beside --finding, were ignored with exit 0."""
    result, output = invoke("report", "knowledge", *options)
    assert result.exit_code == 2 and message in output and "Traceback" not in output


def test_knowledge_command_lists_user_findings_and_rejects_a_missing_folder(tmp_path):
    (tmp_path / "pleural_plaque.md").write_text(NEW_FINDING)
    result, output = invoke("report", "knowledge", "--knowledge", tmp_path)
    assert result.exit_code == 0 and "pleural_plaque" in output and "cardiomegaly" in output
    shown, output = invoke("report", "knowledge", "--finding", "effusion_left")
    assert shown.exit_code == 0 and "Pleural effusion" in output
    missing, output = invoke("report", "knowledge", "--knowledge", tmp_path / "nope")
    assert missing.exit_code == 2 and "knowledge folder not found" in output
    (tmp_path / "notes").mkdir()  # a wrong folder, e.g. the dataset's: it added nothing without a word
    (tmp_path / "notes" / "README.txt").write_text("not a finding")
    empty, output = invoke("report", "knowledge", "--knowledge", tmp_path / "notes")
    assert empty.exit_code == 2 and "no finding files (*.md with YAML front matter) in this knowledge folder" in \
        " ".join(output.split())


def _entry(folder, name: str, synonym: str, title: str = "") -> None:
    (folder / f"{name}.md").write_text(f"---\nname: {name}\n{f'title: {title}' if title else ''}\n"
                                       f"synonyms: [heart, {synonym}]\n---\n")


def test_knowledge_phrases_longer_than_the_text_encoder_reads_are_refused_naming_file_and_entry(model_dir, tmp_path,
                                                                                                caplog):
    """Review finding: a title or synonym was embedded cut to what the text tower reads, without a word, so two entries
    differing only past the cut got identical vectors ('--related' scored them alike), and a 5000-word title was
    accepted and printed whole; a query text of that length was refused."""
    model = load_model(model_dir)
    limit = model.text_read_length("x")[1]
    # cut only in the longer prompt templates ("impression: ..."): read whole alone, so logged, not refused
    (tmp_path / "near").mkdir()
    words = next(n for n in range(1, 200) if model.text_read_length("impression: " + "heart " * n + ".")[0] > limit)
    _entry(tmp_path / "near", "entry_c", "heart " * words)
    assert model.text_read_length("heart " * words + ".")[0] <= limit
    with caplog.at_level("WARNING", logger="medvl.rag.knowledge"):
        assert len(load_knowledge(tmp_path / "near", builtin=False).retrieve(model, "heart", k=1)) == 1
    assert "1 knowledge-base phrase(s)" in caplog.text and "entry_c.md entry 'entry_c': synonym 2" in caplog.text
    long_phrase = "effusion " * 120
    _entry(tmp_path, "entry_a", long_phrase + "cardiomegaly")
    _entry(tmp_path, "entry_b", long_phrase + "pneumothorax")
    base = load_knowledge(tmp_path, builtin=False)
    with pytest.raises(DataError, match=rf"entry_a\.md: entry 'entry_a': synonym 2 is \d+ tokens long as a prompt; "
                                        rf"the model's text encoder reads {limit} tokens at most") as caught:
        base.retrieve(model, "cardiomegaly", k=2)
    assert "effusion" not in str(caught.value)
    result, output = invoke("report", "knowledge", "--knowledge", tmp_path, "--no-builtin-knowledge",
                            "--query", "cardiomegaly", "--model", model_dir)
    assert result.exit_code == 2 and "entry_a.md: entry 'entry_a': synonym 2 is" in " ".join(output.split())
    assert "effusion" not in output and "Traceback" not in output
    _entry(tmp_path, "entry_d", "heart", title="Cardiomegaly " * 20)  # 259 characters once spaces are collapsed
    with pytest.raises(DataError, match=r"entry_d\.md: 'title' is 259 characters long; at most 200"):
        load_knowledge(tmp_path, builtin=False)


# ------------------------------------------------------------------ drafts from given neighbours


def case_hit(case_id: str, score: float, text: str) -> Hit:
    """A neighbour of its own case (``case_id``): reports of several cases may be worded alike."""
    return Hit(id=case_id, score=score, split="train", meta={"case_id": case_id}, text=text)


def hits_of(records, scores=None) -> list[Hit]:
    scores = scores or [0.9] * len(records)
    return [Hit(id=r.id, score=s, split=r.split, labels=dict(r.labels), text=r.text)
            for r, s in zip(records, scores, strict=True)]


@pytest.fixture(scope="module")
def by_finding(phantom_dir):
    groups: dict[str, list] = {}
    for record in load_dataset(phantom_dir):
        groups.setdefault(record.labels["finding"], []).append(record)
    return groups


def test_draft_states_the_consensus_and_cites_the_cases_it_came_from(labeller, by_finding):
    records = by_finding["cardiomegaly"][:4] + by_finding["nodule"][:1]
    hits = hits_of(records)
    draft = draft_from_hits(hits, labeller)
    assert not draft.abstained and draft.consensus["cardiomegaly"] == "positive"
    assert labeller.positives(draft.text()) >= {"cardiomegaly"} and "nodule" not in labeller.positives(draft.text())
    cardiac = {r.id for r in by_finding["cardiomegaly"]}
    for sentence in draft.sentences:
        assert sentence.cases and set(sentence.cases) <= {h.id for h in hits}
        assert set(sentence.wording_from) <= set(sentence.cases) and 0 < sentence.support <= 1
        if sentence.findings.get("cardiomegaly") == "positive":
            assert set(sentence.cases) <= cardiac
            assert any(sentence.text in (r.text or "") for r in records if r.id in sentence.wording_from)
    assert [s.support for s in draft.sentences if s.section == "findings"] == \
        sorted((s.support for s in draft.sentences if s.section == "findings"), reverse=True)
    assert [card["name"] for card in draft.definitions] == ["cardiomegaly"]
    assert draft.text().startswith("FINDINGS: ") and "IMPRESSION: " in draft.text()
    json.dumps(draft.to_dict())


def test_a_finding_sentence_carries_its_consensus_share_and_the_draft_says_its_rule(labeller):
    """A sentence asserting a finding is kept because the finding is the consensus, not because its own support is
    above min_support: "measuring 5 mm", stated by 2 of the 4 nodule reports (41 % of the weight), was drafted
    beside a caption saying every sentence is stated by more than half of the cases. Each sentence now carries its
    findings' consensus shares, and the draft its rule in one line."""
    reports = [*[f"FINDINGS: Pulmonary nodule in the left middle zone, measuring {size} mm. IMPRESSION: Left middle "
                 "zone pulmonary nodule." for size in (5, 7, 9)],
               "FINDINGS: Pulmonary nodule in the left middle zone. IMPRESSION: Left middle zone pulmonary nodule.",
               "FINDINGS: The heart size is normal. The lungs are clear."]
    hits = [case_hit(f"case{i}", score, text=text)
            for i, (text, score) in enumerate(zip(reports, [0.95, 0.9, 0.85, 0.8, 0.8], strict=True))]
    draft = draft_from_hits(hits, labeller, min_support=0.5)
    share = {f.name: f.support[f.consensus] for f in draft.findings if f.consensus}
    measured = [s for s in draft.sentences if "5 mm" in s.text]
    assert measured and measured[0].support < 0.5 < share["nodule"]
    for sentence in draft.sentences:
        assert sentence.consensus == {name: share[name] for name in sentence.findings}
    data = draft.to_dict()
    assert data["sentences"][0]["consensus"] == {"nodule": share["nodule"]}
    assert data["rule"].startswith("A sentence stating findings is kept when each finding's status is the consensus: "
                                   "more than 50.0% of the cases (weighted by similarity) state it. Its support")
    assert "A sentence stating no finding is kept when more than 50.0%" in data["rule"]
    assert "more than 70.0%" in draft_from_hits(hits, labeller, min_support=0.7).to_dict()["rule"]


def test_draft_does_not_mix_sides(labeller, by_finding):
    records = by_finding["pleural_effusion"][:8]
    assert len({r.labels["effusion_left"] for r in records}) == 2
    draft = draft_from_hits(hits_of(records), labeller)
    sides = {side for s in draft.sentences if "pleural_effusion" in s.findings
             for side in ("left", "right") if side in s.text.lower()}
    assert not draft.abstained and len(sides) == 1
    # three left effusions (one saying the right lung is clear), two right ones saying the left lung is clear
    reports = ["FINDINGS: Large left pleural effusion. The right lung is clear. IMPRESSION: Left pleural effusion.",
               *["FINDINGS: Moderate left pleural effusion. IMPRESSION: Left pleural effusion."] * 2,
               *["FINDINGS: Large right pleural effusion. The left lung is clear. IMPRESSION: Right effusion."] * 2]
    hits = [case_hit(f"case{i}", 0.9, text=text) for i, text in enumerate(reports)]
    text = draft_from_hits(hits, labeller).text().lower()
    assert "left pleural effusion" in text and "right pleural effusion" not in text
    assert "left lung is clear" not in text


def test_findings_and_impression_name_the_same_zone_and_size(labeller):
    """Two neighbours put the consolidation in the right upper zone, two in the middle zone, and the nearest's
    impression says middle where its findings say upper (as real reports do). The detail vote runs over every
    sentence asserting the finding, each neighbour once, so both sections name one zone (a vote within each
    section would say upper in the findings, middle in the impression); sizes likewise."""
    reports = ["FINDINGS: Consolidation in the right upper zone. IMPRESSION: Right middle zone consolidation.",
               "FINDINGS: Consolidation in the right upper zone. IMPRESSION: No pleural effusion.",
               *["FINDINGS: Consolidation in the right middle zone. IMPRESSION: Right middle zone consolidation."] * 2]
    hits = [case_hit(f"case{i}", s, text=text)
            for i, (text, s) in enumerate(zip(reports, [0.95, 0.9, 0.8, 0.8], strict=True))]
    draft = draft_from_hits(hits, labeller)
    stated = [s for s in draft.sentences if "consolidation" in s.findings]
    assert {s.section for s in stated} == {"findings", "impression"}
    zones = {zone for s in stated for zone in ("upper", "middle") if zone in s.text.lower()}
    assert zones == {"middle"}  # 0.95 + 0.8 + 0.8 of the weight name it, 0.95 + 0.9 the upper zone
    nodules = ["FINDINGS: A 14 mm nodule in the left upper zone. IMPRESSION: Left upper zone nodule (14 mm).",
               "FINDINGS: A 14 mm nodule in the left upper zone. IMPRESSION: Left upper zone nodule.",
               *["FINDINGS: A 8 mm nodule in the left upper zone. IMPRESSION: Left upper zone nodule (8 mm)."] * 2]
    hits = [case_hit(f"case{i}", s, text=text)
            for i, (text, s) in enumerate(zip(nodules, [0.95, 0.9, 0.8, 0.8], strict=True))]
    text = draft_from_hits(hits, labeller).text()
    assert "14 mm" in text and "8 mm" not in text


def test_a_tied_detail_is_not_drafted_and_an_opposite_side_is_not_a_source_of_the_wording(labeller):
    """An even split on a side or a size used to be settled alphabetically ("left" over "right", "14 mm" over
    "8 mm"), and the right-sided reports were listed as sources of "Left pleural effusion". A tie (vote and
    nearest similarity) now leaves the detail out: a wording without it is drafted, or none."""
    def draft(texts, scores):
        return draft_from_hits([case_hit(f"c{i}", score, text=text)
                                for i, (text, score) in enumerate(zip(texts, scores, strict=True))], labeller)

    sides = ["Right pleural effusion.", "Left pleural effusion."]
    tied = draft(sides * 2, [0.95] * 4)  # the effusion is the consensus: not drafted, so an abstention
    assert tied.sentences == [] and tied.abstention == NO_WORDING and "pleural_effusion" in tied.reason
    assert draft(["Nodule measuring 14 mm.", "Nodule measuring 8 mm."] * 2, [0.9] * 4).abstention == NO_WORDING
    assert draft([*sides, "Pleural effusion."], [0.9] * 3).text() == "FINDINGS: Pleural effusion."
    nearer = draft([*sides, "No pneumothorax."], [0.95, 0.9, 0.8])  # no tie: the nearer case's side
    assert nearer.text() == "FINDINGS: Right pleural effusion." and nearer.sentences[0].wording_from == ["c0"]
    majority = draft(["Left pleural effusion."] * 3 + ["Small right pleural effusion."], [0.9, 0.9, 0.9, 0.95])
    assert majority.text() == "FINDINGS: Left pleural effusion."
    assert majority.sentences[0].wording_from == ["c0", "c1", "c2"]  # c3 says right: neither cited nor a source
    assert majority.sentences[0].cases == ["c0", "c1", "c2"]


def region_hits(regions: list[str | None], text: str) -> list[Hit]:
    """One neighbour per case, each with ``text`` as its report and ``regions[i]`` as its MedPix-style
    ``location_category`` (None: no region named)."""
    return [Hit(id=f"case{i}", score=0.9, split="train", text=text, meta={"case_id": f"case{i}"},
                labels={} if region is None else {"location_category": region}) for i, region in enumerate(regions)]


def test_a_draft_from_cases_of_another_body_region_attaches_no_chest_definition(labeller):
    """The shipped entries are chest X-ray findings: the "mass" that head CT reports state is no "Lung mass: a
    pulmonary opacity". A definition is attached where the cases name no region (IU X-ray) or their region is the
    entry's; not where they are of another region or of several without a majority."""
    text = "There is a large mass in the left frontal lobe."
    head = draft_from_hits(region_hits(["Head"] * 4 + [None], text), labeller)
    assert not head.abstained and head.consensus["mass"] == "positive"
    assert head.definitions == [] and head.settings["region"] == "head" and head.settings["out_of_scope"] == ["mass"]
    for regions, region in ((["Thorax"] * 3 + ["Head"], "chest"), ([None] * 4, None)):
        draft = draft_from_hits(region_hits(regions, text), labeller)
        assert [card["name"] for card in draft.definitions] == ["mass"], regions
        assert draft.settings["region"] == region and draft.settings["out_of_scope"] == []
    mixed = draft_from_hits(region_hits(["Head", "Head", "Thorax", "Thorax"], text), labeller)
    assert mixed.definitions == [] and mixed.settings["region"] == "" and mixed.settings["out_of_scope"] == ["mass"]
    # a DICOM's Body Part Examined is read as well, synonyms folded
    dicom = [Hit(id=f"c{i}", score=0.9, split="train", text=text, meta={"case_id": f"c{i}", "body_part": "CHEST"})
             for i in range(4)]
    assert draft_from_hits(dicom, labeller).settings["region"] == "chest"
    # an entry of the user's without a scope applies to any region
    knowledge = load_knowledge()
    knowledge["mass"].scope = []
    anywhere = draft_from_hits(region_hits(["Head"] * 4, text), ReportLabeller(knowledge))
    assert [card["name"] for card in anywhere.definitions] == ["mass"]


def test_report_draft_command_says_why_a_drafted_finding_has_no_definition(labeller):
    from medvl.cli.common import console
    from medvl.cli.report import print_draft

    draft = draft_from_hits(region_hits(["Head"] * 4, "There is a large mass in the left frontal lobe."), labeller)
    with console.capture() as captured:
        print_draft(draft)
    shown = " ".join(captured.get().split())
    assert "no definition shown for mass: the knowledge base's entries are written for another body region and " \
           "these cases are of the head" in shown and "pulmonary opacity" not in shown


def test_an_entrys_scope_is_read_with_region_synonyms_folded(tmp_path):
    (tmp_path / "lesion.md").write_text("---\nname: lesion\nsynonyms: [lesion]\nscope: [Thorax, Brain]\n---\n")
    base = load_knowledge(tmp_path)
    assert base["lesion"].scope == ["chest", "head"] and base["mass"].scope == ["chest"]
    assert base.in_scope("lesion", "head") and base.in_scope("lesion", None) and not base.in_scope("mass", "head")
    assert region_key("Chest, Pulmonary") == region_key("LUNG") == "chest"
    assert case_region({"location_category": "Spine and Muscles"}) == "spine_and_muscles"
    assert case_region({}, {"body_part": " "}) is None


def test_related_entries_are_those_written_for_the_cases_region(model_dir, tmp_path):
    from medvl.models.registry import load_model

    (tmp_path / "lesion.md").write_text("---\nname: lesion\nsynonyms: [lesion]\n---\n")
    base, model = load_knowledge(tmp_path), load_model(model_dir)
    assert [f.name for f, _ in base.retrieve(model, "mass", k=3, region="head")] == ["lesion"]
    assert len(base.retrieve(model, "mass", k=3, region="chest")) == 3
    assert len(base.retrieve(model, "mass", k=3)) == 3


def test_draft_abstains_when_neighbours_disagree_or_are_far(labeller, by_finding):
    mixed = by_finding["cardiomegaly"][:2] + by_finding["nodule"][:2] + by_finding["pneumothorax"][:2]
    disagree = draft_from_hits(hits_of(mixed), labeller)
    assert disagree.abstained and disagree.abstention == DISAGREE and not disagree.sentences
    assert "disagree" in disagree.reason and not disagree.text()
    far = draft_from_hits(hits_of(by_finding["cardiomegaly"][:4], [0.3, 0.2, 0.2, 0.1]), labeller)
    assert far.abstained and far.abstention == FAR and "0.300" in far.reason
    assert draft_from_hits([], labeller).abstention == NO_CASES
    with pytest.raises(InputError, match="min_support"):
        draft_from_hits(hits_of(mixed), labeller, min_support=1.5)


def test_far_abstention_shows_the_threshold_as_given_and_a_true_inequality(labeller):
    """The reason rounded both sides to 3 decimals: --min-similarity 0.9999 read "1.000", and a similarity of
    0.9995 gave "1.000 < 1.000"."""
    def reason(score, threshold):
        hit = case_hit("c0", score, text="Large left pleural effusion.")
        return draft_from_hits([hit], labeller, min_similarity=threshold).reason

    assert reason(0.9995, 0.9999).endswith("similarity 0.9995 < 0.9999 (min_similarity)")
    assert reason(0.97, 0.9999).endswith("similarity 0.970 < 0.9999 (min_similarity)")
    assert reason(0.3, 0.5).endswith("similarity 0.300 < 0.5 (min_similarity)")


def test_min_support_below_a_majority_is_refused(labeller, phantom_dir, train_index):
    """With min_support 0.3 the first status above it in a fixed order (positive) was the consensus, not the
    largest: an effusion negated by 60 % of the neighbours was drafted, with 'no finding' positive beside it.
    A consensus is a weighted majority: below 0.5 is refused (library, CLI; the service calls the same check)."""
    reports = ["Large left pleural effusion.", *["No pleural effusion. Lungs clear."] * 3,
               "Small left pleural effusion."]
    hits = [case_hit(f"c{i}", 0.9, text=text) for i, text in enumerate(reports)]
    draft = draft_from_hits(hits, labeller)
    assert draft.consensus == {"no_finding": "positive", "pleural_effusion": "negative"}
    assert "No pleural effusion" in draft.text()
    for low in (0.3, 0.0, 0.4999):
        with pytest.raises(InputError, match=r"min_support must be >= 0\.5"):
            draft_from_hits(hits, labeller, min_support=low)
    image = load_dataset(phantom_dir).select("test")[0].image
    result, output = invoke("report", "draft", image, "--index", train_index, "--min-support", 0.3)
    assert result.exit_code == 2 and "--min-support must be >= 0.5" in output and "Traceback" not in output


def test_a_draft_carries_no_dates_or_names_of_a_minority_of_neighbours(labeller):
    """Sentences that differ only in a date or a doctor's name used to be one wording group: the draft then
    carried one neighbour's date and doctor (another patient's) and cited every neighbour for them. A number
    other than a measurement, or a name after a title, is drafted only when neighbours holding over min_support
    of the weight name it."""
    dates, doctors = ["12 March 2019", "14 April 2020", "2 May 2021"], ["Smith", "Jones", "Evans"]
    reports = [f"FINDINGS: Right pleural effusion. Compared with the radiograph of {date}, unchanged. Findings "
               f"discussed with Dr {doctor} by telephone. Two views (PA and lateral) of the chest. IMPRESSION: "
               f"Right pleural effusion, new since {date}." for date, doctor in zip(dates, doctors, strict=True)]
    hits = [case_hit(f"case{i}", 0.9, text=text) for i, text in enumerate(reports)]
    draft = draft_from_hits(hits, labeller)
    text = draft.text()
    assert not draft.abstained and "Right pleural effusion" in text and "Two views (PA and lateral)" in text
    assert not re.search(r"\d", text) and not any(name in text for name in doctors), text
    assert draft.consensus["pleural_effusion"] == "positive"
    # a name after a title, or where a person is named, is never stated either, however many neighbours share it
    # (it used to be once three neighbours holding a majority of the weight named the same doctor), nor a date
    shared = [reports[0]] * 3 + [reports[0].replace("Smith", "Jones")]
    hits = [case_hit(f"case{i}", 0.9, text=text) for i, text in enumerate(shared)]
    text = draft_from_hits(hits, labeller).text()
    assert "Right pleural effusion" in text and "Two views (PA and lateral)" in text, text
    assert "Smith" not in text and "Jones" not in text and "discussed" not in text, text
    assert not re.search(r"\d|March", text), text
    notified = [f"FINDINGS: Right pleural effusion. Frank Stone was notified. Two views of the chest. {extra}"
                for extra in ("", "Stable.", "Unchanged.", "No pneumothorax.")]
    hits = [case_hit(f"case{i}", 0.9, text=text) for i, text in enumerate(notified)]
    text = draft_from_hits(hits, labeller).text()
    assert "Right pleural effusion" in text and "Stone" not in text and "notified" not in text, text
    # measurements are details put to their own vote (above), not identifiers
    assert _identifiers("A 14 mm nodule and a 1.5 cm mass, seen by Dr. O'Brien on 3/4/2021.") == \
        {"3", "4", "2021", "name:o'brien"}


def test_a_consensus_finding_stated_only_beside_findings_without_consensus_is_an_abstention(labeller):
    """Two of three neighbours state cardiomegaly, each in one sentence with a finding only that neighbour has. Such
    sentences are never drafted, and the cardiomegaly was dropped without a word: an empty draft that did not
    abstain (beside other sentences, a draft without the consensus finding). It is now a ``no_wording``
    abstention naming the finding; with a sentence of its own, the finding is drafted."""
    texts = ["Cardiomegaly with a pleural effusion.", "Cardiomegaly and atelectasis.",
             "Heart size is normal. No pneumothorax."]
    draft = draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                            labeller)
    assert draft.consensus["cardiomegaly"] == "positive" and "pleural_effusion" not in draft.consensus
    assert draft.abstained and draft.abstention == NO_WORDING and draft.text() == ""
    assert draft.reason == ("every wording of cardiomegaly also states a finding the neighbours do not agree on: "
                            "nothing to draft it from")
    texts[1] = "Cardiomegaly and atelectasis. The heart is enlarged."
    drafted = draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                              labeller)
    assert not drafted.abstained and labeller.label(drafted.text()).get("cardiomegaly") == "positive"
    assert "effusion" not in drafted.text() and "atelectasis" not in drafted.text()


def test_a_consensus_finding_whose_every_wording_names_a_minority_date_is_an_abstention(labeller):
    """Each neighbour's only effusion sentence names its own date: all were left out, and the draft came back
    empty but not abstained (text '', the effusion's definition attached, exit 0), the finding silently gone."""
    texts = [f"Right pleural effusion, new since the study of {day}." for day in ("March 3rd", "June 5th", "Dec 9th")]
    draft = draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                            labeller)
    assert draft.consensus["pleural_effusion"] == "positive"
    assert draft.abstained and draft.abstention == NO_WORDING and draft.text() == "" and not draft.definitions
    assert draft.reason == ("every wording of pleural_effusion names a date, a long number, or a number, name or word "
                            "that fewer than 3 of the neighbours or a minority of the weight use (maybe another "
                            "patient's): nothing to draft it from")
    # a wording without the date, in any section, still drafts the finding
    texts[2] += " IMPRESSION: Right pleural effusion."
    drafted = draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                              labeller)
    assert not drafted.abstained and drafted.text() == "IMPRESSION: Right pleural effusion."


def test_a_draft_keeping_no_sentence_is_an_abstention(labeller):
    """Neighbours whose reports state no finding (clinical histories) each count as normal, so "no finding" was the
    consensus, yet no sentence was stated by a majority: the draft came back empty, not abstained (text '', exit 0),
    reading as normal without one neighbour saying so. It is now a ``no_wording`` abstention."""
    texts = ["Post-intubation in the critical care setting.", "Labeled covid19.", "Patient with fever and cough.",
             "Large left pleural effusion."]
    draft = draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                            labeller)
    assert draft.consensus == {"no_finding": "positive"} and draft.sentences == []
    assert draft.abstained and draft.abstention == NO_WORDING and draft.text() == ""
    assert draft.reason.startswith("no sentence of the nearest cases' reports is stated by more than 0.50")
    assert draft.to_dict()["abstained"] is True


def test_sentences_in_another_script_are_split_and_are_not_all_one_wording(labeller):
    """Full-width stops did not end a sentence, and two sentences without Latin words had Jaccard 1.0: one
    neighbour's "left lung clear" (in Chinese) was drafted and every neighbour cited as having that wording."""
    assert split_sentences("左肺清晰。右肺清晰！心脏大小正常？ Large effusion.") == \
        ["左肺清晰。", "右肺清晰！", "心脏大小正常？", "Large effusion."]
    assert jaccard("左肺清晰。", "右肺清晰。") == 0.0 and jaccard("左肺清晰。", "左肺清晰。") == 1.0
    assert jaccard("Левое лёгкое чистое.", "Левое лёгкое чистое.") == 1.0
    assert jaccard("Левое лёгкое чистое.", "Сердце не увеличено.") == 0.0
    texts = ["左肺清晰。 Large left pleural effusion.", "右肺清晰。 Large left pleural effusion.",
             "心脏大小正常。 Large left pleural effusion."]
    draft = draft_from_hits([case_hit(i, 0.9, text=t) for i, t in zip("abc", texts, strict=True)],
                            labeller)
    assert [(s.text, s.cases, s.wording_from) for s in draft.sentences] == \
        [("Large left pleural effusion.", ["a", "b", "c"], ["a", "b", "c"])]
    shared = draft_from_hits([case_hit(i, 0.9, text=t) for i, t in zip("abc", [
        "左肺清晰。 Large left pleural effusion.", "FINDINGS: 左肺清晰。 Large left pleural effusion.",
        "左肺清晰。 Large left pleural effusion. IMPRESSION: Large left pleural effusion."], strict=True)], labeller)
    assert shared.text().startswith("FINDINGS: 左肺清晰。 Large left pleural effusion.")  # shared: drafted, any script


def test_a_draft_carries_no_name_after_a_title_with_a_full_stop(labeller):
    """"Dr." ended a sentence, so the name started the next one ("Nakamura by telephone ..."), where neither a title
    nor a capitalised word in mid-sentence stood before it: one neighbour's doctor was drafted, cited to all."""
    names = ("Kowalczyk", "Okonkwo", "Nakamura", "Haddad", "Lindqvist")
    texts = [f"FINDINGS: Small left pleural effusion. Findings were discussed with Dr. {name} by telephone at the "
             f"time of dictation." for name in names]
    draft = draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                            labeller)
    assert draft.text() == "FINDINGS: Small left pleural effusion."


def test_a_draft_carries_no_month_or_untitled_name_of_a_minority_of_neighbours(labeller):
    """Only digits and a word after a title were identifiers: one neighbour's "since the study of December" or
    "the referring clinician Peter Brown" was drafted and cited to every neighbour, each naming another month
    or person. Month and weekday names, and two or more capitalised words in a row used in lower case by no
    neighbour's report and absent from the knowledge base, are identifiers now; one such word alone is not (a
    term: "Hounsfield units")."""
    def draft(texts):
        return draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                               labeller)

    months = [f"Right pleural effusion. Compared with the study of {m}, unchanged." for m in ("March", "June",
                                                                                               "December")]
    assert draft(months).text() == "FINDINGS: Right pleural effusion."
    tail = "Findings were discussed by telephone with the referring clinician {} at the end of the examination."
    named = ["Right pleural effusion. " + tail.format(n) for n in ("John Smith", "Mary Jones", "Peter Brown")]
    assert draft(named).text() == "FINDINGS: Right pleural effusion."
    # a month is a date: never drafted, however many neighbours name it
    assert draft([months[2]] * 4).text() == "FINDINGS: Right pleural effusion."
    # nor a name, however many neighbours share it (three used to be enough)
    assert draft([named[0]] * 3 + [named[1]]).text() == "FINDINGS: Right pleural effusion."
    # a title written in capitals is no title, nor is the word after one when it is not a capitalised name
    for text in ("MR imaging shows a mass.", "MS plaques in the white matter.", "The nurse noted a rash.",
                 "Discussed with the doctor and nurse.", "MR FLAIR images are normal."):
        assert _identifiers(text) == frozenset(), text
    assert _identifiers("Seen by Dr.Smith and Mrs O'Brien.") == {"name:smith", "name:o'brien"}
    mr = ["Right pleural effusion. MR imaging shows a small mass in the right lobe."] * 3
    assert "MR imaging shows" in draft(mr).text()  # "MR imaging" named no one: drafted when shared
    # roles and services in capitals name no one either ("The" starting the sentence is no part of a name)
    for told in ("Findings discussed with Referring Physician.", "The Referring Physician was notified.",
                 "Report sent to Emergency Department."):
        assert _identifiers(told) == frozenset(), told
        # three different reports (a word outside the vocabulary counts by report texts: one text under three
        # images may be one patient's)
        worded = [f"Right pleural effusion. {told}", f"{told} Right pleural effusion.",
                  f"FINDINGS: Right pleural effusion. {told}"]
        assert told in draft(worded).text(), told
        assert told not in draft([worded[0]] * 3).text(), told
    common = common_words(labeller.knowledge, ["the lungs are clear, may be atelectasis"])
    assert _identifiers("Seen by Mary O'Brien and Dr McDonald on Monday, since Dec 9 and 5 May.", common) == \
        {"9", "5", "name:mary", "name:o'brien", "name:mcdonald", "date:monday", "date:dec", "date:may"}
    for text in ("Comparison with PA and AP views: Lungs Clear.", "There may be a Small Pleural Effusion.",
                 "No change; Right lower lobe atelectasis.", "There are T-spine osteophytes.",
                 "Testicle Ultrasound \u2022 Well-circumscribed, heterogeneously hypoechoic mass.",
                 "Attenuation of minus twenty Hounsfield units.", "CXR (AP Portable): mediastinal mass."):
        assert _identifiers(text, common) == frozenset(), text


def test_a_draft_carries_no_identifier_of_one_or_two_neighbours_whatever_k_and_the_weights(labeller, phantom_dir,
                                                                                           train_index):
    """An identifier needed only neighbours holding over min_support of the weight: with -k 1 or 2, or one
    neighbour holding most of the weight (the others' similarity <= 0), that neighbour's date, accession number
    and doctor were drafted, and a name in lower case was never an identifier. Now a date or a long number is
    never drafted, and a number, a name or any word outside the vocabulary only when at least 3 neighbours use
    it; k below 3 is refused, fewer than 3 reports abstain."""
    doctors = ["Kowalczyk", "Okonkwo", "Nakamura", "Haddad", "Lindqvist", "Ferreira", "Moreau", "Novak", "Schulz",
               "Rossi"]
    texts = [f"FINDINGS: Small left pleural effusion, unchanged since the study of {i + 1:02d}/12/2019. Accession "
             f"88{i}2345. Discussed with Dr {name} by telephone. Reviewed with {name.lower()} at the time of "
             "dictation. IMPRESSION: Small left pleural effusion." for i, name in enumerate(doctors)]
    hits = [case_hit(f"c{i}", 0.9 if i == 0 else -0.1, text=t) for i, t in enumerate(texts)]
    draft = draft_from_hits(hits, labeller)  # c0 holds all the weight
    assert draft.neighbours[0].weight == 1.0
    assert draft.text() == "IMPRESSION: Small left pleural effusion.", draft.text()
    assert draft_from_hits(hits[:3], labeller).text() == "IMPRESSION: Small left pleural effusion."
    few = draft_from_hits(hits[:2], labeller)
    assert few.abstention == FEW_REPORTS and not few.text()
    assert few.reason == ("only 2 of the nearest cases have reports; a draft needs at least 3, as it states a word, "
                          "number or name only when 3 of them use it")
    for k in (1, 2):
        with pytest.raises(InputError, match=f"^k must be >= 3, got {k}: a draft states a word outside"):
            check_settings(k, 0.5, 0.5)
    image = load_dataset(phantom_dir).select("test")[0].image
    result, output = invoke("report", "draft", image, "--index", train_index, "-k", 2)
    assert result.exit_code == 2 and "--k must be >= 3, got 2" in output and "Traceback" not in output


def test_ordinary_report_words_of_one_or_two_neighbours_are_drafted_and_a_name_is_not(labeller):
    """A word outside the knowledge base's and labeller's vocabulary needed 3 neighbours' reports: ordinary words
    ("streaky", "bibasilar", "unchanged", "unremarkable") used by two of them dropped the fuller wording (on IU
    X-ray 12 of 411 drafts abstained for want of one). Words of the shipped list of report words are drafted
    from any number of neighbours; a word outside it still needs 3 (a name in lower case)."""
    def draft(texts):
        return draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                               labeller).text()

    fuller = "Streaky bibasilar atelectasis, unchanged."
    assert draft([fuller, fuller, "Bibasilar atelectasis is seen."]) == f"FINDINGS: {fuller}"
    named = "Bibasilar atelectasis, reviewed with nakamura."
    assert draft([named, named, "Atelectasis."]) == "FINDINGS: Atelectasis."
    assert {"streaky", "bibasilar", "unchanged", "unremarkable", "osseous", "tortuous"} <= report_words()
    assert not report_words() & {"january", "may", "monday", "yesterday", "smith", "white", "nakamura"}


def test_a_name_made_of_ordinary_words_is_not_drafted_nor_its_wording_credited_to_other_names(labeller):
    """Surnames that are also words ("Stone", "Frank", "Good", "Gross", "Colon") were in the list of ordinary report
    words, and a name was an identifier only after a title or as two capitalised words in mid-sentence: "Frank Stone
    was notified ..." (sentence start) and "Results discussed with Good ..." (one word) were drafted from one
    neighbour, every neighbour (each naming someone else) listed as a source of the wording. Those words are out of
    the list, and a capitalised word where a person is named (after "discussed with", "notified", ..., before "was
    notified", ..., after a title) is a name whatever the word."""
    def draft(texts, scores=None):
        scores = scores or [0.9] * len(texts)
        return draft_from_hits([case_hit(f"c{i}", s, text=t)
                                for i, (t, s) in enumerate(zip(texts, scores, strict=True))], labeller)

    effusion = "FINDINGS: Small left pleural effusion."
    notified = effusion + " {} was notified of the findings by telephone at the end of the examination."
    people = ["Frank Stone", "Mary Glass", "Peter Gross", "Anna Good", "Lena Colon"]
    assert draft([notified.format(n) for n in people]).text() == effusion
    discussed = effusion + " Results discussed with {} by telephone at the end of the examination."
    surnames = ["Stone", "Glass", "Gross", "Good", "Frank"]
    for nearest in range(len(surnames)):  # whichever neighbour weighs most
        scores = [0.95 if i == nearest else 0.9 for i in range(len(surnames))]
        assert draft([discussed.format(n) for n in surnames], scores).text() == effusion
    # nor a name three neighbours share (it was drafted)
    assert draft([discussed.format("Good")] * 3 + [discussed.format("Stone")]).text() == effusion
    assert _identifiers("Frank Stone was notified.") == {"name:frank", "name:stone"}
    assert _identifiers("Findings were discussed with Dr. J. Small and called to Ray Good.") == \
        {"name:small", "name:ray", "name:good"}
    for text in ("The referring physician was notified.", "Patient was informed of the results.",
                 "Results were called to Radiology.", "Referring Physician was notified.",
                 "Findings were discussed with the patient.", "Large left pleural effusion, as discussed below."):
        assert _identifiers(text) == frozenset(), text
    common_names = {"stone", "frank", "glass", "gross", "good", "colon", "bill", "mark", "rose", "may", "young", "king",
                    "hill", "wood", "green", "white", "brown", "black", "long", "little", "hall", "bell", "moody"}
    assert not report_words() & common_names


def test_a_sentence_cites_only_the_cases_stating_its_side_and_size(labeller):
    """Sentences were grouped by finding alone: "Small left pleural effusion." cited all ten neighbours with
    support 1.0, five of them saying "Large right pleural effusion." A sentence now cites the members naming no
    other side, size, zone or measurement (one naming none still agrees), and its support is their weight."""
    texts = ["Small left pleural effusion."] * 5 + ["Large right pleural effusion."] * 4 + ["Pleural effusion."]
    scores = [0.9] * 5 + [0.89] * 4 + [0.9]
    draft = draft_from_hits([case_hit(f"c{i}", s, text=t)
                             for i, (t, s) in enumerate(zip(texts, scores, strict=True))], labeller)
    [sentence] = draft.sentences
    assert sentence.text == "Small left pleural effusion."
    assert sentence.cases == ["c0", "c1", "c2", "c3", "c4", "c9"]
    assert sentence.wording_from == sentence.cases
    assert sentence.support == pytest.approx(round(6 * 0.9 / (6 * 0.9 + 4 * 0.89), 4))
    assert draft.consensus["pleural_effusion"] == "positive"  # the finding itself: all ten state it


def test_a_draft_carries_no_name_after_dr_without_a_space_nor_a_name_with_accented_letters(labeller):
    """A title's name needed a space after "Dr." and ASCII letters, and a capitalised word ASCII letters: "Dr.Novak"
    and "the referring clinician Renée Dubois" were drafted from one neighbour, cited to all, and "Dr Müller" and
    "Dr Mäkinen" were one identifier ("m")."""
    def draft(texts):
        return draft_from_hits([case_hit(f"c{i}", 0.9, text=t) for i, t in enumerate(texts)],
                               labeller).text()

    tail = "Findings were discussed with {} by telephone at the time of dictation."
    titled = [f"Small left pleural effusion. {tail.format('Dr.' + n)}" for n in ("Novak", "Rossi", "Haddad")]
    assert draft(titled) == "FINDINGS: Small left pleural effusion."
    accented = [f"Small left pleural effusion. {tail.format('the referring clinician ' + n)}"
                for n in ("Renée Dubois", "Jürgen Müller", "Łukasz Żuk")]
    assert draft(accented) == "FINDINGS: Small left pleural effusion."
    assert _identifiers("Seen by Dr Müller.") == {"name:müller"} != _identifiers("Seen by Dr Mäkinen.")
    assert _identifiers("Seen by Dr. J. Smith and Ólafur Jónsson.") == {"name:smith", "name:ólafur", "name:jónsson"}


def test_wording_similarity_ignores_numbers_and_stop_words():
    assert jaccard("A 6 mm nodule in the left upper zone.", "A 11 mm nodule in the left upper zone.") == 1.0
    assert jaccard("Left pleural effusion.", "Right pleural effusion.") == pytest.approx(0.5)


# ------------------------------------------------------------------ drafts and evaluation over a real index


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rag") / "model"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def train_index(phantom_dir, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rag-index") / "idx"
    build_index(load_model(model_dir), load_dataset(phantom_dir).select("train"), out, model_dir=model_dir,
                show_progress=False)
    return out


def test_draft_report_cites_indexed_cases_and_leaves_out_the_query(phantom_dir, model_dir, train_index):
    model, record = load_model(model_dir), load_dataset(phantom_dir).select("train")[0]
    with open_index(train_index) as index:
        draft = draft_report(index, model, record.image, k=8, min_support=0.5, min_similarity=0.0,
                             exclude=[record.id], related=3)
        ids = {n.id for n in draft.neighbours}
        assert len(ids) == 8 and record.id not in ids and index.existing_ids(list(ids)) == ids
        for sentence in draft.sentences:
            assert set(sentence.cases) <= ids
        assert len(draft.related) == 3 and {"name", "definition", "score"} <= set(draft.related[0])
        far = draft_report(index, model, load_dataset(phantom_dir).select("test")[0].image, min_similarity=1.0)
        assert far.abstained and far.abstention == FAR
        assert far.settings["left_out_copies"] == []  # a test image is not in the index


def test_a_blank_image_gets_no_draft_and_says_why(model_dir, train_index, tmp_path):
    """A uniform image is near some indexed case too (min_similarity 0 would let any through): no retrieval."""
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 40, np.uint8)).save(blank)
    with open_index(train_index) as index:
        draft = draft_report(index, load_model(model_dir), blank, k=5, min_similarity=0.0)
    assert draft.abstained and draft.abstention == "no_content" and not draft.neighbours and not draft.sentences
    assert draft.reason.startswith("the image is blank as the model sees it, nothing to draft from (0.0 grey levels")
    assert list(draft.settings["input_flags"]) == ["blank"]
    result, output = invoke("report", "draft", blank, "--index", train_index, "--min-similarity", 0)
    assert result.exit_code == 0 and "No draft:" in output and "blank as the model sees it" in " ".join(output.split())


def test_a_draft_for_an_indexed_image_leaves_its_own_report_out(phantom_dir, model_dir, train_index, tmp_path):
    """Without ``exclude``: the same pixels under another name (a copy) are found by their hash."""
    from PIL import Image

    model, record = load_model(model_dir), load_dataset(phantom_dir).select("train")[3]
    copy = tmp_path / "copy.png"
    Image.open(record.image).save(copy)  # other file, same pixels
    with open_index(train_index) as index:
        draft = draft_report(index, model, copy, k=5, min_similarity=0.0)
        plain = draft_report(index, model, copy, k=5, min_similarity=0.0, exclude=[record.id])
    assert draft.settings["left_out_copies"] == [record.id] and record.id not in {n.id for n in draft.neighbours}
    assert [n.id for n in draft.neighbours] == [n.id for n in plain.neighbours]  # as if excluded by hand
    result, output = invoke("report", "draft", copy, "--index", train_index, "--min-similarity", 0)
    assert result.exit_code == 0 and f"the query image is indexed as {record.id}" in " ".join(output.split())


def test_a_grey_film_re_saved_as_rgb_is_left_out_as_its_original(phantom_dir, model_dir, train_index, tmp_path):
    """An RGB re-save of an indexed grey film (as many viewers and PACS exports write one) is the same picture to the
    model: hashed as the model reads its channels, it is left out of its own draft as the original is (it was cited
    as its own nearest case, at similarity 1.000)."""
    from PIL import Image

    model, record = load_model(model_dir), load_dataset(phantom_dir).select("train")[3]
    rgb = tmp_path / "rgb.png"
    Image.open(record.image).convert("RGB").save(rgb)
    assert read_image(rgb).shape == (*read_image(record.image).shape, 3)
    with open_index(train_index) as index:
        draft = draft_report(index, model, rgb, k=5, min_similarity=0.0)
        original = draft_report(index, model, record.image, k=5, min_similarity=0.0)
    assert draft.settings["left_out_copies"] == [record.id] and record.id not in {n.id for n in draft.neighbours}
    assert [n.id for n in draft.neighbours] == [n.id for n in original.neighbours]
    result, output = invoke("report", "draft", rgb, "--index", train_index, "--min-similarity", 0)
    assert result.exit_code == 0 and f"the query image is indexed as {record.id}" in " ".join(output.split())


@pytest.fixture(scope="module")
def rgb_index(phantom_dir, model_dir, tmp_path_factory):
    """The first 12 training films, the first re-saved as RGB in place (three equal channels: the same picture)."""
    import csv

    from PIL import Image

    folder = tmp_path_factory.mktemp("rgb") / "data"
    (folder / "images").mkdir(parents=True)
    rows = [row for row in csv.DictReader((phantom_dir / "manifest.csv").open(newline="")) if row["split"] == "train"]
    rows = rows[:12]
    for row in rows:
        shutil.copyfile(phantom_dir / row["image"], folder / row["image"])
    Image.open(phantom_dir / rows[0]["image"]).convert("RGB").save(folder / rows[0]["image"])
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder, phantom_dir / rows[0]["image"]


def _stored_hashes(index_dir) -> dict[str, str]:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(index_dir / "cases.sqlite")) as conn:
        return dict(conn.execute("SELECT id, image_sha256 FROM cases"))


def test_an_index_holds_an_rgb_film_under_its_grey_hash_and_older_indexes_still_match(model_dir, rgb_index,
                                                                                       tmp_path):
    """A new index records an RGB film with equal channels under the hash of its grey channel (a draft of the grey
    original leaves it out), a grey film under the hash older indexes record (their files are unchanged). An index
    built before (the RGB film under the hash of its three channels, ``array_sha256``) keeps working: the RGB file is
    still its own copy, its stored path still resolves, and ``index add`` of the same data leaves every case as is."""
    import sqlite3
    from contextlib import closing

    from medvl.index import add_records, resolve_image
    from medvl.index.cases import array_sha256

    folder, grey = rgb_index
    dataset, model = load_dataset(folder), load_model(model_dir)
    first = dataset[0]
    out = tmp_path / "idx"
    build_index(model, dataset, out, model_dir=model_dir, show_progress=False)
    stored = _stored_hashes(out)
    assert stored[first.id] == array_sha256(read_image(grey)) != array_sha256(read_image(first.image))
    assert all(stored[r.id] == array_sha256(read_image(r.image)) for r in dataset if r.id != first.id)
    with open_index(out) as index:
        draft = draft_report(index, model, grey, k=3, min_similarity=0.0)
    assert draft.settings["left_out_copies"] == [first.id]
    with closing(sqlite3.connect(out / "cases.sqlite")) as conn, conn:  # as medvl recorded it before
        conn.execute("UPDATE cases SET image_sha256 = ? WHERE id = ?", (array_sha256(read_image(first.image)),
                                                                          first.id))
    with open_index(out) as index:
        draft = draft_report(index, model, first.image, k=3, min_similarity=0.0)
        [hit] = index.search(model.encode_images([first.image]).numpy(), k=1)[0]
        assert hit.id == first.id and resolve_image(hit, folder).samefile(first.image)  # no ImageChanged
        added = add_records(index, model, dataset, show_progress=False)
    assert draft.settings["left_out_copies"] == [first.id]
    assert added["already_present"] == len(dataset) and added["added"] == 0 and added["replaced"] == 0


def test_an_older_index_holding_an_rgb_film_knows_its_grey_original_and_its_copies(model_dir, rgb_index, tmp_path):
    """An index built before hashes were taken of the model's channels holds a grey film saved as RGB under the hash
    of its three channels: a draft of the grey original still leaves that case out as a copy, and ``index add`` of
    the grey original or an opaque RGBA copy under other ids skips them as duplicates, as the older code did."""
    import csv
    import sqlite3
    from contextlib import closing

    from PIL import Image

    from medvl.index import add_records
    from medvl.index.cases import array_sha256

    folder, grey = rgb_index
    dataset, model = load_dataset(folder), load_model(model_dir)
    first = dataset[0]
    out = tmp_path / "idx"
    build_index(model, dataset, out, model_dir=model_dir, show_progress=False)
    with closing(sqlite3.connect(out / "cases.sqlite")) as conn, conn:  # as medvl recorded it before
        conn.execute("UPDATE cases SET image_sha256 = ? WHERE id = ?", (array_sha256(read_image(first.image)),
                                                                          first.id))
    with open_index(out) as index:
        draft = draft_report(index, model, grey, k=3, min_similarity=0.0)
    assert draft.settings["left_out_copies"] == [first.id]
    copies = tmp_path / "copies"
    (copies / "images").mkdir(parents=True)
    shutil.copyfile(grey, copies / "images" / "grey.png")
    Image.open(grey).convert("RGBA").save(copies / "images" / "rgba.png")
    with (folder / "manifest.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    with (copies / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerows([{**row, "image": "images/grey.png"}, {**row, "image": "images/rgba.png"}])
    with open_index(out) as index:
        added = add_records(index, model, load_dataset(copies), show_progress=False)
    assert added["added"] == 0 and {d["duplicate_of"] for d in added["duplicates"]} == {first.id}
    assert len(added["duplicates"]) == 2


def test_a_new_index_is_read_without_the_hashes_older_indexes_took(model_dir, rgb_index):
    """A build (a new index) records each image under its ``pixel_sha256`` only: its reads skip the other hashes an
    older index may hold a grey film under (its RGB and RGBA copies, up to seven times the bytes to hash), which
    ``index add`` still looks duplicates up by; the recorded hash is the same either way."""
    from medvl.index.build import read_batch, read_new_batch

    folder, _ = rgb_index
    dataset, model = load_dataset(folder), load_model(model_dir)
    records = list(dataset)[:4]  # the RGB film and three grey ones
    digests, pixels, others = read_batch(model.preprocessor, records)
    new_digests, new_pixels, new_others = read_new_batch(model.preprocessor, records)
    assert new_digests == digests and np.array_equal(new_pixels, pixels)
    assert new_others == [()] * 4 and all(len(hashes) >= 2 for hashes in others)


def test_report_draft_command_prints_and_writes_json(phantom_dir, model_dir, train_index, tmp_path):
    image = load_dataset(phantom_dir).select("test")[0].image
    result, output = invoke("report", "draft", image, "--index", train_index, "--model", model_dir, "-k", 6,
                            "--min-similarity", 0, "--related", 2, "--json", tmp_path / "draft.json")
    assert result.exit_code == 0, output
    assert "nearest cases" in output and "weighted shares" in output
    saved = json.loads((tmp_path / "draft.json").read_text())
    assert len(saved["neighbours"]) == 6 and saved["image"] == image.name and len(saved["related"]) == 2
    assert "knowledge entries closest to the image" in output
    assert saved["abstained"] or (saved["text"] and all(s["cases"] for s in saved["sentences"]))
    far, output = invoke("report", "draft", image, "--index", train_index, "--min-similarity", 1.0)
    assert far.exit_code == 0 and "No draft" in output and "too far" in output
    nothing, output = invoke("report", "draft", image, "--index", train_index, "--where", "age < 0")
    assert nothing.exit_code == 0 and "no similar case to draft from" in output
    assert "nothing passes the filter" in " ".join(output.split())
    assert "similarity nan" not in output and "weighted shares" not in output  # no NaN, no empty findings table


def test_report_draft_rejects_bad_input(phantom_dir, model_dir, train_index, tmp_path):
    image = load_dataset(phantom_dir).select("test")[0].image
    missing, output = invoke("report", "draft", tmp_path / "nope.png", "--index", train_index)
    assert missing.exit_code == 2 and "file not found" in output
    torch.manual_seed(1)
    create_model("phantom-tiny").save_pretrained(tmp_path / "other")
    other, output = invoke("report", "draft", image, "--index", train_index, "--model", tmp_path / "other")
    assert other.exit_code == 2 and "weights differ from the weights the index was built with" in output
    bad_k, output = invoke("report", "draft", image, "--index", train_index, "-k", 0)
    assert bad_k.exit_code == 2 and "k must be" in output
    from pydicom.data import get_testdata_file

    frames = tmp_path / "frames.dcm"  # 2 frames of RGB: no 2D model takes it; the error names the file (not <array>)
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), frames)
    shape, output = invoke("report", "draft", frames, "--index", train_index)
    assert shape.exit_code == 2 and ("frames.dcm: a multi-frame DICOM of 2 frames (shape (2, 100, 100, 3)): a 2D "
                                     "model reads one image") in " ".join(output.split())


def test_case_retrieval_metrics_match_plain_references(phantom_dir, model_dir, train_index):
    model, data = load_model(model_dir), load_dataset(phantom_dir)
    queries = data.select("test")
    with open_index(train_index) as index:
        result = case_retrieval(index, model, queries, k=5, show_progress=False)
        cases = index.search(model.encode_images([queries[0].image]).numpy(), k=len(index))[0]
    train = data.select("train")
    prior = {c: sum(r.labels["finding"] == c for r in train) / len(train) for c in FINDINGS}
    assert result["prior_sum_p2"] == pytest.approx(sum(p * p for p in prior.values()))
    assert result["precision_at_k_baseline"] == pytest.approx(np.mean([prior[r.labels["finding"]] for r in queries]))
    # reference precision@5 from a full matrix of the model's own embeddings
    query_vectors = model.encode_images([r.image for r in queries]).numpy()
    gallery = model.encode_images([r.image for r in train]).numpy()
    order = np.argsort(-(query_vectors @ gallery.T), axis=1, kind="stable")[:, :5]
    expected = np.mean([[train[j].labels["finding"] == r.labels["finding"] for j in row]
                        for r, row in zip(queries, order, strict=True)])
    assert result["precision_at_k"] == pytest.approx(expected, abs=0.03)  # ties among near-equal scores aside
    assert result["jaccard_at_k"] == pytest.approx(result["precision_at_k"])  # one categorical column
    assert len(cases) == len(train) == result["n_index"] and result["excluded_self"] == 0
    assert result["draft"]["reference"] == "labels" and set(result["draft"]["vocabulary"]) == set(FINDINGS)
    assert result["labeller_vs_labels"]["exact_match"] == 1.0
    assert result["knowledge_retrieval"]["n"] == len(queries) and 0 <= result["knowledge_retrieval"]["top1"] <= 1
    for key in ("precision_at_k", "map", "jaccard_at_k", "map_baseline"):
        assert 0.0 <= result[key] <= 1.0
    for key in ("micro_f1", "abstention_rate"):
        assert 0.0 <= result["draft"][key] <= 1.0
    assert 0.0 <= result["nearest_report"]["micro_f1"] <= 1.0


def test_case_retrieval_leaves_out_the_query_itself(phantom_dir, model_dir, train_index):
    model, train = load_model(model_dir), load_dataset(phantom_dir).select("train")
    with open_index(train_index) as index:
        result = case_retrieval(index, model, train, k=3, label_columns=["cardiomegaly", "effusion_left"],
                                show_progress=False)
    assert result["excluded_self"] == len(train) and result["n_index"] == len(train)
    assert result["label_columns"] == ["cardiomegaly", "effusion_left"]
    assert result["draft"]["vocabulary"] == ["cardiomegaly", "pleural_effusion"]
    assert set(result["label_sets"]) <= {"(none)", "cardiomegaly", "effusion_left"}


def test_case_retrieval_keeps_cases_of_another_dataset_that_share_an_id(phantom_dir, model_dir, train_index,
                                                                         tmp_path):
    """Another phantom folder names its cases phantom_00000... too: those ids are other patients, not the
    queries themselves, so nothing is left out (the same folder's queries are, by id and by pixels)."""
    other = tmp_path / "other"
    generate_phantom(other, n=24, seed=11, size=64, progress=False)
    model, queries = load_model(model_dir), load_dataset(other)
    with open_index(train_index) as index:
        assert index.existing_ids([r.id for r in queries])  # the ids do coincide
        result = case_retrieval(index, model, queries, k=3, show_progress=False)
    assert result["excluded_self"] == 0 and result["n_queries"] == len(queries)


def test_case_retrieval_scores_drafts_against_the_queries_own_reports_when_labels_are_not_findings(
        phantom_dir, model_dir, train_index):
    model, test = load_model(model_dir), load_dataset(phantom_dir).select("test")
    with open_index(train_index) as index:
        result = case_retrieval(index, model, test, k=5, label_columns=["sex"], show_progress=False)
    assert result["draft"]["reference"] == "reports" and "labeller_vs_labels" not in result
    assert set(result["label_sets"]) == {"sex=F", "sex=M"} and 0.3 < result["precision_at_k_baseline"] < 0.7
    assert set(FINDINGS) <= set(result["draft"]["vocabulary"])
    labeller = ReportLabeller()  # the references are read by the labeller: how well its base covers them is said
    mentioned = sum(any(s.findings for s in labeller.sentences(r.text)) for r in test)
    assert result["knowledge"]["sources"] == ["built-in"] and result["knowledge"]["references"] == len(test)
    assert result["knowledge"]["reports_without_mention"] == len(test) - mentioned < len(test) / 2


def test_case_retrieval_warns_when_the_knowledge_base_misses_the_findings_of_the_reports(
        phantom_dir, model_dir, train_index, tmp_path, caplog):
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "kidney_cyst.md").write_text("---\nname: kidney_cyst\ntitle: Kidney cyst\nsynonyms: [renal cyst]\n"
                                          "definition: A fluid-filled renal cyst.\n---\n")
    model, test = load_model(model_dir), load_dataset(phantom_dir).select("test")
    with open_index(train_index) as index, caplog.at_level("WARNING"):
        result = case_retrieval(index, model, test, k=5, label_columns=["sex"], show_progress=False,
                                knowledge=load_knowledge(folder, builtin=False))
    assert result["knowledge"]["reports_without_mention"] == len(test)
    assert f"{len(test)} of {len(test)} reference reports mention no finding of the knowledge base (ct)" in caplog.text


def test_eval_case_retrieval_command(phantom_dir, train_index, tmp_path):
    result, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", phantom_dir,
                            "--split", "test", "-k", 5, "--json", tmp_path / "cr.json", "-q")
    assert result.exit_code == 0, output
    assert "precision@5" in output and "class prior" in output and "nearest report" in output
    saved = json.loads((tmp_path / "cr.json").read_text())
    assert 0 <= saved["P@5"] <= 1 and saved["n_queries"] == 19 and saved["split"] == "test"
    assert saved["precision_at_k_baseline"] < 0.5 and saved["draft_micro_f1"] is not None


def test_a_k_above_the_index_size_is_capped_and_said(phantom_dir, model_dir, train_index, tmp_path, caplog):
    """-k 500 on a smaller index was scored as precision over the whole index (the class prior, whatever the
    model) under the label precision@500; it is now capped at the cases each ranking holds, in the row label,
    the JSON (k scored, k_requested) and a warning."""
    model, train = load_model(model_dir), load_dataset(phantom_dir).select("train")
    n_index = len(train)
    with open_index(train_index) as index, caplog.at_level("WARNING", logger="medvl.eval.case_retrieval"):
        own_left_out = case_retrieval(index, model, train, k=n_index, show_progress=False)
        plain = case_retrieval(index, model, train, k=5, show_progress=False)
    assert own_left_out["k"] == n_index - 1 and own_left_out["k_requested"] == n_index
    assert f"scored at k = {n_index - 1}, not {n_index}" in caplog.text
    assert plain["k"] == 5 and "k_requested" not in plain
    out = tmp_path / "cr.json"
    result, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", phantom_dir,
                            "--split", "test", "-k", 500, "--json", out, "-q")
    assert result.exit_code == 0, output
    saved = json.loads(out.read_text())
    assert (saved["k"], saved["k_requested"], saved["n_index"]) == (n_index, 500, n_index)
    assert f"P@{n_index}" in saved and "P@500" not in saved
    flat = " ".join(output.split())  # the row label wraps in its cell
    assert f"precision@{n_index} (same label set," in flat and "-k 500 capped)" in flat
    assert f"Jaccard@{n_index} (label sets, -k 500 capped)" in flat and "precision@500" not in flat
    # --draft-k the same: the drafts were made from fewer cases than the row's "(k=500)" said
    result, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", phantom_dir,
                            "--split", "test", "--draft-k", 500, "--json", out, "-q", "--overwrite")
    assert result.exit_code == 0, output
    draft = json.loads(out.read_text())["draft"]
    assert (draft["k"], draft["k_requested"]) == (n_index, 500)
    flat = " ".join(output.split())  # the row label wraps in its cell
    assert f"draft finding micro F1 (k={n_index}, --draft-k" in flat and "500 capped)" in flat and "k=500" not in flat


def test_eval_case_retrieval_rejects_bad_input(phantom_dir, train_index, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "images" / "phantom_00001.png").unlink()
    missing, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", data, "-q")
    assert missing.exit_code == 2 and "not found" in output
    torch.manual_seed(2)
    create_model("phantom-tiny").save_pretrained(tmp_path / "other")
    other, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", phantom_dir,
                           "--model", tmp_path / "other", "-q")
    assert other.exit_code == 2 and "weights differ from the weights the index was built with" in output
    label, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", phantom_dir,
                           "--label-column", "colour", "-q")
    assert label.exit_code == 2 and "colour" in output
    no_index, output = invoke("eval", "case-retrieval", "--index", tmp_path / "none", "--data", phantom_dir, "-q")
    assert no_index.exit_code == 2 and "Traceback" not in output


def test_case_retrieval_refuses_a_label_column_given_twice(phantom_dir, model_dir, train_index, tmp_path):
    """-l finding -l finding is refused as medvl train refuses it (one line, exit 2, no JSON); it was scored with
    the column compared twice."""
    result, output = invoke("eval", "case-retrieval", "--index", train_index, "--data", phantom_dir, "--split", "test",
                            "-l", "finding", "-l", "sex", "-l", "finding", "--json", tmp_path / "cr.json", "-q")
    assert result.exit_code == 2 and "label column(s) finding given more than once: finding, sex, finding" in output
    assert not (tmp_path / "cr.json").exists()
    with open_index(train_index) as index, pytest.raises(InputError, match="finding given more than once"):
        case_retrieval(index, load_model(model_dir), load_dataset(phantom_dir).select("test"),
                       label_columns=["finding", "finding"], show_progress=False)


# ------------------------------------------------------------------ metric references


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        relevant = rng.random(30) < 0.3
        if not relevant.any():
            continue
        scores = -np.arange(30, dtype=float)  # the ranking order
        assert average_precision(relevant.tolist(), int(relevant.sum())) == \
            pytest.approx(average_precision_score(relevant, scores))


def test_random_average_precision_matches_simulation():
    rng = np.random.default_rng(0)
    n, n_relevant = 12, 4
    simulated = np.mean([average_precision(rng.permutation(n) < n_relevant, n_relevant) for _ in range(20000)])
    assert random_average_precision(n_relevant, n) == pytest.approx(simulated, abs=0.005)
    assert random_average_precision(n, n) == pytest.approx(1.0)


def simulated_average_precision(n_relevant: int, n: int, depth: int, draws: int, seed: int = 0) -> float:
    """The mean AP@depth (denominator min(n_relevant, depth)) of ``draws`` random rankings of ``n`` items."""
    relevant = np.random.default_rng(seed).permuted(np.tile(np.arange(n) < n_relevant, (draws, 1)), axis=1)[:, :depth]
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    return float(np.mean((relevant * precision).sum(axis=1) / min(n_relevant, depth)))


@pytest.mark.parametrize("n_relevant, n, depth", [(4, 12, 3), (4, 12, 8), (9, 40, 5), (30, 140, 10), (5, 20, 20)])
def test_random_average_precision_at_a_depth_matches_simulation(n_relevant, n, depth):
    """The baseline of AP@depth is that of a random ranking cut at the same depth, same denominator."""
    simulated = simulated_average_precision(n_relevant, n, depth, draws=20000)
    assert random_average_precision(n_relevant, n, depth) == pytest.approx(simulated, abs=0.004)
    assert random_average_precision(n_relevant, n, n) == pytest.approx(random_average_precision(n_relevant, n))


def test_case_retrieval_map_baseline_uses_the_map_depth(phantom_dir, model_dir, train_index):
    """With --map-depth below the index size the mAP baseline is a random ranking's AP at that depth (the whole
    index's expected AP is far higher, so a better-than-chance model looked worse than chance)."""
    model, data = load_model(model_dir), load_dataset(phantom_dir)
    queries, train = data.select("test"), data.select("train")
    with open_index(train_index) as index:
        result = case_retrieval(index, model, queries, k=5, label_columns=["finding"], map_depth=5,
                                show_progress=False)
    counts = Counter(r.labels["finding"] for r in train)
    expected = [simulated_average_precision(counts[r.labels["finding"]], len(train), 5, draws=4000, seed=i)
                for i, r in enumerate(queries) if counts[r.labels["finding"]]]
    assert result["map_depth"] == 5 and result["map_queries"] == len(expected)
    assert result["map_baseline"] == pytest.approx(np.mean(expected), abs=0.01)


def test_finding_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    vocabulary = ["a", "b", "c", "d"]
    truth = [{v for v in vocabulary if rng.random() < 0.4} for _ in range(50)]
    predicted = [{v for v in vocabulary if rng.random() < 0.4} for _ in range(50)]
    y_true = np.array([[v in t for v in vocabulary] for t in truth])
    y_pred = np.array([[v in p for v in vocabulary] for p in predicted])
    scores = finding_f1(truth, predicted, vocabulary)
    assert scores["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_label_sets_of_binary_and_categorical_columns():
    labels = {"finding": "nodule", "cardiomegaly": "1", "nodule": "0"}
    assert label_set(labels, ["finding", "cardiomegaly", "nodule"], {"cardiomegaly", "nodule"}) == \
        frozenset({"finding=nodule", "cardiomegaly"})
    sets = [frozenset(c) for n in range(3) for c in combinations("xy", n)]
    assert all(label_set({"x": "1" if "x" in s else "0", "y": "1" if "y" in s else "0"}, ["x", "y"], {"x", "y"})
               == s for s in sets)


@pytest.fixture(scope="module")
def twice_index(phantom_dir, model_dir, tmp_path_factory):
    """The first 24 training films, and the first one again under another name (duplicates allowed)."""
    import csv

    folder = tmp_path_factory.mktemp("twice") / "data"
    (folder / "images").mkdir(parents=True)
    rows = [row for row in csv.DictReader((phantom_dir / "manifest.csv").open(newline="")) if row["split"] == "train"]
    rows = rows[:24]
    for row in rows:
        shutil.copyfile(phantom_dir / row["image"], folder / row["image"])
    rows.append({**rows[0], "image": "images/again.png"})
    shutil.copyfile(phantom_dir / rows[0]["image"], folder / "images" / "again.png")
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = folder.parent / "idx"
    build_index(load_model(model_dir), load_dataset(folder), out, model_dir=model_dir, allow_duplicates=True,
                show_progress=False)
    return folder, out


def test_every_indexed_copy_of_the_query_is_left_out(model_dir, twice_index):
    """An index holding the query's pixels under two ids: neither votes in a draft, nor is retrieved for it."""
    folder, out = twice_index
    dataset = load_dataset(folder)
    first = dataset[0]
    with open_index(out) as index:
        assert index.find_images([pixel_sha256(read_image(first.image))]) == {
            pixel_sha256(read_image(first.image)): sorted([first.id, "images/again"])}
        draft = draft_report(index, load_model(model_dir), first.image, k=3, min_similarity=0.0)
        result = case_retrieval(index, load_model(model_dir), dataset.subset([first]), k=3, label_columns=["finding"],
                                show_progress=False)
    assert draft.settings["left_out_copies"] == sorted([first.id, "images/again"])
    assert not {first.id, "images/again"} & {n.id for n in draft.neighbours}
    assert result["excluded_self"] == 1 and result["n_index"] == 25


def test_case_retrieval_of_indexed_queries_matches_a_brute_force_ranking(model_dir, twice_index):
    """Queries that are themselves indexed: each is left out of its ranking, and so is it (and its copy) out of
    its relevant cases and its baselines; mAP, precision@k and their baselines recomputed by hand."""
    from medvl.eval.case_retrieval import average_precision, random_average_precision

    folder, out = twice_index
    model, dataset = load_model(model_dir), load_dataset(folder)
    with open_index(out) as index:
        result = case_retrieval(index, model, dataset, k=3, label_columns=["finding"], show_progress=False)
    records = list(dataset)
    vectors = model.encode_images([r.image for r in records]).numpy()
    copies = {0, len(records) - 1}  # the first film and its copy
    aps, base_ap, precision, base_precision = [], [], [], []
    for i, record in enumerate(records):
        own = copies if i in copies else {i}
        others = [j for j in np.argsort(-(vectors @ vectors[i]), kind="stable") if j not in own]
        relevant = [records[j].labels["finding"] == record.labels["finding"] for j in others]
        precision.append(np.mean(relevant[:3]))
        base_precision.append(sum(relevant) / len(others))
        if sum(relevant):
            aps.append(average_precision(relevant, sum(relevant)))
            base_ap.append(random_average_precision(sum(relevant), len(others)))
    assert result["excluded_self"] == len(records)
    assert result["map"] == pytest.approx(np.mean(aps), abs=0.02)  # ties among near-equal scores aside
    assert result["precision_at_k"] == pytest.approx(np.mean(precision), abs=0.03)
    assert result["map_baseline"] == pytest.approx(np.mean(base_ap))
    assert result["precision_at_k_baseline"] == pytest.approx(np.mean(base_precision))


@pytest.mark.parametrize("map_depth, scored", [(8, 8), (20, 10)])
def test_case_retrieval_of_an_index_larger_than_one_search_matches_a_brute_force_ranking(
        model_dir, twice_index, monkeypatch, caplog, map_depth, scored):
    """An index larger than one search returns (10,000 cases, lowered here to 12 so that a 25-case index is one):
    mAP still divides by the query's relevant cases in the whole index (capped at the depth), and its baseline
    and the class prior come from the index's own label counts, not from the queries; a depth beyond what one
    search returns is cut to it, warned, and the JSON's ``map_depth`` is the depth scored."""
    import importlib

    monkeypatch.setattr(importlib.import_module("medvl.eval.case_retrieval"), "LIST_MAX", 12)
    folder, out = twice_index
    model, dataset = load_model(model_dir), load_dataset(folder)
    queries = dataset.subset(list(dataset)[:6])  # the first film (indexed twice) and 5 others
    with open_index(out) as index, caplog.at_level("WARNING"):
        result = case_retrieval(index, model, queries, k=3, label_columns=["finding"], map_depth=map_depth,
                                show_progress=False)
    assert result["n_index"] == 25 and result["map_depth"] == scored
    assert ("mAP is scored over the first 10 ranks, not 20" in caplog.text) == (scored != map_depth)
    records = list(dataset)
    vectors = model.encode_images([r.image for r in records]).numpy()
    copies = {0, len(records) - 1}  # the first film and its copy
    aps, base_ap, base_precision = [], [], []
    for i in range(6):
        own = copies if i in copies else {i}
        others = [j for j in np.argsort(-(vectors @ vectors[i]), kind="stable") if j not in own]
        relevant = [records[j].labels["finding"] == records[i].labels["finding"] for j in others]
        base_precision.append(sum(relevant) / len(others))
        if sum(relevant):
            aps.append(average_precision(relevant[:scored], min(sum(relevant), scored)))
            base_ap.append(random_average_precision(sum(relevant), len(others), scored))
    assert result["map"] == pytest.approx(np.mean(aps), abs=0.02)  # ties among near-equal scores aside
    assert result["map_baseline"] == pytest.approx(np.mean(base_ap))
    assert result["precision_at_k_baseline"] == pytest.approx(np.mean(base_precision))
    prior = Counter(r.labels["finding"] for r in records)
    assert result["label_sets"] == {f"finding={c}": n for c, n in prior.items()}


def test_retrieved_context_holds_k_reports_when_the_nearest_cases_mostly_lack_one(phantom_dir, model_dir, tmp_path):
    """The report generator's context (``train report --index``, ``eval report``) fetched k + 32 neighbours once and
    kept those with a report: in an index where most cases hold none (an archive indexed for image search, reports
    attached to some), a query got fewer than k reports while more were indexed, without a word. The search is
    widened until k are found or the index is exhausted; the reports are those of an exhaustive search."""
    import dataclasses

    from medvl.rag.context import _usable, case_key, retrieve_for_records

    dataset = load_dataset(phantom_dir)
    sparse = dataset.subset([record if i % 15 == 0 else dataclasses.replace(record, text=None)
                             for i, record in enumerate(dataset[:60])])  # 4 reports among 60 cases
    model = load_model(model_dir)
    build_index(model, sparse, tmp_path / "idx", model_dir=model_dir, show_progress=False)
    queries = sparse.subset(list(sparse)[1:7])  # none of them has a report
    with open_index(tmp_path / "idx") as index:
        every = index.search(model.encode_images([record.image for record in queries]).numpy(), k=len(index))
        for k in (4, 9):
            for record, retrieved, hits in zip(queries, retrieve_for_records(index, model, queries, k=k), every,
                                               strict=True):
                excluded = {"id": record.id, "case": case_key(record.meta)}
                expected = [hit.id for hit in hits if _usable(hit, excluded, {record.id})][:k]
                assert len(expected) == 4 and retrieved.ids == expected, (k, record.id)


# ------------------------------------------------------------------ neighbours are cases, not images

RAVENSWOOD = ("FINDINGS: The cardiac silhouette is enlarged, unchanged since the Ravenswood study. No pleural "
              "effusion. IMPRESSION: Cardiomegaly.")


@pytest.fixture(scope="module")
def one_case_index(phantom_dir, model_dir, train_index, tmp_path_factory):
    """The training films, each its own case (``case_id``), but for the three nearest to a test film with
    cardiomegaly: three images of one case (C-0001) sharing one report, which names a place ("Ravenswood")."""
    import csv

    model, test = load_model(model_dir), load_dataset(phantom_dir).select("test")
    query = next(r for r in test if r.labels["finding"] == "cardiomegaly")
    with open_index(train_index) as index:
        nearest = [hit.id for hit in index.search(model.encode_images([query.image]).numpy(), k=3)[0]]
    folder = tmp_path_factory.mktemp("onecase") / "data"
    (folder / "images").mkdir(parents=True)
    rows = [row for row in csv.DictReader((phantom_dir / "manifest.csv").open(newline="")) if row["split"] == "train"]
    for row in rows:
        shutil.copyfile(phantom_dir / row["image"], folder / row["image"])
        case_id = row["image"].removesuffix(".png")
        row["case_id"] = "C-0001" if case_id in nearest else case_id
        row["text"] = RAVENSWOOD if case_id in nearest else row["text"]
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_index(model, load_dataset(folder), folder.parent / "idx", model_dir=model_dir, show_progress=False)
    return folder, folder.parent / "idx", query, nearest


def test_one_case_s_images_sharing_a_report_count_once_in_a_draft(model_dir, one_case_index):
    """Three images of one case, one report naming a place: counted per image, the report was a 0.60 "majority" of
    5 neighbours and its "Ravenswood" was "used by 3 neighbours' reports", so drafted as the consensus of 3 cases.
    One case is one neighbour: its nearest image, the others named in ``same_case_as``; k cases are drafted from."""
    _, out, query, nearest = one_case_index
    with open_index(out) as index:
        draft = draft_report(index, load_model(model_dir), query.image, k=5, min_similarity=0.0)
    ids = [n.id for n in draft.neighbours]
    assert len(ids) == 5 and len(set(ids) & set(nearest)) == 1  # five cases, C-0001 once
    assert sorted([*draft.settings["same_case_as"], ids[0]]) == sorted(nearest)
    assert "ravenswood" not in draft.text().lower()
    for sentence in draft.sentences:
        assert len(set(sentence.cases) & set(nearest)) <= 1
    cardiomegaly = next(f for f in draft.findings if f.name == "cardiomegaly")
    assert cardiomegaly.support.get("positive", 0.0) < 0.5 or len(set(cardiomegaly.cases) - set(nearest)) >= 2


def test_identical_reports_without_a_case_id_vote_apart_but_pass_no_privacy_rule(labeller):
    """Without a case id, images holding the very same report may be one patient's (its wording must not count as
    3 neighbours') or several patients' templated report (their votes must count: six normal patients with the
    one normal template outvoted by four abnormal ones made "cardiomegaly" the consensus when the identical texts
    counted as one case). They vote apart; a word outside the vocabulary needs 3 *different* report texts."""
    hits = [Hit(id=f"image{i}", score=0.9, split="train", text=RAVENSWOOD) for i in range(3)]
    hits += [case_hit(f"case{i}", 0.8, "FINDINGS: Lungs clear. No pleural effusion. IMPRESSION: Normal.")
             for i in range(2)]
    draft = draft_from_hits(hits, labeller)
    assert [n.id for n in draft.neighbours] == ["image0", "image1", "image2", "case0", "case1"]
    assert draft.settings["same_case_as"] == {}
    assert "ravenswood" not in draft.text().lower()  # one text: the word of one report at most
    normal = "FINDINGS: No acute cardiopulmonary abnormality. IMPRESSION: Normal chest."
    template = [Hit(id=f"normal{i}", score=0.9, split="train", text=normal) for i in range(6)]
    enlarged = [case_hit(f"big{i}", 0.9, f"FINDINGS: The heart is enlarged, grade {i}. IMPRESSION: Cardiomegaly.")
                for i in range(4)]
    voted = draft_from_hits(template + enlarged, labeller)
    assert voted.consensus.get("cardiomegaly") != "positive" and len(voted.neighbours) == 10
    worded = [RAVENSWOOD, RAVENSWOOD.replace("enlarged", "enlarged again"), RAVENSWOOD + " Image 3."]
    same_case = [Hit(id=f"image{i}", score=0.9, split="train", meta={"case_id": "C-0001"}, text=text)
                 for i, text in enumerate(worded)]  # one case's images, its report worded per image
    draft = draft_from_hits(same_case + hits[3:], labeller)
    assert [n.id for n in draft.neighbours] == ["image0", "case0", "case1"]
    assert "ravenswood" not in draft.text().lower() and draft.consensus.get("cardiomegaly") != "positive"


def test_a_draft_for_an_indexed_image_leaves_its_whole_case_out(model_dir, one_case_index, tmp_path):
    """An indexed image of a case with several images: its own report was left out (so said the CLI) and then
    drafted, verbatim, from its sibling images. Its whole case is left out now, and said so."""
    folder, out, _, nearest = one_case_index
    image = folder / f"{nearest[0]}.png"
    with open_index(out) as index:
        draft = draft_report(index, load_model(model_dir), image, k=5, min_similarity=0.0)
    assert draft.settings["left_out_copies"] == [nearest[0]]
    assert draft.settings["left_out_same_case"] == sorted(nearest[1:])
    assert not set(nearest) & {n.id for n in draft.neighbours} and len(draft.neighbours) == 5
    assert "ravenswood" not in draft.text().lower()
    result, output = invoke("report", "draft", image, "--index", out, "--min-similarity", 0)
    assert result.exit_code == 0
    assert (f"the query image is indexed as {nearest[0]}: its own report is left out of the draft, with its case's "
            "other images (2 among the nearest)") in " ".join(output.split())


def test_case_retrieval_leaves_out_each_query_s_own_case(model_dir, one_case_index):
    """Queries that are indexed images of a case with others: the case's other images share the query's report and
    were its nearest neighbours and its "nearest report"; they are left out as the query itself is."""
    folder, out, _, nearest = one_case_index
    dataset = load_dataset(folder)
    queries = dataset.subset([r for r in dataset if r.id in nearest] + [r for r in dataset if r.id not in nearest][:3])
    with open_index(out) as index:
        result = case_retrieval(index, load_model(model_dir), queries, k=3, draft_k=3, label_columns=["finding"],
                                show_progress=False)
    assert result["excluded_self"] == len(queries) and result["excluded_same_case"] == 3
    assert result["n_index"] == len(dataset)
