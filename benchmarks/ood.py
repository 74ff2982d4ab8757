"""Out-of-distribution guard: how much of each dataset a model's guard flags, and why backbone features.

    python benchmarks/ood.py --model RUN/model --data PHANTOM [--check NAME=PATH[:SPLIT] ...] [--quantile 0.99]

Fits the guard (``medvl.eval.ood.fit_ood``: Ledoit-Wolf Mahalanobis, threshold = the split-conformal
quantile of the ``val`` scores) on the ``train`` split twice: on the backbone features medvl uses and, for
comparison, on the projected embeddings; prints the flagged share of the in-distribution splits (train, val,
test: at most 1 - quantile expected on test, given at least quantile / (1 - quantile) val images) and of every
``--check`` dataset (another distribution: all of it should be flagged). Nothing is saved into the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medvl.api import load_split  # noqa: E402
from medvl.embed import embed_images  # noqa: E402
from medvl.eval.ood import conformal_threshold, fit_ood  # noqa: E402
from medvl.models.ood import OODGuard  # noqa: E402
from medvl.models.registry import load_model  # noqa: E402

DEFAULT_CHECKS = ["figure1=../shared/data/figure1-covid-cxr", "medpix_dev=../shared/data/medpix-2.0:dev"]


def embedding_guard(model, fit_set, calibration_set, quantile: float) -> OODGuard:
    """The same guard on the projected, normalised embeddings (``scores`` normalises its input again)."""
    from sklearn.covariance import LedoitWolf

    fitted = embed_images(model, fit_set, show_progress=False).double().numpy()
    shrunk = LedoitWolf().fit(fitted)
    guard = OODGuard(torch.from_numpy(shrunk.location_).float(), torch.from_numpy(shrunk.precision_).float(),
                     float("inf"), {})
    calibration = guard.scores(embed_images(model, calibration_set, show_progress=False)).numpy()
    guard.threshold = conformal_threshold(calibration, quantile)[0]
    return guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the model's training data (train / val / test)")
    parser.add_argument("--check", action="append", help="NAME=PATH[:SPLIT], another distribution")
    parser.add_argument("--limit", type=int, default=300, help="images per --check dataset")
    parser.add_argument("--quantile", type=float, default=0.99)
    args = parser.parse_args()
    model = load_model(args.model)
    splits = {name: load_split(args.data, name) for name in ("train", "val", "test")}
    checks = {}
    for spec in args.check or DEFAULT_CHECKS:
        name, _, location = spec.partition("=")
        path, _, split = location.partition(":")
        checks[name] = load_split(Path(path), split or None)[:args.limit]
    feature_guard = fit_ood(model, splits["train"], splits["val"], quantile=args.quantile, show_progress=False)
    projected_guard = embedding_guard(model, splits["train"], splits["val"], args.quantile)
    print(f"OOD guard of {args.model} (fitted on train, threshold = val quantile {args.quantile}): flagged share")
    print(f"{'dataset':<14} {'images':>7} {'backbone features (medvl)':>26} {'projected embeddings':>21}")
    for name, dataset in {**splits, **checks}.items():
        features = embed_images(model, dataset, features=True, show_progress=False)
        embeddings = embed_images(model, dataset, show_progress=False)
        by_features = float((feature_guard.scores(features) > feature_guard.threshold).float().mean())
        by_embeddings = float((projected_guard.scores(embeddings) > projected_guard.threshold).float().mean())
        print(f"{name:<14} {len(dataset):>7} {by_features:>26.3f} {by_embeddings:>21.3f}")


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
