"""Contrastive losses over a batch of paired, L2-normalised image and text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              pair_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP / ConVIRT).

    ``pair_ids`` marks rows that share the same text (e.g. label captions): such pairs count as
    positives instead of false negatives, with the target spread evenly over them.
    """
    logits = logit_scale * image_emb @ text_emb.t()
    if pair_ids is None:
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    positives = (pair_ids[:, None] == pair_ids[None, :]).to(logits.dtype)
    targets = positives / positives.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, pair_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): every image-text pair is an independent binary problem."""
    logits = logit_scale * image_emb @ text_emb.t() + logit_bias
    if pair_ids is None:
        labels = 2 * torch.eye(len(logits), device=logits.device) - 1
    else:
        labels = 2 * (pair_ids[:, None] == pair_ids[None, :]).to(logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy between two views of the same N images.

    Row i of ``first`` and row i of ``second`` (projections, any scale: they are L2-normalised here) are
    each other's positive; the other 2N - 2 rows are negatives. Mean over the 2N anchors.
    """
    if first.shape != second.shape or len(first) < 2:
        raise ValueError(f"nt_xent_loss needs two views of at least 2 images, got {tuple(first.shape)} "
                         f"and {tuple(second.shape)}")
    count = len(first)
    views = F.normalize(torch.cat([first, second]), dim=-1)
    logits = views @ views.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=logits.device), float("-inf"))
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(logits.device)
    return F.cross_entropy(logits, targets)
