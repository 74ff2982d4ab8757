"""Image<->text retrieval: Recall@K and median rank over a dataset's own image-report pairs."""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checks import check_number
from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError
from ..index.cases import pixel_sha256
from ..models.dual import DualEncoder
from .metrics import recall_at_k, retrieval_ranks

log = logging.getLogger(__name__)

BRIDGE_CHUNK = 256  # queries whose bank similarities are held at once


@dataclass
class CaptionBridge:
    """Captions of the nearest bank images as a second vote in image->text ranking (retrieval-augmented,
    as MMed-RAG retrieves similar cases): for a query image, the ``k`` bank images nearest to it (image
    embedding cosine) each bring their own caption, and a gallery text scores the mean cosine between those
    captions and it, in the model's text space. The ranking score is ``z(image-text cosine) + weight x
    z(that mean)``, ``z`` a standardisation over the gallery per query. The bank is data the model may see
    (its training images and captions), never the images being scored. docs/benchmarks.md (MedPix) has how
    it was checked.
    """

    image_embeddings: torch.Tensor  # (bank, dim), unit norm
    text_embeddings: torch.Tensor  # (bank, dim), unit norm: each bank image's own caption
    k: int = 10
    weight: float = 1.0

    @classmethod
    def from_dataset(cls, model: DualEncoder, bank: Dataset, k: int = 10, weight: float = 1.0,
                     show_progress: bool = True) -> CaptionBridge:
        """The bank's records with a text (images embedded by ``model``, captions by its text tower)."""
        check_number("bridge k", k, minimum=1, maximum=1000, integer=True)
        check_number("bridge weight", weight, minimum=0, maximum=1000)
        records = [r for r in bank if r.text]
        if len(records) < k:
            raise InputError(f"{bank.source}: the caption bridge needs at least k={k} records with text, "
                             f"got {len(records)}")
        subset = bank.subset(records)
        return cls(embed_images(model, subset, show_progress=show_progress),
                   model.encode_texts([r.text or "" for r in records]), k, weight)

    def scores(self, image_emb: np.ndarray, text_emb: np.ndarray, similarity: np.ndarray) -> np.ndarray:
        """The bridged image->text scores of queries ``image_emb`` against gallery ``text_emb`` (their plain
        cosines: ``similarity``). Queries go in chunks, so memory grows with the chunk times the bank, not
        with all queries times the bank."""
        bank_images, bank_texts = self.image_embeddings.numpy(), self.text_embeddings.numpy()
        k = min(self.k, len(bank_images))
        votes = np.empty_like(similarity)
        for start in range(0, len(image_emb), BRIDGE_CHUNK):
            near = -(image_emb[start:start + BRIDGE_CHUNK] @ bank_images.T)
            nearest = np.argpartition(near, k - 1, axis=1)  # the k nearest first, in no particular order
            # the mean of the k cosines = the cosine with the mean of the k captions
            votes[start:start + BRIDGE_CHUNK] = bank_texts[nearest[:, :k]].mean(axis=1) @ text_emb.T
        return _standardise(similarity) + self.weight * _standardise(votes)


def _standardise(scores: np.ndarray) -> np.ndarray:
    spread = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1.0)


def retrieval(model: DualEncoder | Sequence[DualEncoder], dataset: Dataset, ks: Sequence[int] = (1, 5, 10),
              show_progress: bool = True, image_embeddings: torch.Tensor | Sequence[torch.Tensor] | None = None,
              keep_ranks: bool = False, bridge: CaptionBridge | Sequence[CaptionBridge] | None = None,
              content: list[dict[str, str]] | None = None) -> dict:
    """Image->text and text->image retrieval among all texts / images of the dataset.

    The galleries hold each image once and each text once: records of one image (one file, or an array's
    pixels) with several captions share a gallery image, and records whose texts are the same text (identical,
    or differing only in letter case or spacing that every model ignores: the same token ids,
    ``DualEncoder.text_tokens``) share a gallery text. A query counts as a hit at the best rank of any of its
    texts (image->text) or images (text->image), so a perfect model scores R@1 = 1 in both directions.
    Distinct texts that every model reads alike (the same token ids: words its vocabulary lacks, read as the
    unknown token, or differences past the tower's length) or embeds alike (cosine within ``SAME_EMBEDDING``
    of 1: a text tower that cannot tell them apart, or has collapsed) stay apart as ties, and ties count
    against the query; ``texts_embedded_alike`` counts them (with a warning). ``n_images`` and ``n_texts``
    count the galleries, ``n_records`` the pairs.
    ``image_embeddings`` (aligned with ``dataset``) skips embedding.
    ``keep_ranks`` adds each query's 1-based rank (``ranks``) to each direction's block, and beside it
    ``query_records``: the position in ``dataset`` of each query's first record (an image's, or a text's: a text
    that several records share is the query of the first of them), so a caller can give each query its record's
    case (a cluster bootstrap, as ``bench run`` draws them). ``bridge``
    re-scores image->text with the captions of the nearest bank images (``CaptionBridge``; text->image
    stays the plain cosine ranking), and the result gets a ``bridge`` block with its settings.

    ``model`` may be a list of models (an ensemble, e.g. one recipe trained with several seeds): each
    member's scores are standardised over the gallery per query and averaged, and the result gets an
    ``ensemble`` block. ``image_embeddings`` and ``bridge`` are then lists with one entry per member.

    ``content``, a list, gets the ``input_flags`` of each scored image (the records with text) as the first
    member sees it, when that member embeds them here (not from ``image_embeddings``).
    """
    members: list[DualEncoder] = list(model) if isinstance(model, Sequence) else [model]
    if not members:
        raise InputError("retrieval needs at least one model")
    embeddings = _per_member("image_embeddings", image_embeddings, len(members))
    bridges = _per_member("bridge", bridge, len(members))
    with_text = [i for i, r in enumerate(dataset) if r.text]
    records = [dataset[i] for i in with_text]
    if len(records) < 2:
        raise InputError(f"{dataset.source}: retrieval needs at least 2 records with text, got {len(records)}")
    # one gallery image per image (records of one image with several captions share it)
    image_of: dict = {}  # image key -> gallery image
    first_record: list[int] = []  # gallery image -> its first record
    record_image: list[int] = []  # record -> gallery image
    for i, record in enumerate(records):
        key = _image_key(record.image)
        if key not in image_of:
            image_of[key] = len(first_record)
            first_record.append(i)
        record_image.append(image_of[key])
    gallery_texts, text_of, read_alike = _gallery_texts(members, [r.text or "" for r in records])
    subset = dataset.subset([records[i] for i in first_record])
    image_embs: list[np.ndarray] = []
    text_embs: list[np.ndarray] = []
    for number, (member, given) in enumerate(zip(members, embeddings, strict=True)):
        if given is not None:
            if len(given) != len(dataset):
                raise InputError(f"{len(given)} embeddings for {len(dataset)} records")
            image_embs.append(given[[with_text[i] for i in first_record]].numpy())
        else:
            image_embs.append(embed_images(member, subset, show_progress=show_progress,
                                           content=content if number == 0 else None).numpy())
        text_embs.append(member.encode_texts(gallery_texts).numpy())
    # distinct texts that every member reads or embeds alike stay apart, as exact ties (below), and ties count
    # against the query: a collapsed text tower, or one that reads every report as unknown tokens, scores as
    # chance or worse, not as a perfect model with one gallery text
    alike = _joined_groups(read_alike, _same_embedding_groups(text_embs))
    tied = _tied_texts(alike)
    if tied:
        log.warning("%d of the %d distinct texts are embedded alike to another one (the same token ids, or "
                    "cosine within %g of 1): the model cannot tell them apart; they are ranked as ties, against "
                    "the model", tied, len(gallery_texts), SAME_EMBEDDING)
    image_to_text: list[list[int]] = [[] for _ in first_record]
    text_to_images: list[list[int]] = [[] for _ in gallery_texts]
    for i, record in enumerate(records):
        image, text = record_image[i], text_of[record.text]
        if text not in image_to_text[image]:
            image_to_text[image].append(text)
            text_to_images[text].append(image)
    scores: list[tuple[np.ndarray, np.ndarray]] = []  # per member: (image->text, text->image)
    for image_emb, text_emb, member_bridge in zip(image_embs, text_embs, bridges, strict=True):
        similarity = image_emb @ text_emb.T
        scores.append((similarity if member_bridge is None else member_bridge.scores(image_emb, text_emb, similarity),
                       similarity.T))
    if len(scores) == 1:
        i2t_scores, t2i_scores = scores[0]
    else:
        i2t_scores = np.mean([_standardise(i2t) for i2t, _ in scores], axis=0)
        t2i_scores = np.mean([_standardise(t2i) for _, t2i in scores], axis=0)
    # each text embedded alike takes the first alike text's scores (equal embeddings need not give bit-equal
    # products: a matrix product may round its last columns another way)
    i2t_scores, t2i_scores = i2t_scores[:, alike], t2i_scores[alike]
    i2t = retrieval_ranks(i2t_scores, image_to_text)
    t2i = retrieval_ranks(t2i_scores, text_to_images)
    result: dict = {"n_images": len(first_record), "n_texts": len(gallery_texts), "n_records": len(records),
                    "texts_embedded_alike": tied}
    if len(members) > 1:
        result["ensemble"] = {"members": len(members), "combined": "mean of per-query standardised scores"}
    if bridges[0] is not None:
        result["bridge"] = {"k": bridges[0].k, "weight": bridges[0].weight, "bank": len(bridges[0].image_embeddings)}
    queries = {"image_to_text": first_record, "text_to_image": _first_records(records, text_of, len(gallery_texts))}
    for name, ranks, gallery, relevant in (("image_to_text", i2t, len(gallery_texts), image_to_text),
                                           ("text_to_image", t2i, len(first_record), text_to_images)):
        result[name] = {**recall_at_k(ranks, ks), "median_rank": float(np.median(ranks)),
                        "mean_rank": float(ranks.mean()),
                        "chance": {f"R@{k}": _chance_recall(k, gallery, relevant) for k in ks}}
        if keep_ranks:
            result[name]["ranks"] = ranks.tolist()
            result[name]["query_records"] = [with_text[i] for i in queries[name]]
    for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
        for k in ks:
            result[f"{short}_R@{k}"] = result[direction][f"R@{k}"]
    return result


def _first_records(records: Sequence, text_of: dict[str, int], texts: int) -> list[int]:
    """For each of the ``texts`` gallery texts, the position among ``records`` of the first record holding it."""
    first: dict[int, int] = {}
    for i, record in enumerate(records):
        first.setdefault(text_of[record.text], i)
    return [first[text] for text in range(texts)]


def _per_member(name: str, value, members: int) -> list:
    """``value`` as one entry per ensemble member: a list of that length for an ensemble, a single value
    (or None) for one model, None for every member."""
    if value is None:
        return [None] * members
    if members == 1 and not isinstance(value, (list, tuple)):
        return [value]
    if not isinstance(value, (list, tuple)) or len(value) != members:
        raise InputError(f"retrieval with {members} models needs one {name} per model, got "
                         f"{len(value) if isinstance(value, (list, tuple)) else 'one'}")
    if any(v is None for v in value) and any(v is not None for v in value):
        raise InputError(f"{name} is given for some ensemble members and not others")
    return list(value)


def _chance_recall(k: int, gallery: int, relevant: list[list[int]]) -> float:
    """Expected Recall@K of a random ranking of a gallery of ``gallery`` items, each query with its own number
    of relevant items."""
    from math import comb

    misses = [comb(gallery - len(items), k) / comb(gallery, k) if gallery - len(items) >= k else 0.0
              for items in relevant]
    return float(1 - np.mean(misses))


def _image_key(image) -> object:
    """What makes two records' images the same gallery image: the file (resolved path), or an array's pixels."""
    if isinstance(image, str | Path):
        return ("file", str(Path(image).resolve()))
    if isinstance(image, np.ndarray):
        return ("pixels", pixel_sha256(image))
    return ("object", id(image))


SAME_EMBEDDING = 1e-5  # cosine within this of 1 (float noise): the model cannot tell the texts apart


def _gallery_texts(members: Sequence[DualEncoder],
                   record_texts: list[str]) -> tuple[list[str], dict[str, int], list[int]]:
    """One gallery text per text (texts differing only in letter case or spacing that every member ignores are
    one), each record text's gallery text, and for each gallery text the first gallery text that every member
    reads as the same tokens (itself if none): distinct texts the model cannot tell apart."""
    texts = list(dict.fromkeys(record_texts))
    tokens = list(zip(*(member.text_tokens(texts) for member in members), strict=True))
    first: dict[tuple, int] = {}  # (tokens, text without case and spacing) -> its gallery text
    gallery: list[int] = []  # gallery text -> its first text
    text_of: dict[str, int] = {}
    for i, text in enumerate(texts):
        key = (tokens[i], _plain_text(text))
        if key not in first:
            first[key] = len(gallery)
            gallery.append(i)
        text_of[text] = first[key]
    read_as: dict[tuple, int] = {}
    read_alike = [read_as.setdefault(tokens[i], n) for n, i in enumerate(gallery)]
    return [texts[i] for i in gallery], text_of, read_alike


def _plain_text(text: str) -> str:
    """A text without letter case and spacing (and with one spelling of each Unicode character)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _joined_groups(first: list[int], second: list[int]) -> list[int]:
    """For each item, the first item of its group when two groupings (each item -> the first item of its
    group) are joined: items grouped together in either are together."""
    group = list(range(len(first)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for grouping in (first, second):
        for i, leader in enumerate(grouping):
            a, b = root(i), root(leader)
            group[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(group))]


def _tied_texts(group: list[int]) -> int:
    """How many items share their group with another item."""
    sizes = Counter(group)
    return sum(size for size in sizes.values() if size > 1)


def _same_embedding_groups(text_embs: list[np.ndarray]) -> list[int]:
    """For each text, the index of the first text that every member embeds alike (unit vectors)."""
    count = len(text_embs[0])
    group = list(range(count))
    for start in range(0, count, 1024):
        same = np.ones((min(1024, count - start), count), dtype=bool)
        for emb in text_embs:
            same &= emb[start:start + 1024] @ emb.T >= 1 - SAME_EMBEDDING
        for row, columns in enumerate(same):
            i = start + row
            first = int(np.argmax(columns))  # the first alike text (itself at the latest)
            group[i] = group[first] if first < i else i
    return group
