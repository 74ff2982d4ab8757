"""Report generation quality: language metrics and clinical efficacy, beside the nearest-report baseline.

Language metrics are pycocoevalcap's (the coco-caption code used by R2Gen and its successors), on
texts split into words and numbers with punctuation dropped (``metric_tokens``; the coco-caption PTB
tokenizer needs Java). Words are runs of letters and digits of any script, case-folded (NFKC), with
accents and other combining marks dropped on both sides, as the generator's tokenizer (BERT's
normaliser) drops them: its "neumotorax" matches a reference's "Neumotórax" (the price: words that
differ only by a mark, and in scripts that write vowels as marks, such as Devanagari, some distinct
words, count as one). CJK ideographs (Chinese characters, Japanese kanji) are one token each, as BERT
splits them; a run of kana, Hangul or Thai is one word. On ASCII text this is lower-casing and
``[a-z0-9]+`` words (decimals such as "0.61" kept whole).

- **BLEU-1..4**: corpus BLEU (clipped n-gram precision, geometric mean up to n, brevity penalty
  over the whole corpus);
- **ROUGE-L**: the mean over reports of the longest-common-subsequence F-measure with beta 1.2
  (pycocoevalcap's ``Rouge``);
- **CIDEr**: CIDEr-D's tf-idf n-gram cosine (n = 1..4, x10), document frequencies from the
  references of the evaluated set (so values depend on the set; compare within one set).

A generated report without words (empty, or "...") scores 0 ROUGE-L and 0 CIDEr, and in BLEU adds
no n-gram and its reference's length (so the brevity penalty falls). A reference without words has
nothing to score against: the metric functions refuse it (InputError) and
``evaluate_report_generator`` leaves its record out, with a warning, as it leaves out records without
a report.

Clinical efficacy: the report labeller (``medvl.rag.ReportLabeller``) reads the positive findings of
each reference and each generated report; micro precision / recall / F1 over (report, finding)
pairs and macro F1 over the findings of the knowledge base with at least one reference positive
(``eval.case_retrieval.finding_f1``), the "no finding" entry included (as CheXpert's). The knowledge
base is the caller's (``labeller``; the shipped one holds chest X-ray findings only). A reference
whose finding the base lacks is read as "no finding", so ``knowledge_coverage`` checks the scored
records against it and warns when they name findings it does not hold or mostly mention none of its
findings (CT / MR reports under the chest X-ray base); the result's ``knowledge`` block says which
base was used and what the check found.

Baseline, computed in the same run: for each test image, the report of the most similar training
image (cosine similarity of image embeddings) under a dual encoder: ``baseline_model`` if given,
else the dual encoder the generator's image tower was initialised from, else (a generator trained
from scratch, or a transformers VLM: ``models.vlm``) the generator's own pooled image features. Both
are scored by the same code. The generator records the SHA-256 of its init dual encoder's weights
(``meta["init"]["weights_sha256"]``): when that folder now holds other weights (retrained or replaced in
place) or is gone, the baseline uses the generator's own features, with a warning and a ``note`` in
``baseline_encoder``; a generator trained before the digest was recorded is noted as not checked.
"""

from __future__ import annotations

import logging
import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_number
from ..data.audit import content_summary, input_flags, warn_without_content
from ..data.record import Dataset
from ..errors import InputError
from ..io import file_sha256
from ..models.decoder import context_k
from ..models.dual import WEIGHTS_FILE
from ..models.preprocess import read_for
from ..models.registry import load_model, model_directory
from ..models.vlm import MAX_NEW_TOKENS, REPORT_TOKENS, VisionLanguageModel
from ..progress import progress_bar
from ..rag.labels import ReportLabeller
from .case_retrieval import finding_f1
from .contamination import trained_on_scored
from .coverage import knowledge_coverage

log = logging.getLogger(__name__)

NLG_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")
BATCH = 16
# the CJK ideograph blocks BERT's pre-tokenizer splits into one token per character
_IDEOGRAPHS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
# an ideograph alone, or a run of letters / digits of any script (\w less "_"), a decimal kept whole ("0.61")
_WORDS = re.compile(rf"[{_IDEOGRAPHS}]|[^\W_{_IDEOGRAPHS}]+(?:\.\d+)?")


def metric_tokens(text: str) -> str:
    """The text as the metrics see it: words and numbers ("0.61" kept whole), space-joined; NFKC, case-folded,
    accents and other combining marks dropped (as the generator's BERT normaliser does), an ideograph per token."""
    folded = unicodedata.normalize("NFKC", text or "").casefold()
    unmarked = "".join(c for c in unicodedata.normalize("NFD", folded) if unicodedata.category(c) != "Mn")
    return " ".join(_WORDS.findall(unicodedata.normalize("NFC", unmarked)))


def _scored_tokens(references: Sequence[str], candidates: Sequence[str]) -> tuple[list[str], list[str]]:
    """Both sides' ``metric_tokens``; InputError on a count mismatch or a reference without words."""
    if len(references) != len(candidates) or not references:
        raise InputError(f"need as many candidates as references (at least one), got {len(candidates)} "
                         f"and {len(references)}")
    refs, cands = [metric_tokens(r) for r in references], [metric_tokens(c) for c in candidates]
    wordless = [i for i, tokens in enumerate(refs) if not tokens]
    if wordless:
        raise InputError(f"{len(wordless)} reference report(s) have no words to score against (first: number "
                         f"{wordless[0] + 1}); leave them out")
    return refs, cands


def _per_report(scorer: Any, refs: Sequence[str], cands: Sequence[str]) -> np.ndarray:
    """Per-report scores of pycocoevalcap's ``Rouge`` or ``Cider``; 0 for a candidate without words (Rouge
    would read its empty string as one empty word)."""
    scores = np.asarray(scorer.compute_score({i: [r] for i, r in enumerate(refs)},
                                             {i: [c] for i, c in enumerate(cands)})[1], dtype=float)
    return np.where([bool(c) for c in cands], scores, 0.0)


def nlg_metrics(references: Sequence[str], candidates: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr of ``candidates`` against one reference each (pycocoevalcap); a candidate
    without words scores 0, a reference without words is refused (module docstring)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, cands = _scored_tokens(references, candidates)
    bleu, _ = Bleu(4).compute_score({i: [r] for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)},
                                    verbose=0)
    scores = {f"bleu_{n + 1}": float(bleu[n]) for n in range(4)}
    scores.update(rouge_l=float(_per_report(Rouge(), refs, cands).mean()),
                  cider=float(_per_report(Cider(), refs, cands).mean()))
    return scores


def clinical_efficacy(references: Sequence[str], candidates: Sequence[str],
                      labeller: ReportLabeller | None = None) -> dict[str, Any]:
    """Finding precision / recall / F1 (micro, macro) of the candidates, the labeller reading both."""
    labeller = labeller or ReportLabeller()
    truth = [labeller.positives(r) for r in references]
    predicted = [labeller.positives(c) for c in candidates]
    return finding_f1(truth, predicted, sorted(labeller.knowledge.names))


def report_metrics(references: Sequence[str], candidates: Sequence[str],
                   labeller: ReportLabeller | None = None) -> dict[str, Any]:
    """Language metrics and clinical efficacy in one dict (``finding`` holds the per-finding table)."""
    efficacy = clinical_efficacy(references, candidates, labeller)
    return {**nlg_metrics(references, candidates),
            **{key: efficacy[key] for key in ("micro_precision", "micro_recall", "micro_f1", "macro_f1")},
            "per_finding": efficacy["per_finding"]}


INTERVAL_KEYS = ("bleu_4", "rouge_l", "cider", "micro_f1", "macro_f1")


def report_intervals(references: Sequence[str], candidates: Sequence[str], resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, labeller: ReportLabeller | None = None,
                     groups: Sequence | None = None) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap intervals over reports of BLEU-4, ROUGE-L, CIDEr and finding micro / macro F1
    (``eval.bootstrap`` draws). Each report is scored once: ROUGE-L and CIDEr are means of per-report
    scores (CIDEr's document frequencies from the whole set, as ``nlg_metrics``), F1 comes from the
    per-report finding sets; BLEU-4, a corpus statistic, is recomputed on each draw from cached tokens.
    ``value`` equals ``report_metrics``' figure on all reports. ``groups`` (one id per report: its case or
    patient): a cluster bootstrap, whole cases drawn with all their reports, so a case with many reports counts
    once per draw; None: each report its own unit (the draws of before, bit for bit)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from .bootstrap import bootstrap_draws, percentile_interval

    refs, cands = _scored_tokens(references, candidates)
    rouge, cider = _per_report(Rouge(), refs, cands), _per_report(Cider(), refs, cands)
    labeller = labeller or ReportLabeller()
    truth = [labeller.positives(r) for r in references]
    predicted = [labeller.positives(c) for c in candidates]
    vocabulary = sorted(labeller.knowledge.names)

    bleu_4 = _corpus_bleu_4(refs, cands)

    def f1(key: str) -> Callable[[np.ndarray], float]:
        return lambda index: float(finding_f1([truth[i] for i in index], [predicted[i] for i in index],
                                              vocabulary)[key])

    metrics: dict[str, Callable[[np.ndarray], float]] = {
        "bleu_4": bleu_4, "rouge_l": lambda index: float(rouge[index].mean()),
        "cider": lambda index: float(cider[index].mean()), "micro_f1": f1("micro_f1"), "macro_f1": f1("macro_f1")}
    draws = bootstrap_draws(np.zeros(len(refs)), resamples=resamples, seed=seed, need_both_classes=False,
                            groups=groups)
    return {key: {**percentile_interval(metric, len(refs), draws, level), "resamples": len(draws)}
            for key, metric in metrics.items()}


def _corpus_bleu_4(refs: Sequence[str], cands: Sequence[str]) -> Callable[[np.ndarray], float]:
    """Corpus BLEU-4 of any subset (with repeats) of the reports, from each report's n-gram counts taken
    once: pycocoevalcap's ``BleuScorer`` sums (test length, reference length, guessed and clipped
    correct n-grams) over the reports, then takes the same formula, epsilons included."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    cooked = [cook_test(cand, cook_refs([ref]), eff="closest") for ref, cand in zip(refs, cands, strict=True)]
    test_length = np.array([c["testlen"] for c in cooked], dtype=float)
    ref_length = np.array([c["reflen"] for c in cooked], dtype=float)
    guess = np.array([c["guess"] for c in cooked], dtype=float)
    correct = np.array([c["correct"] for c in cooked], dtype=float)
    tiny, small = 1e-15, 1e-9  # BleuScorer's

    def bleu_4(index: np.ndarray) -> float:
        precision = (correct[index].sum(0) + tiny) / (guess[index].sum(0) + small)
        score = float(np.prod(precision) ** 0.25)
        ratio = (test_length[index].sum() + tiny) / (ref_length[index].sum() + small)
        return score * math.exp(1 - 1 / ratio) if ratio < 1 else score

    return bleu_4


def evaluate_report_generator(model, test: Dataset, train: Dataset, *, baseline_model=None, index=None,
                              beam_size: int = 1, max_length: int | None = None, labeller: ReportLabeller | None = None,
                              show_progress: bool = True, keep_texts: bool = False) -> dict[str, Any]:
    """Generate a report for every test record and score it beside the nearest training report.

    ``model`` is a ``ReportGenerator`` or a transformers ``VisionLanguageModel``; ``train`` holds the
    records the baseline retrieves from; ``index`` (open) is required by generators trained with
    retrieved context. ``labeller`` reads the findings (default: the shipped knowledge base); how well
    its knowledge base covers the test records is in ``knowledge`` (``knowledge_coverage``, warned
    about). ``keep_texts`` adds ``texts``: the ``references``, ``generated`` and ``nearest`` reports,
    in test order (patient data: for scoring in memory, not for logs), and the scored test ``records`` they belong
    to (those with a report; their cases are the units of ``report_intervals``' ``groups``).
    """
    started = time.perf_counter()
    check_max_length(model, max_length)
    labeller = labeller or ReportLabeller()
    test, train = _with_reports(test, "test"), _with_reports(train, "training")
    if context_k(model) and index is None:
        raise InputError(f"the report generator was trained with {context_k(model)} retrieved "
                         "reports as context: pass --index (the index it was trained with)")
    coverage = knowledge_coverage(test.records, labeller)
    seen = trained_on_scored(model, test, "scored (test) reports")
    images = _read(test, show_progress, model)
    content: list[dict[str, str]] = []
    generated, cited = generate_for_images(model, images, index=index, records=test.records, beam_size=beam_size,
                                           max_length=max_length, show_progress=show_progress, content=content)
    embed, describe = _baseline_encoder(model, baseline_model)
    nearest = _nearest_reports(embed, images, train, show_progress, model)
    references = [r.text or "" for r in test]
    ours = report_metrics(references, generated, labeller)
    nearest_texts = [train[i].text or "" for i in nearest]
    baseline = report_metrics(references, nearest_texts, labeller)
    result: dict[str, Any] = {
        "n": len(test), "n_train": len(train), "beam_size": beam_size,
        "generator": {k: v for k, v in ours.items() if k != "per_finding"},
        "nearest_report": {k: v for k, v in baseline.items() if k != "per_finding"},
        "baseline_encoder": describe,
        "per_finding": {"generator": ours["per_finding"], "nearest_report": baseline["per_finding"]},
        "context_k": context_k(model),
        "cases": [{"id": r.id, "nearest_train_id": train[i].id, **({"cited": c} if c is not None else {})}
                  for r, i, c in zip(test, nearest, cited, strict=True)],
        "empty_reports": sum(not g.strip() for g in generated),
        "knowledge": coverage,
    }
    if seen is not None:
        result["trained_on_scored"] = seen
    empty = content_summary(content, "scored images", warn=False)  # generate_for_images warned
    if empty is not None:
        result["input_content"] = empty
    if keep_texts:
        result["texts"] = {"references": references, "generated": generated, "nearest": nearest_texts,
                           "records": list(test.records)}
    result["seconds"] = round(time.perf_counter() - started, 2)
    _headline(result)
    return result


HEADLINE_KEYS = ("bleu_1", "bleu_4", "rouge_l", "cider", "micro_f1", "macro_f1")


def _headline(result: dict[str, Any]) -> None:
    """Top-level keys for the headline numbers (as every evaluator's JSON has): the generator's under their
    own names, the nearest-report baseline's prefixed ``nearest_report_``."""
    for key in HEADLINE_KEYS:
        result[key] = result["generator"][key]
        result[f"nearest_report_{key}"] = result["nearest_report"][key]


def _with_reports(dataset: Dataset, what: str) -> Dataset:
    """The records with a report that has words (``metric_tokens``); a report of punctuation alone ("---")
    is left out with a warning: as a reference it has nothing to score against."""
    kept = dataset.subset([r for r in dataset if metric_tokens(r.text or "")])
    if not len(kept):
        raise InputError(f"{dataset.source}: the {what} split has no record with a report")
    wordless = sum(bool(r.text and r.text.strip()) for r in dataset) - len(kept)
    if wordless:
        log.warning("%s: left out %d %s records whose report has no words (only punctuation or symbols)",
                    dataset.source, wordless, what)
    if len(kept) + wordless < len(dataset):
        log.info("%s: left out %d %s records without a report", dataset.source,
                 len(dataset) - len(kept) - wordless, what)
    return kept


def _read(dataset: Dataset, show_progress: bool, model: Any) -> list[np.ndarray]:
    """Each record's image as ``model`` is fed it (``read_for``: its own HU windows on a DICOM)."""
    images = []
    with progress_bar("Reading images", total=len(dataset), enabled=show_progress) as advance:
        for record in dataset:
            images.append(read_for(model, record.image))
            advance(1)
    return images


def generate_for_images(model, images: Sequence[np.ndarray], *, index=None, records=None, beam_size: int = 1,
                        max_length: int | None = None, show_progress: bool = False,
                        content: list[dict[str, str]] | None = None) -> tuple[list[str], list[list[str] | None]]:
    """Generated reports of image arrays and, with retrieved context, the case ids each was given
    (greedy or beam search, each report at most ``max_length`` tokens: ``check_max_length``). ``content``, a list,
    gets each image's ``input_flags`` as the model sees it (a medvl generator: after its preprocessing; a
    transformers VLM: the 8-bit RGB image its processor is given); a warning counts them."""
    check_max_length(model, max_length)
    if isinstance(model, VisionLanguageModel):
        return _vlm_reports(model, images, beam_size, max_length, show_progress, content)
    contexts: list[Any] = [None] * len(images)
    if model.config.decoder.context_k:
        from ..index import index_model
        from ..rag.context import retrieve_for_images, retrieve_for_records

        k, encoder = model.config.decoder.context_k, index_model(index)
        contexts = (retrieve_for_records(index, encoder, records, k) if records is not None
                    else retrieve_for_images(index, encoder, images, k))
    reports: list[str] = []
    with progress_bar("Generating reports", total=len(images), enabled=show_progress) as advance:
        for start in range(0, len(images), BATCH):
            chunk = images[start:start + BATCH]
            pixels = model.preprocessor.load_many(chunk)
            if content is not None:
                content.extend(input_flags(image.numpy()) for image in pixels)
            pixels = model.preprocessor.normalize(pixels)
            context = None
            if model.config.decoder.context_k:
                context = model.tokenize_contexts([c.texts for c in contexts[start:start + BATCH]])
            reports += model.generate(pixels, context, beam_size=beam_size, max_length=max_length)
            advance(len(chunk))
    if content is not None:
        warn_without_content(content, "images")
    return reports, [c.ids if c is not None else None for c in contexts]


def check_max_length(model, max_length: int | None) -> None:
    """InputError unless ``model`` can write reports of at most ``max_length`` tokens (None: the model's
    default). The count is of tokens after the prompt: a transformers VLM's ``max_new_tokens`` (1 to
    ``MAX_NEW_TOKENS``), a medvl generator's tokens after its start token (1 to ``max_report_tokens``)."""
    if isinstance(model, VisionLanguageModel):
        check_number("max_length", max_length, minimum=1, maximum=MAX_NEW_TOKENS, integer=True, optional=True)
    else:
        model.check_max_length(max_length)


def _vlm_reports(model: VisionLanguageModel, images: Sequence[np.ndarray], beam_size: int, max_length: int | None,
                 show_progress: bool, content: list[dict[str, str]] | None) -> tuple[list[str], list[list[str] | None]]:
    reports: list[str] = []
    with progress_bar("Generating reports", total=len(images), enabled=show_progress) as advance:
        for image in images:
            reports.append(model.write_report(image, max_length or REPORT_TOKENS, beam_size, content=content))
            advance(1)
    if content is not None:
        warn_without_content(content, "images")
    return reports, [None] * len(images)


def _baseline_encoder(model, baseline_model) -> tuple[Callable[[Sequence[np.ndarray]], torch.Tensor], dict[str, Any]]:
    """How the nearest-report baseline embeds images (normalised, (N, D)), and how the result names it."""
    if baseline_model is not None:
        return baseline_model.encode_images, {"kind": "dual encoder", "name": baseline_model.config.name,
                                              "source": "--baseline-model"}
    init = model.meta.get("init") or {}
    note = None
    if init.get("dir") and Path(init["dir"]).exists():
        weights, note = _init_weights(init)
        if weights is not None:
            dual = load_model(init["dir"])
            return dual.encode_images, {"kind": "dual encoder", "name": dual.config.name, "weights_sha256": weights,
                                        "source": "the dual encoder the generator was initialised from",
                                        **({"note": note} if note else {})}
    elif init.get("dir"):
        note = "the dual encoder the generator was initialised from is gone"
    if note:
        log.warning("%s; the baseline retrieves with the generator's own image features (--baseline-model DIR "
                    "names a dual encoder for it)", note)
    source = ("the transformers VLM (no --baseline-model)" if isinstance(model, VisionLanguageModel)
              else "the generator (its --init dual encoder is not used: see note)" if note
              else "the generator (trained from scratch, no --baseline-model)")
    return (lambda images: pooled_features(model, images)), {
        "kind": "generator image encoder (mean of its image tokens)", "name": model.config.name, "source": source,
        **({"note": note} if note else {})}


def _init_weights(init: dict[str, Any]) -> tuple[str | None, str | None]:
    """The SHA-256 of the weights now in the folder a generator was initialised from (``init``: its meta block) when
    they are the ones it recorded at training, else None; and a note saying what was found (None: checked, same).
    A generator trained before the digest was recorded cannot be checked: the folder's weights are used, noted."""
    try:
        weights = file_sha256(model_directory(init["dir"]) / WEIGHTS_FILE)
    except OSError:
        return None, f"{init['dir']} holds no readable {WEIGHTS_FILE}, not the dual encoder the generator was " \
                     "initialised from"
    recorded = init.get("weights_sha256")
    if recorded is None:
        note = (f"the generator does not record the weights of the dual encoder it was initialised from (trained "
                f"before they were recorded): the baseline uses the model now at {init['dir']}, which cannot be "
                "checked to be the same")
        log.warning("%s", note)
        return weights, note
    if weights != recorded:
        return None, (f"{init['dir']} now holds other weights (sha256 {weights[:12]}) than the dual encoder the "
                      f"generator was initialised from (sha256 {str(recorded)[:12]})")
    return weights, None


def _nearest_reports(embed: Callable[[Sequence[np.ndarray]], torch.Tensor], images: Sequence[np.ndarray],
                     train: Dataset, show_progress: bool, model: Any) -> list[int]:
    """Per test image, the index of the training record whose image is most similar."""
    train_images = _read(train, show_progress, model)
    query, gallery = embed(list(images)), embed(train_images)
    return (query @ gallery.T).argmax(1).tolist()


def pooled_features(model, images: Sequence[np.ndarray]) -> torch.Tensor:
    """L2-normalised mean image tokens of a report generator (the baseline of a generator from scratch)."""
    if isinstance(model, VisionLanguageModel):
        return model.image_embeddings(images)
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            pixels = model.preprocessor.normalize(model.preprocessor.load_many(images[start:start + 64]))
            chunks.append(F.normalize(model.image_encoder(pixels), dim=-1))
    return torch.cat(chunks)
