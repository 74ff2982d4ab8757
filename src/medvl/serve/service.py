"""What the routes do, over the library: one loaded model (and index), one model thread, the batcher.

The model is loaded once. Every torch call runs on one thread (``model_thread``): the batcher's
forward passes, class-prompt embeddings and the index's searches, so requests never run the model
concurrently and CPU threads are not oversubscribed. Decoding and preprocessing an upload are the
request's own work and run on the server's worker threads.
Zero-shot class embeddings (a prompt ensemble per class, the costly text forward passes) are
computed once per label set and kept by ``medvl.embed.class_embeddings`` (``MAX_CLASS_SETS`` per
model, least recently used dropped).

Explanations and VQA answers are heavy (gradient passes, a second model, text generation): they run
on the ``lane`` (``lane.HeavyLane``: one at a time on its own thread, a bounded wait), never on the
model thread, so zero-shot answers keep flowing while one computes. Explanations use their own copy
of the dual encoder (``_explainer``, made on the lane at the first one), since Grad-CAM hooks a
layer of the model it runs and must not see the batcher's forward passes. The copy is of the served
model, never of the folder as it is now (a guard fitted or weights replaced since the start would make
/v1/explain answer for another model than /v1/zero-shot): a copy of the served torch model, or for
another backend (ONNX, channels-last, bf16) the folder's eager torch model, refused with 503 unless its
weights and config are the served model's, carrying the served model's guard and captions. A nearest-case
search of an explanation runs on the model thread, as every index search does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checks import check_number, split_names
from ..data import captions_for
from ..data.audit import input_flags
from ..embed import MAX_CLASS_SETS, cached_class_embeddings, class_embeddings
from ..errors import DataError, InputError, MedvlError, ModelError
from ..eval.zero_shot import scaled_similarities
from ..index.base import IndexDamaged, describe_target, info_sha256, model_fingerprint, vqa_fingerprint
from ..index.build import hashed_image
from ..index.where import MAX_LENGTH as WHERE_LENGTH
from ..models.preprocess import reads_modality_values
from ..models.registry import load_model
from ..predict import check_class_names, check_label_count, class_prompts, prompt_warnings
from .batching import BatchTiming, MicroBatcher
from .lane import HeavyLane
from .logs import run_with_request
from .previews import (
    Picture,
    heatmap_overlay,
    overlay_shape,
    parse_window,
    png_bytes,
    preview_upload,
    thumbnail_file,
)
from .settings import ServeSettings
from .uploads import Upload, UploadRejected, decode_upload

if TYPE_CHECKING:
    from ..explain.concepts import ConceptBottleneck
    from ..models.vlm import VisionLanguageModel
    from ..models.vqa import VQAModel
    from ..rag import ReportLabeller

log = logging.getLogger(__name__)

MAX_CASE_ID = 1024  # characters; a longer id names no case
# the heatmap methods /v1/explain runs when none are asked for, those the model supports (default_methods):
# the two cheap ones (occlusion and SmoothGrad take one forward pass per window or noisy copy)
SERVICE_METHODS = ("patch_text", "gradcam")
INDEX_HEALTH_SECONDS = 5.0  # /v1/health asks the index's store at most this often (it needs no token)
# how long /v1/health waits for the model thread to ask the index (a long forward pass or search ahead of it): after
# that it answers with the last word, and the check, still queued, updates it when it runs
INDEX_HEALTH_WAIT_SECONDS = 1.0


def parse_labels(labels: str) -> list[str]:
    """Comma-separated class names (as ``medvl predict --labels``), blanks dropped, at most ``predict.MAX_LABELS``
    distinct (``check_label_count``, before the upload is read). Too few is for the library to refuse
    (``check_class_names``, ``finding_classes``): the same words as the CLI's."""
    names = split_names(labels)
    check_label_count(names)
    return names


def parse_methods(methods: str) -> list[str]:
    """Comma-separated heatmap methods (``patch_text,gradcam``), checked by the library."""
    from ..explain.heatmaps import check_methods

    return check_methods(split_names(methods))


class ModelService:
    """One loaded model (and optionally a case index) behind the routes."""

    def __init__(self, model_dir: str | Path, index: str | Path | None, settings: ServeSettings):
        self.settings = settings.for_model(model_dir)  # backend auto: the one it stands for, as /v1/models says
        self.model_dir = Path(model_dir)
        if settings.torch_threads:  # before the model loads: an ONNX session takes its thread count when made
            torch.set_num_threads(settings.torch_threads)  # threads made from now on start with it too
        self.net = load_model(model_dir, backend=self.settings.backend)
        self.net.eval()
        # what /v1/models tells a retrained model by (its folder's name may be the same): the index's digests of it
        self.fingerprint = {key: value for key, value in model_fingerprint(self.net).items()
                            if key.endswith("_sha256")}
        # a model with its own HU windows reads a DICOM upload as modality values (ImagePreprocessor.read)
        self.modality_values = reads_modality_values(self.net)
        self.spatial_dims = self.net.config.image.spatial_dims  # a 2D model refuses a NIfTI volume upload
        # a 3D model reads an upload's file as medvl predict reads a file: a NIfTI volume streamed slab by slab
        self.load_file = self.net.preprocessor.load if self.spatial_dims == 3 else None
        threads = settings.torch_threads or torch.get_num_threads()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvl-model",
                                               initializer=torch.set_num_threads, initargs=(threads,))
        self.batcher = MicroBatcher(self._encode, self.model_thread, settings.batch_size,
                                    settings.max_wait_ms, settings.max_queue)
        self.index_name = describe_target(index) if index is not None else None  # last component: no folders
        self.index = self._open_index(index) if index is not None else None
        self._index_health: tuple[float, str] | None = None  # when /v1/health last asked the store, and its word
        self._index_check: Future | None = None  # that question, queued on the model thread
        self.index_health_seconds = INDEX_HEALTH_SECONDS
        self.index_health_wait = INDEX_HEALTH_WAIT_SECONDS
        self.labeller: ReportLabeller | None = None
        if settings.knowledge is not None:  # a user's entry the model cannot read whole fails the start, not each draft
            self._labeller().knowledge.check_model(self.net)
        elif self.index is not None:  # read at the start: /v1/models describes the knowledge base drafts use
            self._labeller()
        self.workers = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="medvl-worker")
        self._class_sets: OrderedDict[tuple, tuple[str, torch.Tensor, list[str]]] = OrderedDict()
        self.vqa: VQAModel | VisionLanguageModel | None = _load_vqa(settings.vqa_model)
        # what /v1/models tells a VQA model redeployed under the same folder name by, as the dual encoder's fingerprint
        self.vqa_fingerprint = vqa_fingerprint(self.vqa) if self.vqa is not None else None
        self.bottleneck: ConceptBottleneck | None = _load_bottleneck(settings.bottleneck, self.net)
        self.lane = HeavyLane(settings.heavy_queue)
        self._explainer: Any = None  # the dual encoder's copy for explanations, made on the lane when first asked
        self._explainer_refusal: str | None = None  # why no copy could be made (the folder holds another model)

    def _open_index(self, target: str | Path):
        from ..index import open_index
        from ..index.base import check_model

        index = open_index(target)
        check_model(index.info, self.net, index.location)  # a wrong model fails at start, not per request
        return index

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        """Drain the batcher, then let the model thread finish and close the index."""
        await self.batcher.close()
        await asyncio.to_thread(self.lane.close)
        self.model_thread.shutdown(wait=True)
        self.workers.shutdown(wait=True)
        if self.index is not None:
            self.index.close()

    # -- shared steps ----------------------------------------------------------------------------
    async def _on_worker(self, function, *args):
        """Run a request's CPU work (decoding, preprocessing) on a worker thread, as many at once as
        there are CPUs: more would only slow each other and the model's forward passes down."""
        return await run_with_request(self.workers, function, *args)

    async def run_on_model_thread(self, function, *args, **kwargs):
        return await run_with_request(self.model_thread, partial(function, *args, **kwargs))

    async def on_index(self, function, *args, **kwargs):
        """``run_on_model_thread`` for work that searches the index, on the index's current version: a FAISS folder
        changed since the last request (``medvl index add`` / ``delete`` / ``build``: a new version swapped in) is
        read again first (``follow_rebuild``), as a PostgreSQL table rebuilt underneath is, between requests and on
        the thread of every search, so that one answer reads one version. An index rebuilt with another model since
        the service checked it at start (``IndexRebuilt``) answers 503 with the reason: this service cannot search it
        until restarted with that model; so does one that can no longer be read (removed, damaged), until a readable
        version is there. So does a FAISS index whose case table a read found damaged (``IndexDamaged``, kept in its
        ``damaged``), from then on, as ``/v1/health`` says it is unavailable: which answers the damage reached cannot
        be told, and the file stays damaged until a rebuild swaps in another version."""
        from ..index.base import IndexRebuilt

        try:
            return await self.run_on_model_thread(self._on_current_index, function, *args, **kwargs)
        except IndexRebuilt as error:
            raise ServiceUnavailable(str(error)) from None

    def _on_current_index(self, function, *args, **kwargs):
        """``function`` run on the index's current version (on the model thread), or ``ServiceUnavailable``."""
        unavailable = self._index_unavailable()
        if unavailable:
            raise ServiceUnavailable(unavailable)
        return function(*args, **kwargs)

    async def decode(self, data: bytes, timings: dict[str, Any], for_vqa: bool = False,
                     hashed: bool = False) -> Upload:
        """One upload decoded as the served model reads files (``for_vqa``: as the VQA model does, its own HU
        windows if any; it reads 2D images); ``hashed``: a 3D model's volume with its pixel hash as an index
        records it (``Upload.digests``, for a draft to leave out its indexed copies)."""
        started = time.perf_counter()
        modality_values = reads_modality_values(self.vqa) if for_vqa else self.modality_values
        spatial_dims = 2 if for_vqa else self.spatial_dims
        hash_volume = partial(hashed_image, self.net.preprocessor) if hashed and not for_vqa else None
        upload = await self._on_worker(decode_upload, data, self.settings, modality_values, spatial_dims,
                                       None if for_vqa else self.load_file, hash_volume)
        timings.update(upload_kind=upload.kind, upload_bytes=upload.n_bytes)
        timings["decode_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return upload

    async def embed(self, data: bytes, timings: dict[str, Any]) -> np.ndarray:
        """The normalised embedding of an uploaded image, through the micro-batcher."""
        return (await self.embed_checked(data, timings))[0]

    async def embed_checked(self, data: bytes, timings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """The embedding of an upload and its checks: ``input_flags`` (blank or streaked as the model sees it,
        ``medvl.data.audit.input_flags``; {} for an image with content) and its OOD score and flag (none when the
        model has no guard), both from the one forward pass its batch ran."""
        with self.batcher.incoming():
            started = time.perf_counter()
            upload, pixels, content = await self._on_worker(self._decode_and_preprocess, data)  # one worker hop
            timings.update(upload_kind=upload.kind, upload_bytes=upload.n_bytes)
            timings["decode_ms"] = round((time.perf_counter() - started) * 1000, 2)  # preprocessing included
        return await self._embed_pixels(pixels, content, timings)

    async def _embed_pixels(self, pixels: torch.Tensor, content: dict[str, str],
                            timings: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """``embed_checked`` of preprocessed pixels: their embedding from the batcher and their checks, the
        OOD score and flag from the same forward pass."""
        rows, batch = await self.batcher.embed(pixels)
        _note(timings, batch)
        guard = getattr(self.net, "ood", None)
        return rows[0], {"input_flags": content, **(guard.flag(float(rows[1][0])) if guard is not None else {})}

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One batch's normalised embeddings and, for a model with an OOD guard, each image's OOD score
        (from the backbone features the embeddings are projected from: one pass of the image tower)."""
        guard = getattr(self.net, "ood", None)
        if guard is None:
            return (self.net.encode_images(pixels),)
        with torch.no_grad():
            features = self.net.encode_images(pixels, features=True)
            return self.net.embed_image_features(features), guard.scores(features)[:, None]

    def _decode_and_preprocess(self, data: bytes) -> tuple[Upload, torch.Tensor, dict[str, str]]:
        upload = decode_upload(data, self.settings, self.modality_values, self.spatial_dims, self.load_file)
        return upload, *self._checked_pixels(upload)

    def _checked_pixels(self, upload: Upload) -> tuple[torch.Tensor, dict[str, str]]:
        """The upload as the model takes it and its ``input_flags`` (blank or streaked as the model sees it)."""
        pixels = self._preprocess(upload)
        return pixels, input_flags(pixels.numpy())

    def _preprocess(self, upload: Upload) -> torch.Tensor:
        if upload.model_input is not None:  # a 3D model's volume, read from its file by the model's loader
            return upload.model_input
        try:
            return self.net.preprocessor.load(upload.decoded())
        except MedvlError as error:
            raise UploadRejected(422, getattr(error, "problem", None) or str(error)) from None

    # -- routes' work ----------------------------------------------------------------------------
    async def described(self) -> dict[str, Any]:
        """``describe`` for ``/v1/models``: the index read on the model thread, between searches (its current version
        whole: its count and its info's ``sha256`` of one version)."""
        return {**self.describe(index=False), "index": await self.run_on_model_thread(self._describe_index)}

    def describe(self, index: bool = True) -> dict[str, Any]:
        """The loaded model (and index) for ``/v1/models``: names and sizes, no paths above them; what tells a model
        retrained (or an index rebuilt) under the same name: the model's ``fingerprint`` (its config, weights and
        tokenizer digests, as an index records them), the VQA model's (``vqa.fingerprint``:
        ``index.base.vqa_fingerprint``), the index's ``sha256`` (``index.base.info_sha256``), the OOD guard's
        (``ood``: ``_describe_ood``) and the knowledge base's (``knowledge``: ``_describe_knowledge``).
        ``index`` False: the index left for the caller to describe (``described``)."""
        config = self.net.config
        captions = captions_for(None, None, self.net)
        return {"name": config.name, "folder": self.model_dir.name, "backend": self.settings.backend,
                "embed_dim": config.embed_dim, "fingerprint": self.fingerprint,
                "image": {"arch": config.image.arch, "spatial_dims": config.image.spatial_dims,
                          "image_size": config.image.image_size, "in_channels": config.image.in_channels},
                "labels": {column: list(classes) for column, classes in captions.classes.items()},
                "index": self._describe_index() if index else None, "explain": self._describe_explain(),
                "vqa": self._describe_vqa(), "ood": self._describe_ood(), "knowledge": self._describe_knowledge(),
                "limits": {"max_upload_bytes": self.settings.max_upload_bytes,
                           "max_inflight_bytes": self.settings.inflight_limit}}

    def _describe_explain(self) -> dict[str, Any]:
        """What /v1/explain can do: ``methods`` (none, and the reason in ``unavailable``, for a model that takes
        no heatmap: /v1/explain refuses it), the defaults, the concept bottleneck."""
        from ..explain.heatmaps import METHODS, heatmap_refusal

        bottleneck = self.bottleneck
        concepts = None if bottleneck is None else {"classes": bottleneck.classes, "concepts": len(bottleneck.concepts),
                                                    "label_column": bottleneck.label_column}
        refusal = heatmap_refusal(self.net.config.image)
        return {"methods": [] if refusal else list(METHODS), "default_methods": self.explain_methods(),
                "unavailable": refusal, "max_top": self.settings.max_explain_top, "concepts": concepts}

    def _describe_ood(self) -> dict[str, Any] | None:
        """The served model's OOD guard (None without one): its threshold, the quantile it was calibrated at
        (``eval.ood.fit_ood``'s ``info``) and the SHA-256 of its file, which tells a guard fitted (or refitted with
        ``--overwrite``) into the same model folder between two starts: the weights do not change."""
        guard = getattr(self.net, "ood", None)
        if guard is None:
            return None
        return {"threshold": round(guard.threshold, 4), "quantile": guard.info.get("quantile"),
                "sha256": guard.file_sha256}

    def _describe_knowledge(self) -> dict[str, Any] | None:
        """The knowledge base drafts are labelled with (None for a service without an index: it drafts nothing): its
        number of entries and the SHA-256 of the entries read, shipped and the user's (``KnowledgeBase.sha256``)."""
        if self.index is None or self.labeller is None:
            return None
        knowledge = self.labeller.knowledge
        return {"entries": len(knowledge), "sha256": knowledge.sha256()}

    def _describe_vqa(self) -> dict[str, Any] | None:
        from ..models.vqa import VQAModel

        if self.vqa is None or self.settings.vqa_model is None:
            return None
        kind = "medvl" if isinstance(self.vqa, VQAModel) else "transformers"
        answers = len(self.vqa.answers) if isinstance(self.vqa, VQAModel) else None
        return {"folder": self.settings.vqa_model.name, "kind": kind, "answers": answers,
                "max_images": self.vqa_image_limit(), "fingerprint": self.vqa_fingerprint}

    def index_health(self) -> str | None:
        """``/v1/health``'s word on the index: None without one, ``ok``, or ``unavailable`` when the store no longer
        holds it (a PostgreSQL table dropped or rebuilt with another model, a FAISS folder removed or changed into
        one that cannot be read) or a read found it damaged (a FAISS index's case table: ``IndexDamaged``); the
        reason only behind a token, in ``/v1/models``. Asked of the store at most every ``INDEX_HEALTH_SECONDS``
        (the route needs no token), on the model thread, between searches (``follow_rebuild`` swaps a new version in
        there, so that one answer reads one version): the caller's thread waits up to ``INDEX_HEALTH_WAIT_SECONDS``
        for it, then answers with the last word (``ok`` before the first: the index was opened and checked at the
        start), so that a health probe is answered promptly during a long forward pass or search; the question stays
        queued and its word is the next probe's."""
        if self.index is None:
            return None
        checked = self._index_health
        # found damaged by a search: asked at once (it stays damaged until a rebuild is swapped in)
        if checked is None or time.monotonic() - checked[0] >= self.index_health_seconds \
                or getattr(self.index, "damaged", None):
            asked = self._index_check
            if asked is None or asked.done():  # one question queued at a time, however many probes wait for it
                asked = self._index_check = self.model_thread.submit(self._check_index_health)
            with contextlib.suppress(FutureTimeout):
                asked.result(timeout=self.index_health_wait)
            checked = self._index_health
        return checked[1] if checked is not None else "ok"

    def _check_index_health(self) -> None:
        """``index_health``'s question, on the model thread: its word, with when it was asked."""
        asked = time.monotonic()
        self._index_health = (asked, "unavailable" if self._index_unavailable() else "ok")

    def _index_unavailable(self) -> str | None:
        """Why the index cannot be searched any more (None when it can), on the model thread: a new version of it is
        read first (``follow_rebuild``: a PostgreSQL table rebuilt by another process, a FAISS folder changed by a
        writer: its columns, its size, its cases), and one rebuilt with another model or that cannot be read says
        why (a ``DataError``'s problem: no path of the server's); then a FAISS index whose case table a read found
        damaged."""
        from ..index.base import IndexRebuilt

        if self.index is None:
            return None
        try:
            self.index.follow_rebuild()
        except IndexRebuilt as error:
            return str(error)
        except DataError as error:
            return error.problem
        return getattr(self.index, "damaged", None)

    def _describe_index(self) -> dict[str, Any] | None:
        """The index as it is now: a new version of it (a PostgreSQL table rebuilt, a FAISS folder changed by another
        process since the last search) is read again (its columns, its size, its info), and one this service cannot
        search any more says why (``unavailable``). On the model thread when the service runs (``described``)."""
        if self.index is None:
            return None
        unavailable, cases = self._index_unavailable(), None
        if unavailable is None:
            try:
                cases = len(self.index)
            except IndexDamaged as error:  # a FAISS index's damaged case table
                unavailable = error.problem
        from ..rag.draft import MIN_CASES

        info = self.index.info
        return {"name": self.index_name, "cases": cases, "sha256": info_sha256(info),
                "backend": info.get("backend"), "label_columns": info.get("label_columns"),
                "filter_columns": info.get("columns"), "unavailable": unavailable,
                "min_draft_cases": MIN_CASES}  # /v1/report/draft's least k: the page does not ask with fewer

    async def zero_shot(self, data: bytes, class_names: Sequence[str], label_column: str | None,
                        timings: dict[str, Any]) -> dict[str, Any]:
        """``medvl predict --json``'s answer for one upload: prediction and every class's probability."""
        class_names = check_class_names(class_names)
        column, classes, warnings = await self._class_set(class_names, label_column)
        embedding, flags = await self.embed_checked(data, timings)
        row = scaled_similarities(self.net, torch.from_numpy(embedding[None]), classes).softmax(-1)[0].numpy()
        scores = {name: float(p) for name, p in zip(class_names, row, strict=True)}
        return {"prediction": max(scores, key=scores.__getitem__), "probabilities": scores,
                "label_column": column or None, "model": self.net.config.name, **flags, "warnings": list(warnings)}

    async def _class_set(self, class_names: Sequence[str],
                         label_column: str | None) -> tuple[str, torch.Tensor, list[str]]:
        """The label column, class embeddings and prompt warnings (``predict.prompt_warnings``) of a label set,
        kept per set (``MAX_CLASS_SETS``, least
        recently used dropped): the served model and its captions never change, and a service's users
        send the same few label sets with every request."""
        key = (tuple(class_names), label_column)
        kept = self._class_sets.get(key)
        if kept is None:
            column, prompts = class_prompts(self.net, class_names, label_column)
            classes = cached_class_embeddings(self.net, prompts)  # kept by the library: no model-thread trip
            if classes is None:
                classes = await self.run_on_model_thread(class_embeddings, self.net, prompts)
            kept = self._class_sets[key] = (column, classes, prompt_warnings(self.net, class_names, column))
            while len(self._class_sets) > MAX_CLASS_SETS:
                self._class_sets.popitem(last=False)
        self._class_sets.move_to_end(key)
        return kept

    def _require_index(self):
        if self.index is None:
            raise ServiceUnavailable("this service was started without a case index (medvl serve --index)")
        return self.index

    async def search(self, upload: Upload | None, text: str | None, k: int, where: str | None,
                     target: str, timings: dict[str, Any]) -> dict[str, Any]:
        """``medvl search --json``'s answer: the k closest cases to the uploaded image or the text. An image
        query's ``query`` holds its checks as the CLI's does: ``input_flags`` and, for a model with a guard,
        ``ood_score`` / ``out_of_distribution`` / ``ood_threshold`` (its neighbours may not be similar)."""
        from ..index import search_index
        from ..index.base import check_k, check_target
        from ..index.search import check_one_query
        from ..index.where import given_filter

        index = self._require_index()
        where = given_filter(where)  # blank: no filter, answered as null (medvl search --json says the same)
        check_k(k)
        check_target(target)
        check_one_query(upload, text)
        if upload is None:
            hits = await self.on_index(search_index, index, self.net, text=text, k=k, where=where,
                                       target=target, verify_model=False)  # checked at start
            query: dict[str, Any] = {"text": text}
        else:  # preprocessed and checked on a worker; embedded (and scored by the guard) in the batcher's pass
            pixels, content = await self._on_worker(self._checked_pixels, upload)
            embedding, checks = await self._embed_pixels(pixels, content, timings)
            found = await self.on_index(index.search, embedding[None], k=k, where=where, target=target)
            hits = found[0]
            query = {"image": {"kind": upload.kind, "bytes": upload.n_bytes}, **checks}
        return {"index": self.index_name, "query": query, "target": target, "k": k,
                "where": where, "hits": [hit.to_dict() for hit in hits]}

    async def draft(self, upload: Upload, k: int, where: str | None, min_support: float, min_similarity: float,
                    related: int) -> dict[str, Any]:
        """``medvl report draft --json``'s answer: a draft from the k nearest cases, or an abstention."""
        from ..rag import draft_report
        from ..rag.draft import check_settings

        index = self._require_index()
        check_settings(k, min_support, min_similarity, related)
        query = upload.pixels if upload.pixels is not None else upload.model_input  # a volume: the model's input
        draft = await self.on_index(draft_report, index, self.net, query, k=k, where=where,
                                    labeller=self._labeller(), min_support=min_support,
                                    min_similarity=min_similarity, related=related, digests=upload.digests,
                                    verify_model=False)  # checked at start (_open_index); a rebuild: 503
        return {"index": self.index_name, **draft.to_dict()}

    async def preview(self, data: bytes, window: str | None, timings: dict[str, Any]) -> Picture:
        """The upload's preview (``previews.preview_upload``): checked and decoded as for every route."""
        chosen = parse_window(window)
        started = time.perf_counter()
        kind, picture = await self._on_worker(preview_upload, data, self.settings, chosen)
        timings.update(upload_kind=kind, upload_bytes=len(data),
                       decode_ms=round((time.perf_counter() - started) * 1000, 2))
        return picture

    async def thumbnail(self, case_id: str) -> Picture:
        """The thumbnail of an indexed case's image, from its stored path under the data root.

        ``CaseImageMissing`` (404) for an unknown case, a case with no stored path (DICOM, arrays) or
        no data root, or a file there that is not the indexed image (``ImageChanged``); ``PathRefused`` (403) for a
        stored path leaving the data root."""
        from ..index import ImageChanged, resolve_image

        index = self._require_index()
        if self.settings.data_root is None:
            raise CaseImageMissing("this service was started without a data root (medvl serve --data-root)")
        hit = await self.on_index(_find_case, index, case_id) if len(case_id) <= MAX_CASE_ID else None
        if hit is None:
            raise CaseImageMissing("no indexed case has this id")
        if hit.image_path is None:
            raise CaseImageMissing("the index stores no image path for this case (DICOM or array images)")
        try:  # on a worker: checking the file is the indexed image decodes it (once per file and version)
            path = await self._on_worker(resolve_image, hit, self.settings.data_root)
        except InputError:
            raise PathRefused("the stored image path of this case leaves the data root; refused") from None
        except ImageChanged:
            raise CaseImageMissing("the image under the data root is not the indexed one (the case was replaced "
                                   "from another folder, or the file overwritten since)") from None
        except DataError:
            raise CaseImageMissing("the image of this case is not found under the data root") from None
        if path is None:
            raise CaseImageMissing("the index stores no image path for this case")
        return await self._on_worker(thumbnail_file, path)

    # -- explanations and VQA (on the lane) --------------------------------------------------------
    def explain_methods(self) -> list[str]:
        """The heatmap methods an explanation uses when none are asked: ``SERVICE_METHODS`` that the model
        supports (``default_methods``: Grad-CAM on a CNN only)."""
        from ..explain.heatmaps import default_methods

        return default_methods(self.net, SERVICE_METHODS)

    async def explain(self, data: bytes, labels: list[str] | None, label_column: str | None,
                      methods: list[str] | None, top: int, k: int, timings: dict[str, Any]) -> dict[str, Any]:
        """``medvl explain``'s answer for one upload (``medvl.explain.explanation.explain_pixels``), each
        heatmap an RGBA PNG overlay (base64) of the preview's shape, its peak on that grid (``map_shape``, the
        overlay's shape: smaller than the image's when the image is larger than a preview), and the k nearest
        cases when an index is loaded."""
        from ..explain.explanation import explained_classes, nearest_cases
        from ..explain.heatmaps import heatmap_refusal
        from ..index.base import check_k
        from ..index.cases import pixel_sha256s

        refusal = heatmap_refusal(self.net.config.image)
        if refusal:  # before the upload is decoded, in medvl explain's words
            raise ModelError(refusal)
        # only no labels at all means the default (the captions' classes, as medvl explain's): labels given but all
        # blank are refused, as medvl explain refuses them
        classes = explained_classes(self.net, labels, label_column, bottleneck=self.bottleneck)  # medvl explain's
        # the lower of the service's limit and the number of labels: naming a limit the labels refuse in turn misleads
        check_number("top", top, minimum=1, maximum=min(self.settings.max_explain_top, len(classes)), integer=True)
        if self.index is not None:
            check_k(k)
        self.lane.check()
        chosen = methods or self.explain_methods()
        upload = await self.decode(data, timings)
        pixels = upload.decoded()
        shape = overlay_shape(pixels.shape)
        result, embedding = await self.lane.run(self._explain_on_lane, pixels, labels, label_column, chosen,
                                                top, shape, timings=timings)
        if self.index is not None:  # the upload's own indexed copies left out, and named
            digests = await self._on_worker(pixel_sha256s, pixels)  # as the index hashed its files' pixels
            result["neighbours"], result["left_out_copies"] = await self.on_index(
                nearest_cases, self.index, self.net, embedding, k, digests)
        await self._on_worker(_encode_overlays, result["findings"])
        return {"model": self.net.config.name, "image": {"kind": upload.kind, "bytes": upload.n_bytes,
                                                         "shape": list(pixels.shape[:2])},
                "overlay": {"shape": list(shape), "format": "image/png;base64 RGBA"},
                "methods": chosen, **result}

    def _explain_on_lane(self, pixels: np.ndarray, labels, label_column, methods, top, shape):
        from ..explain.explanation import explain_pixels

        return explain_pixels(self._explain_model(), pixels, labels=labels, label_column=label_column, methods=methods,
                              top=top, bottleneck=self.bottleneck, map_shape=shape)

    def _explain_model(self):
        """The served model's eager torch copy that explanations run (made at the first one, then kept): a deep
        copy of the served model on the ``torch`` backend; for another backend the folder's torch model, which must
        be the served one (``ServiceUnavailable`` otherwise: weights replaced since the start, or the folder no
        longer readable as a model, not kept: a redeploy may put the same model back), given the served
        model's guard and meta (an OOD guard fitted into the folder since is not the one the other routes use)."""
        from ..index.base import fingerprint_differs

        if self._explainer is not None:
            return self._explainer
        if self._explainer_refusal is not None:
            raise ServiceUnavailable(self._explainer_refusal)
        if self.settings.backend == "torch":
            model = copy.deepcopy(self.net)
        else:
            try:
                model = load_model(self.model_dir, load_guard=False)
            except ModelError as error:  # the server's folder, mid-redeploy or removed: not the client's fault (422)
                log.warning("explanations cannot load the served model folder (%s)", type(error).__name__)  # no path
                raise ServiceUnavailable(
                    f"the model folder {self.model_dir.name} cannot be read since the start (changed or removed): "
                    f"explanations need its torch copy ({self.settings.backend} serves the other routes); restore "
                    "the folder or restart the service") from None
            changed = fingerprint_differs(model_fingerprint(self.net), model)
            if changed is not None:
                self._explainer_refusal = (
                    f"the model folder {self.model_dir.name} holds other {changed} than the model this service "
                    f"loaded at start (replaced since): explanations need its torch copy ({self.settings.backend} "
                    "serves the other routes); restart the service to serve and explain the folder's model")
                raise ServiceUnavailable(self._explainer_refusal)
            model.ood = getattr(self.net, "ood", None)
            model.meta = {key: value for key, value in copy.deepcopy(self.net.meta).items() if key != "backend"}
        model.eval()
        self._explainer = model
        return model

    def vqa_image_limit(self) -> int:
        """Images per question: the VQA model's own limit, within the service's ``max_vqa_images``."""
        from ..models.vqa import VQAModel

        if self.vqa is None:
            return 0
        own = self.vqa.config.max_images if isinstance(self.vqa, VQAModel) else self.vqa.max_images
        return min(own, self.settings.max_vqa_images)

    def check_vqa_request(self, count: int, question: str) -> str:
        """The question, stripped, if this service has a VQA model (else 409) and ``count`` images fit it."""
        from ..eval.vqa import check_question

        if self.vqa is None:
            raise NotLoaded("this service was started without a VQA model (medvl serve --vqa-model DIR)")
        question = check_question(question, "question", self.vqa)
        limit = self.vqa_image_limit()
        if not 1 <= count <= limit:
            raise InputError(f"{count} images given; the VQA model takes 1 to {limit} per question "
                             "(the field image, once per image)")
        return question

    async def vqa_answer(self, images: Sequence[bytes], question: str, timings: dict[str, Any]) -> dict[str, Any]:
        """``medvl vqa --json``'s answer (``api.answer_pixels``) about the uploads, earlier film first."""
        from ..api import answer_pixels

        question = self.check_vqa_request(len(images), question)
        self.lane.check()
        # read as the VQA model reads files (medvl vqa): its own HU windows, if any, not the dual encoder's
        uploads = [await self._decode_film(data, number, len(images), timings) for number, data in enumerate(images, 1)]
        timings.update(upload_bytes=sum(upload.n_bytes for upload in uploads))
        result = await self.lane.run(answer_pixels, self.vqa, [upload.decoded() for upload in uploads], question,
                                     timings=timings)
        return {"model": result.pop("model"),
                "images": [{"kind": upload.kind, "bytes": upload.n_bytes} for upload in uploads], **result}

    async def _decode_film(self, data: bytes, number: int, count: int, timings: dict[str, Any]) -> Upload:
        """One of a VQA request's uploads, decoded as the VQA model reads files; of several, a refusal names
        which (``image 2: ...``), as ``medvl vqa`` names the file."""
        try:
            return await self.decode(data, timings, for_vqa=True)
        except UploadRejected as error:
            if count == 1:
                raise
            raise UploadRejected(error.status, f"image {number} of {count}: {error}") from None

    def _labeller(self):
        if self.labeller is None:
            from ..rag import ReportLabeller, load_knowledge

            self.labeller = ReportLabeller(load_knowledge(self.settings.knowledge,
                                                          builtin=self.settings.builtin_knowledge))
        return self.labeller


def _find_case(index, case_id: str):
    """The indexed case with this id (a ``Hit``), or None: a search filtered on the id (exact, among
    the one case the filter allows; the query vector does not matter)."""
    literal = case_id.replace("'", "''")  # the filter language's quoting; the id is a bound parameter
    if len(literal) > WHERE_LENGTH - len("id = ''"):  # quoting doubled it past the filter's length: no such id
        return None
    hits = index.search(np.zeros((1, index.dim), np.float32), k=1, where=f"id = '{literal}'")[0]
    return hits[0] if hits and hits[0].id == case_id else None


def _load_vqa(folder: Path | None):
    """The VQA model of ``--vqa-model`` (a medvl VQA folder or a transformers VLM folder), or None."""
    if folder is None:
        return None
    from ..models.vqa import load_vqa_model

    model = load_vqa_model(folder)
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model


def _load_bottleneck(path: Path | None, net):
    """The concept bottleneck of ``--bottleneck``, checked against the served model (``check_model``), or None."""
    if path is None:
        return None
    from ..explain.concepts import ConceptBottleneck

    bottleneck = ConceptBottleneck.load(path)
    try:
        bottleneck.check_model(net)
    except ModelError as error:
        raise InputError(str(error)) from None  # it names the file
    return bottleneck


def _encode_overlays(findings: list[dict[str, Any]]) -> None:
    """Each finding's heatmap maps, in place, as base64 RGBA PNG overlays (``previews.heatmap_overlay``)."""
    for finding in findings:
        for heatmap in finding["heatmaps"].values():
            heatmap["png"] = base64.b64encode(png_bytes(heatmap_overlay(heatmap.pop("map")))).decode("ascii")


class NotLoaded(MedvlError):
    """A model this service instance was not started with (HTTP 409: asking again will not help)."""

    status = 409


class CaseImageMissing(MedvlError):
    """No image to show for a case (HTTP 404)."""

    status = 404


class PathRefused(MedvlError):
    """A stored path that would lead outside the data root (HTTP 403)."""

    status = 403


class ServiceUnavailable(MedvlError):
    """A capability this service instance was not started with (HTTP 503)."""

    status = 503


class ModelLoading(ServiceUnavailable):
    """The model is still loading (HTTP 503 with ``Retry-After``: unlike a failed load, asking again helps)."""

    retry_after = 2  # seconds


def _note(timings: dict[str, Any], batch: BatchTiming) -> None:
    timings.update(queue_ms=round(batch.queue_ms, 2), model_ms=round(batch.model_ms, 2),
                   batch_size=batch.batch_size)
