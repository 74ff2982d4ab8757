"""Heatmap sanity checks (Adebayo et al. 2018) of a trained dual encoder on a few phantom films.

For each heatmap method (patch_text, gradcam, occlusion, smoothgrad; ``--methods``), prints the mean Spearman
rank correlation of the trained model's maps with those of a copy whose image tower and image projection are
re-initialised (``--seed``), and of the map of each film's finding with that of another finding, beside the
expectation: a map that reflects the model changes when its weights are randomised. Rule
(``medvl.explain.sanity.RANDOMISED_MAX``): a method passes when the mean absolute value of its correlation with
the randomised model is below 0.5. The image's own intensity, a map that ignores the model, is checked beside
them as a reference that must fail. Films: the first ``--n`` of ``--split`` whose finding is not ``no_finding``
(nothing to point at). Command and figures: docs/benchmarks.md, "Heatmap sanity checks".

    python benchmarks/heatmap_sanity.py --model medvl-demo/train/model --data medvl-demo/data --split test \\
        --n 8 --json sanity.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from medvl.data import load_dataset
from medvl.explain.heatmaps import METHODS
from medvl.explain.sanity import RANDOMISED_MAX, sanity_check
from medvl.io import write_json
from medvl.models.registry import load_model

REFERENCE = "intensity"  # the image itself: independent of the model, so it must fail


def intensity_map(model, pixels: torch.Tensor, texts: torch.Tensor, target: int) -> torch.Tensor:
    """The image's own brightness (channel mean): the same map whatever the model and the finding."""
    return pixels.mean(1)


def table(result: dict) -> str:
    lines = ["| method | trained vs randomised: mean abs. Spearman (signed mean) | finding vs other finding | expected "
             "| verdict |", "|---|---|---|---|---|"]
    for name, row in result["methods"].items():
        absolute, randomised, other = (f"{row[k]:.3f}" if row[k] is not None else "n/a"
                                       for k in ("randomised_abs", "randomised", "other_class"))
        verdict = "pass" if row["passes"] else "FAIL"
        lines.append(f"| {name} | {absolute} ({randomised}) | {other} | < {RANDOMISED_MAX} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--label", default="finding")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = load_model(args.model)
    dataset = load_dataset(args.data, label_columns=[args.label]).select(args.split)
    films = [r for r in dataset if r.labels[args.label] != "no_finding"][:args.n]
    started = time.perf_counter()
    result = sanity_check(model, dataset.subset(films), args.label, args.methods.split(","), seed=args.seed,
                          extra_maps={REFERENCE: intensity_map}, classes=dataset.classes(args.label))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{result['images']} films, re-initialisation seed {args.seed}, {result['seconds']} s; {result['rule']}")
    print(table(result))
    if args.json:
        write_json(args.json, {**vars(args), **result})


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
