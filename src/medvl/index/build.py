"""Embedding a dataset into an index: a resumable, atomic build, and incremental adds.

Both read each image once: its decoded pixels give the duplicate-detection hash and the
embedding. Worker processes read and resize the next batches while the model embeds this one
(``medvl.data.loading``); any number of workers gives the same cases and vectors (to float
rounding: beside workers the model runs on fewer threads). NIfTI volumes are
read twice to keep memory bounded: hashed while streamed slab by slab from disk, then resized
from the path (``medvl.models.volumes`` streams them again), so a large CT is never held decoded
whole. A case whose image is already indexed (or appears
earlier in the same data) is skipped and reported, unless duplicates are allowed; on add, a case whose id
is already indexed with the same image, report, labels, metadata and split is left as it is (``add_records``).

What a case stores comes from its record (id, split, labels, meta, text, pixel hash, and its image's
path relative to the dataset root: none for DICOM files, arrays or files outside the root); the
index info records the data only by a hash of its path (docs/index-contents.md).
DICOM headers are never read here, only pixels. DICOM records come from
``medvl.data.loaders.dicom``, whose ids are hashed UIDs and whose metadata is an allow-list of
acquisition facts, so no DICOM identifier (name, ID, date, institution, raw UID) reaches an index
(``tests/test_pacs.py`` searches every byte of FAISS and pgvector indexes built from identified DICOM).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_number
from ..data.images import image_suffix
from ..data.loading import batched, map_ahead, resolve_workers
from ..data.record import Dataset, Record, records_digest
from ..embed import texts_read_cut
from ..errors import DataError, InputError
from ..models.backends import resolve_backend
from ..progress import progress_bar
from .backends import check_kind, open_builder
from .base import INFO_FORMAT, Index, check_model, check_vectors, is_url, model_fingerprint, path_sha256
from .cases import (
    Case,
    check_ids_are_not_paths,
    check_no_nul,
    check_unique_ids,
    column_values,
    dataset_root,
    infer_columns,
    pixel_sha256,
    pixel_sha256s,
)

log = logging.getLogger(__name__)


def read_batch(preprocessor, records: Sequence[Record], *, older: bool = True
               ) -> tuple[list[str], np.ndarray, list[tuple[str, ...]]]:
    """Each record's pixel hash, its image as the model's [0, 1] input, stacked (float32), and the other hashes
    older indexes may hold the same picture under (``hashed_image``: ``index add`` looks duplicates up by them too;
    ``older=False``: none, empty tuples); run in a worker process by ``build_index`` / ``add_records``
    (``medvl.data.loading.map_ahead``). A NIfTI volume is hashed slab by slab from disk, then resized from its
    path (``medvl.models.volumes`` streams it again), so a large CT is never held decoded whole; a DICOM series
    (``DicomVolume``) is decoded like a file."""
    digests, pixels, others = [], [], []
    for record in records:
        hashes, image = hashed_image(preprocessor, record.image, older=older)
        digests.append(hashes[0])  # an error names the file, or the record of an array
        others.append(hashes[1:])
        pixels.append(preprocessor.load(image, source=_source(record)))
    return digests, torch.stack(pixels).numpy(), others


def read_new_batch(preprocessor, records: Sequence[Record]) -> tuple[list[str], np.ndarray, list[tuple[str, ...]]]:
    """``read_batch`` for a new index, which holds every image under its ``pixel_sha256`` only: the hashes older
    indexes took (a grey image's RGB and RGBA copies, several times the bytes to hash) are not computed."""
    return read_batch(preprocessor, records, older=False)


def _source(record: Record) -> str | Path:
    """What an error about a record's image names: its file, or the record of an array or a DICOM series."""
    return record.image if isinstance(record.image, str | Path) else f"record {record.id}"


def read_digests(preprocessor, records: Sequence[Record]) -> list[tuple[str, ...]]:
    """Each record's pixel hashes (``hashed_image``: the one ``read_batch`` gives first), run in a worker process by
    ``add_records``."""
    return [hashed_image(preprocessor, record.image)[0] for record in records]


def hashed_image(preprocessor, image: Any, *, older: bool = True) -> tuple[tuple[str, ...], Any]:
    """The pixel hashes an index may hold ``image`` (a file, a DICOM series, an array) under, the one it records
    first (``cases.pixel_sha256s``: of the image as the model reads its channels, then, unless ``older`` is False,
    those of older indexes where they differ), and what ``preprocessor.load`` is then given: the pixels read, or a
    NIfTI's path (hashed slab by slab)."""
    if isinstance(image, str | Path) and image_suffix(image) in (".nii", ".nii.gz"):
        return (nifti_sha256(image),), image
    array = image if isinstance(image, np.ndarray) else preprocessor.read(image)
    spatial_dims = preprocessor.config.spatial_dims
    return (pixel_sha256s(array, spatial_dims) if older else (pixel_sha256(array, spatial_dims),)), array


def nifti_sha256(path) -> str:
    """Hash of a NIfTI volume's voxel values (after scaling), its shape and orientation, read slab by
    slab: equal for the same volume saved as .nii and .nii.gz or under another name."""
    from ..clinical.nifti import NiftiSlabs

    volume = NiftiSlabs(path)
    digest = hashlib.sha256(f"nifti{volume.shape}{volume.ras_axes}{volume.ras_flips}".encode())
    for slab in volume.slabs():
        digest.update(np.ascontiguousarray(slab).tobytes())
    return digest.hexdigest()


def embed_records(model, records: Sequence[Record], read: tuple[list[str], np.ndarray, Any],
                  known_images: dict[str, str],
                  allow_duplicates: bool = False, root: Path | None = None,
                  ) -> tuple[list[Case], np.ndarray, np.ndarray, list[dict]]:
    """Cases, image and report embeddings of ``records`` read by ``read_batch``, minus duplicates
    (only the cases kept go through the model).

    ``known_images`` (pixel hash -> case id) is updated with the cases kept. Report embeddings of
    cases without text are zero rows. ``root`` is the dataset root image paths are stored relative
    to (None: no paths). Returns (cases, image vectors, text vectors, duplicates).
    """
    digests, pixels = read[0], read[1]
    kept, rows, duplicates = _new_cases(records, digests, known_images, allow_duplicates, root)
    vectors, text_vectors = embed_batch(model, torch.from_numpy(pixels[rows]), [case.text for case in kept])
    _check_finite([records[row] for row in rows], vectors)
    return kept, vectors, text_vectors, duplicates


def embed_batch(model, images: Sequence[Any] | torch.Tensor, texts: Sequence[str | None]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings of ``images`` (decoded arrays, NIfTI paths, or a batch of model-ready pixels)
    and report embeddings of ``texts`` (zero rows where there is no text), as float32 (N, dim) arrays."""
    dim = model.config.embed_dim
    if len(images) == 0:
        return np.empty((0, dim), np.float32), np.empty((0, dim), np.float32)
    batch = images if isinstance(images, torch.Tensor) else list(images)
    vectors = model.encode_images(batch, batch_size=len(images)).numpy().astype(np.float32, copy=False)
    text_vectors = np.zeros((len(images), dim), np.float32)
    with_text = [i for i, text in enumerate(texts) if text]
    if with_text:
        text_vectors[with_text] = model.encode_texts([texts[i] or "" for i in with_text]).numpy()
    return vectors, text_vectors


def warn_reports_cut(model, cases: Sequence[Case]) -> None:
    """Warn, with a count (reports are patient data: never their text or ids), when reports of ``cases`` have more
    tokens than the model's text tower reads: their vectors leave the rest out, so a text search does not see it
    (long reports are normal: they are indexed, not refused as a query text is)."""
    reports = [case.text for case in cases if case.text]
    cut, limit = texts_read_cut(model, reports)
    if cut:
        log.warning("%d of %d reports embedded are longer than the model's text encoder reads (%d tokens): their "
                    "report vectors leave the rest out", cut, len(reports), limit)


def keep_new(batch: Sequence[Record], digests: Sequence[str], vectors: np.ndarray, text_vectors: np.ndarray,
             known_images: dict[str, str], allow_duplicates: bool, root: Path | None
             ) -> tuple[list[Case], np.ndarray, np.ndarray, list[dict]]:
    """``embed_records`` for batches embedded elsewhere (every record embedded): the same cases and
    duplicates, in the same order."""
    kept, rows, duplicates = _new_cases(batch, digests, known_images, allow_duplicates, root)
    _check_finite([batch[row] for row in rows], vectors[rows])
    return kept, vectors[rows], text_vectors[rows], duplicates


def _check_finite(records: Sequence[Record], vectors: np.ndarray) -> None:
    """DataError naming the image of the first record whose embedding holds NaN or infinity: stored, it would count
    as a case that no search can find."""
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataError(_source(records[int(np.argmin(finite))]), "its image embedding contains NaN or infinite "
                                                                  "values; it cannot be indexed")


def _new_cases(records: Sequence[Record], digests: Sequence[str], known_images: dict[str, str],
               allow_duplicates: bool, root: Path | None) -> tuple[list[Case], list[int], list[dict]]:
    """The cases of ``records`` whose image is not known yet (``known_images`` updated), their rows, and
    the duplicates skipped (each with the case its image belongs to)."""
    kept, rows, duplicates = [], [], []
    for row, (record, digest) in enumerate(zip(records, digests, strict=True)):
        if digest in known_images and not allow_duplicates:
            duplicates.append({"id": record.id, "duplicate_of": known_images[digest]})
            continue
        known_images.setdefault(digest, record.id)
        kept.append(Case.from_record(record, digest, root))
        rows.append(row)
    return kept, rows, duplicates


# Embeds batches somewhere else (``medvl.scale.ray_jobs.RayEmbedder``): called with the dataset, the
# records still to do, the batch size and the fingerprint the index records (``model_fingerprint``: the
# embedder must embed with that model, and refuse another); yields (records, pixel hashes, image vectors,
# text vectors).
Embedder = Callable[[Dataset, Sequence[Record], int, dict[str, Any]],
                    Iterator[tuple[list[Record], list[str], np.ndarray, np.ndarray]]]


def check_batch_size(batch_size: int) -> None:
    """InputError unless the batch size is a whole number >= 1 (callers may check before loading data)."""
    check_number("batch_size", batch_size, minimum=1, integer=True)


def new_info(backend: str, fingerprint: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """The info of a new index. Of the data it keeps a hash of its path, never the path (a folder
    above the data may be named after a patient)."""
    return {"format": INFO_FORMAT, "backend": backend, "embed_dim": fingerprint["embed_dim"],
            "model": fingerprint, "data": {"source_sha256": path_sha256(dataset.source), "n_records": len(dataset)},
            "label_columns": list(dataset.default_labels), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def build_index(model, dataset: Dataset, out: str | Path, *, model_dir: str | Path | None = None,
                batch_size: int = 32, kind: str = "auto", allow_duplicates: bool = False,
                show_progress: bool = True, embedder: Embedder | None = None, workers: int | None = None
                ) -> dict[str, Any]:
    """Embed every record of ``dataset`` into a new index at ``out`` (a folder, or a Postgres
    URL), replacing any index there only once the new one is complete.

    Each batch is checkpointed; rerunning the same build after a crash resumes where it stopped.
    ``embedder`` (e.g. ``RayEmbedder``: workers on a Ray cluster) embeds the batches instead of
    ``model`` in this process; the index is the same (it is given ``model``'s fingerprint and refuses to embed
    with another model: a model folder changed since ``model`` was loaded). Otherwise ``workers`` processes read
    and resize the images ahead of the model (``medvl.data.loading``; None: auto, 0: in this process).
    Image paths are stored relative to the dataset's root (``dataset_root``); none for DICOM. Records the
    model cannot take (a DICOM folder's 3D series for a 2D model, its 2D images for a 3D one) are left
    out, with a warning (``Dataset.for_spatial_dims``).
    Returns the index info plus ``duplicates`` (skipped cases) and ``resumed`` (cases found done).
    """
    check_batch_size(batch_size)
    check_kind(out, kind)
    started = time.perf_counter()
    dataset = dataset.for_spatial_dims(model.config.image.spatial_dims)  # a DICOM folder's other kind left out
    records = list(dataset)
    check_ids_are_not_paths([r.id for r in records], dataset.source)
    check_unique_ids([Case(id=r.id) for r in records], dataset.source)
    check_no_nul(records, dataset.source)
    check_kind(out, kind, len(records), sum(1 for r in records if r.text))  # before any image is read
    workers = resolve_workers(workers, len(records))
    columns = infer_columns(Case.from_record(r) for r in records)
    fingerprint = model_fingerprint(model, model_dir)
    backend = encoder_backend(model, model_dir, embedder)
    key = _build_key(dataset, records, fingerprint, columns, kind, allow_duplicates, backend)
    builder = open_builder(out, key, columns, fingerprint["embed_dim"])
    try:
        done, known = builder.done_ids(), builder.known_images()
        todo = [r for r in records if r.id not in done]
        duplicates: list[dict] = []
        embedded: list[Case] = []
        with progress_bar("Indexing cases", total=len(records), enabled=show_progress) as advance:
            advance(len(records) - len(todo))
            root = dataset_root(dataset)
            for batch, cases, vectors, text_vectors, skipped in _embedded(model, dataset, todo, batch_size, known,
                                                                          allow_duplicates, root, embedder, workers,
                                                                          fingerprint):
                duplicates += skipped
                embedded += cases
                if cases:  # checked as index add checks them: no NaN or infinite vector is stored
                    dim = fingerprint["embed_dim"]
                    builder.append(cases, check_vectors(vectors, dim, "case"),
                                   check_vectors(text_vectors, dim, "report"))
                advance(len(batch))
        if duplicates:
            # counted only: ids can be accession numbers; the result's "duplicates" lists each with its original
            log.warning("skipped %d cases whose image is already indexed (listed in the result's duplicates)",
                        len(duplicates))
        warn_reports_cut(model, embedded)
        info = new_info("pgvector" if is_url(out) else "faiss", fingerprint, dataset)
        info["encoder_backend"] = backend  # every vector's: a resumed build's key holds it, index add keeps it
        info = builder.finish(info, kind)
    finally:
        builder.close()
    return {**info, "duplicates": duplicates, "resumed": len(done),
            "seconds": round(time.perf_counter() - started, 2)}


def _embedded(model, dataset: Dataset, todo: Sequence[Record], batch_size: int, known: dict[str, str],
              allow_duplicates: bool, root: Path | None, embedder: Embedder | None, workers: int,
              fingerprint: dict[str, Any]):
    """(batch, cases, image vectors, text vectors, duplicates) per batch of ``todo``, in order; the
    images are read by ``workers`` processes ahead of the model (or ``embedder`` embeds them with the
    model ``fingerprint`` describes)."""
    if embedder is None:
        for batch, read in _read_ahead(model, todo, batch_size, workers, older=False):  # a new index
            yield batch, *embed_records(model, batch, read, known, allow_duplicates, root)
        return
    for batch, digests, vectors, text_vectors in embedder(dataset, todo, batch_size, fingerprint):
        yield batch, *keep_new(batch, digests, vectors, text_vectors, known, allow_duplicates, root)


def _read_ahead(model, records: Sequence[Record], batch_size: int, workers: int, *, older: bool = True
                ) -> Iterator[tuple[Sequence[Record], tuple[list[str], np.ndarray, list[tuple[str, ...]]]]]:
    """Each batch of ``records`` with its ``read_batch`` result (``older``: with the hashes older indexes took),
    read by ``workers`` processes ahead."""
    batches = list(batched(records, batch_size))
    reads = map_ahead(read_batch if older else read_new_batch, batches, workers, context=model.preprocessor)
    yield from zip(batches, reads, strict=True)


def encoder_backend(model, model_dir: str | Path | None = None, embedder: Embedder | None = None) -> str:
    """The backend the vectors of ``model`` (or ``embedder``) are computed on: ``torch`` for a model made in
    Python. It is recorded as the index's ``encoder_backend``: bf16 / int8 vectors differ a little from eager
    fp32's, so one index holds vectors of one backend (queries may use any)."""
    backend = getattr(embedder, "backend", None) or getattr(model, "meta", {}).get("backend") or "torch"
    return resolve_backend(model_dir, backend) if backend == "auto" and model_dir is not None else backend


def check_encoder_backend(index: Index, model) -> None:
    """InputError, naming both, when ``model`` runs on another backend than the index's vectors were made on."""
    indexed, given = index.info.get("encoder_backend", "torch"), encoder_backend(model)
    if given != indexed:
        raise InputError(f"{index.location}: its vectors were embedded on backend {indexed!r}, this model runs on "
                         f"{given!r}; add with backend {indexed!r} (--backend {indexed}; Python: "
                         f"load_model(..., backend={indexed!r})) so that every vector is of one kind")


def _build_key(dataset: Dataset, records: Sequence[Record], fingerprint: dict, columns: dict, kind: str,
               allow_duplicates: bool, backend: str) -> str:
    """Identifies a build: a rerun resumes only a build of the same data, model, backend and settings (a rerun
    on another backend starts afresh: one index holds vectors of one backend). The data is its
    records as they are now (``data.record.records_digest``), so a rerun after a report, label or image was corrected
    starts afresh instead of keeping the cases stored before the change; its path and its image files are taken
    resolved, so the same data named another way (an absolute path, from another working directory) resumes."""
    source = str(Path(dataset.source).resolve()) if dataset.source else None
    settings = {"data": source, "records": records_digest(records, resolved=True), "model": fingerprint,
                "columns": columns, "kind": kind, "allow_duplicates": allow_duplicates, "backend": backend}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def add_records(index: Index, model, dataset: Dataset, *, batch_size: int = 32, allow_duplicates: bool = False,
                show_progress: bool = True, workers: int | None = None, replace: bool = False) -> dict[str, Any]:
    """Add the records of ``dataset`` not yet in ``index`` (by id), then ``save()`` once; image
    paths are stored relative to this dataset's root, and images read, as in ``build_index``.

    A record whose id is indexed with the same pixels, report, labels, metadata and split is left as it is
    (``already_present``). One whose id is indexed with another image, report, labels, metadata or split (a second
    export with the same layout, a corrected report, label or metadata, a record moved to another split) is an
    ``InputError`` naming how many and one id, before anything changes;
    ``replace=True`` replaces those cases instead (``replaced``). A replacement whose image is already indexed
    under another id (or comes earlier in the data) would be skipped as a duplicate after its case was
    deleted: unless duplicates are allowed, that is an ``InputError`` too, and the index is left unchanged."""
    check_batch_size(batch_size)
    check_model(index.info, model, index.location)
    check_encoder_backend(index, model)
    dataset = dataset.for_spatial_dims(model.config.image.spatial_dims)  # a DICOM folder's other kind left out
    records = list(dataset)
    check_ids_are_not_paths([r.id for r in records], dataset.source)
    check_unique_ids([Case(id=r.id) for r in records], dataset.source)
    check_no_nul(records, dataset.source)
    for record in records:  # before any image is read: a value the index's numeric columns cannot take
        column_values(Case.from_record(record), index.info["columns"], dataset.source, index.location)
    workers = resolve_workers(workers, len(records))
    present = index.existing_ids([r.id for r in records])
    new_images = _changed_cases(index, model, [r for r in records if r.id in present], batch_size, workers)
    changed = list(new_images)
    if changed and not replace:
        raise InputError(f"{dataset.source}: {len(changed)} cases have an id already in the index {index.location} "
                         f"but another image, report, labels, metadata or split (e.g. {changed[0]!r}); pass "
                         "--replace (Python: replace=True) to replace them, or give them other ids")
    if changed and not allow_duplicates:
        _check_replacements_are_new(index, new_images, dataset.source)
    if changed:
        index.delete(changed)  # staged, as the additions: saved at once with them
    todo = [r for r in records if r.id not in present or r.id in new_images]
    if len(present) > len(changed):
        log.warning("%d cases are already in the index (same id, image, report, labels, metadata and split) and were "
                    "left as they are", len(present) - len(changed))
    added, duplicates, known, embedded = 0, [], {}, []
    with progress_bar("Adding cases", total=len(todo), enabled=show_progress) as advance:
        for batch, read in _read_ahead(model, todo, batch_size, workers):
            known.update(_indexed_images(index, read[0], read[2]))
            cases, vectors, text_vectors, skipped = embed_records(model, batch, read, known, allow_duplicates,
                                                                  dataset_root(dataset))
            duplicates += skipped
            embedded += cases
            if cases:
                index.add(cases, vectors, text_vectors)
                added += len(cases)
            advance(len(batch))
    warn_reports_cut(model, embedded)
    lost = [d for d in duplicates if d["id"] in new_images]
    if lost:  # its old case is deleted (staged): refused before the save, the index is left as it was
        _refuse_duplicate_replacements(lost, index, dataset.source)
    index.save()
    replaced = len(set(changed) & index.existing_ids(changed)) if changed else 0
    return {"added": added - replaced, "already_present": len(present) - len(changed), "replaced": replaced,
            "duplicates": duplicates, "n_cases": len(index)}


def _indexed_images(index: Index, digests: Sequence[str], others: Sequence[Sequence[str]]) -> dict[str, str]:
    """Pixel hash -> the indexed case holding that image, for the ``digests`` of a batch (``read_batch``), also when
    an index built before hashes were taken of the model's channels holds it under one of its ``others`` (a grey film
    saved as RGB there): a duplicate all the same."""
    found = index.find_images(list(digests) + [digest for hashes in others for digest in hashes])
    known = {digest: ids[0] for digest, ids in found.items() if digest in set(digests)}
    for digest, hashes in zip(digests, others, strict=True):
        owner = next((found[other][0] for other in hashes if other in found), None)
        if owner is not None:
            known.setdefault(digest, owner)
    return known


def _changed_cases(index: Index, model, records: Sequence[Record], batch_size: int, workers: int) -> dict[str, str]:
    """Id -> new pixel hash of the ``records`` (indexed ids) whose pixels, report, labels, metadata or split differ from
    the indexed case's, in order."""
    if not records:
        return {}
    stored = index.stored_contents([r.id for r in records])
    batches = list(batched(records, batch_size))
    digests = [d for ds in map_ahead(read_digests, batches, workers, context=model.preprocessor) for d in ds]
    cases = [Case.from_record(r) for r in records]
    # an index built before hashes were taken of the model's channels holds a grey film saved as RGB under its
    # other hash (``hashed_image``): the same image all the same
    return {case.id: hashes[0] for case, hashes in zip(cases, digests, strict=True)
            if stored[case.id][0] not in hashes
            or stored[case.id][1:] != (case.text, _canonical(case.labels), _canonical(case.meta), case.split)}


def _canonical(values: dict[str, Any]) -> str:
    """Labels or metadata as compared with the stored ones: JSON with sorted keys, read back as stored (a NaN equals
    a NaN, key order is not kept)."""
    return json.dumps(json.loads(json.dumps(values)), sort_keys=True)


def _check_replacements_are_new(index: Index, new_images: dict[str, str], source: str) -> None:
    """InputError when a replacement's image (``new_images``: id -> pixel hash) is that of an indexed case that
    stays (not one being replaced), or of an earlier replacement: it would be skipped as a duplicate."""
    owners = index.find_images(list(new_images.values()))
    first: dict[str, str] = {}
    clashes = []
    for case_id, digest in new_images.items():
        others = [owner for owner in owners.get(digest, []) if owner not in new_images]
        if others or digest in first:
            clashes.append({"id": case_id, "duplicate_of": others[0] if others else first[digest]})
        first.setdefault(digest, case_id)
    if clashes:
        _refuse_duplicate_replacements(clashes, index, source)


def _refuse_duplicate_replacements(clashes: list[dict], index: Index, source: str) -> None:
    example = clashes[0]
    raise InputError(f"{source}: {len(clashes)} cases to replace have an image already in the index {index.location} "
                     f"or earlier in the data under another id (e.g. {example['id']!r}: the image of "
                     f"{example['duplicate_of']!r}); pass --allow-duplicates (Python: allow_duplicates=True) to "
                     "replace them anyway, or leave them out")
