"""Grounding of heatmaps on the phantom, and concept-bottleneck accuracy beside a linear probe.

For a trained dual encoder and a phantom data set (boxes and masks per finding), prints per
finding the pointing game (peak in the box; in the mask), the energy in the box and IoU / Dice of
the map thresholded at 0.5 against the mask, for each heatmap method (patch_text, gradcam,
occlusion, smoothgrad; ``--methods``, settings per method with ``--settings JSON``) beside a random
map and a centre prior, whether the best method beats both baselines' pointing game, and each
method's seconds per image. Settings are chosen on ``--split val`` and then reported on ``test``;
``--choose-on val --candidates JSON`` does both in one run: each method's candidate settings are
scored on the ``--choose-on`` split, the one ranked first by ``grounding.selection_key`` (findings on
which the method beats both baselines' pointing game, then its pooled pointing game; the first
listed on ties) is kept, and only then is ``--split`` scored, once, with the kept settings
(``--choose-only`` stops after the choice: pass the kept settings to a later run with ``--settings``,
e.g. to look at the val scores of several models before any test split is scored). Settings may
name a supervised head (``{"head": "finding"}``, for gradcam, occlusion and smoothgrad): the map then
explains the head's class, not the zero-shot text class (``medvl.explain.heatmaps``).
Then the concept bottleneck's accuracy beside a linear probe on the same image embeddings
(phantom; and ISIC when --isic-model / --isic-data are given). Commands and figures:
docs/benchmarks.md, "Explanations and grounding".

    python benchmarks/grounding.py --model RUN/model --data PHANTOM --split test \\
        [--methods occlusion,smoothgrad] [--settings '{"occlusion": {"window": 0.25}}'] [--no-bottleneck] \\
        [--isic-model ISIC_RUN/model --isic-data ISIC_MANIFEST] --json grounding.json
    python benchmarks/grounding.py --model RUN/model --data PHANTOM --split test --no-bottleneck \
        --choose-on val --candidates '{"smoothgrad": [{"noise": 0.075}, {"noise": 0.15}], "patch_text": [{}]}'
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from medvl.data import load_dataset
from medvl.explain.concepts import compare_with_probe, load_concepts
from medvl.explain.grounding import BASELINES, beats_baselines, choose_settings, evaluate_grounding
from medvl.explain.heatmaps import METHODS
from medvl.io import write_json
from medvl.models.registry import load_model

SCORES = ("pointing_box", "pointing_mask", "energy_box", "iou@0.5", "dice@0.5")


def grounding_table(result: dict) -> str:
    """A Markdown table: one row per finding and method."""
    methods = [*result["methods"], *BASELINES]
    beats = beats_baselines(result["per_finding"], result["methods"])
    lines = ["| finding | n | method | " + " | ".join(SCORES) + " |", "|---" * (3 + len(SCORES)) + "|"]
    for finding, row in result["per_finding"].items():
        for method in methods:
            mark = " (beats both)" if finding in beats and beats[finding] and method == _best(row, result) else ""
            values = " | ".join(f"{row[method][s]:.3f}" for s in SCORES)
            lines.append(f"| {finding} | {row['n']} | {method}{mark} | {values} |")
    return "\n".join(lines)


def _best(row: dict, result: dict) -> str:
    return max(result["methods"], key=lambda m: row[m]["pointing_box"])


def bottleneck_line(name: str, result: dict) -> str:
    cbm, probe = result["bottleneck"], result["probe"]
    return (f"| {name} | {result['bank']} ({result['nonzero_concepts']}/{result['concepts']} concepts used) | "
            f"{result['n_train']}/{result['n_test']} | {cbm['accuracy']:.3f} / {cbm['balanced_accuracy']:.3f} / "
            f"{cbm['macro_auc']:.3f} | {probe['accuracy']:.3f} / {probe['balanced_accuracy']:.3f} / "
            f"{probe['macro_auc']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Dual encoder trained on the phantom.")
    parser.add_argument("--data", type=Path, help="Phantom data set (medvl phantom).")
    parser.add_argument("--split", default="test", help="Split to score (default test).")
    parser.add_argument("--label", default="finding")
    parser.add_argument("--tolerance", type=float, default=0.0, help="Pointing-game tolerance in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random-map baseline.")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated heatmap methods.")
    parser.add_argument("--settings", type=json.loads, default=None,
                        help='Keyword arguments per method as JSON, e.g. \'{"smoothgrad": {"noise": 0.1}}\'.')
    parser.add_argument("--choose-on", help="Split on which to choose each method's settings first (e.g. val).")
    parser.add_argument("--candidates", type=json.loads, default=None,
                        help='With --choose-on: candidate settings per method as JSON, e.g. '
                             '\'{"occlusion": [{"window": 0.1875}, {"window": 0.25}]}\'; the methods named here '
                             'are the ones scored (default: every method of --methods with its defaults).')
    parser.add_argument("--choose-only", action="store_true",
                        help="With --choose-on: stop after choosing (nothing else is scored); the kept settings are "
                             "printed as JSON for --settings.")
    parser.add_argument("--no-bottleneck", action="store_true", help="Skip the concept bottleneck comparison.")
    parser.add_argument("--isic-model", type=Path, help="Dual encoder trained on the ISIC train split.")
    parser.add_argument("--isic-data", type=Path, help="ISIC manifest with train / test splits and diagnosis.")
    parser.add_argument("--json", type=Path, help="Write every figure here.")
    args = parser.parse_args()
    if not (args.model and args.data) and not (args.isic_model and args.isic_data):
        parser.error("give --model and --data (phantom), --isic-model and --isic-data (ISIC), or both")

    started, summary, bottlenecks = time.perf_counter(), {}, {}
    if args.model and args.data:
        model, data = load_model(args.model), load_dataset(args.data)
        methods, settings = args.methods.split(","), args.settings
        if args.choose_on:
            if args.choose_on == args.split:
                parser.error("--choose-on must be another split than --split (never choose on the reported split)")
            candidates = args.candidates or {m: [(args.settings or {}).get(m, {})] for m in methods}
            selection = choose_settings(model, data.select(args.choose_on), candidates, args.label, seed=args.seed,
                                        tolerance=args.tolerance)
            print(f"settings chosen on {args.choose_on}:")
            for method, tried in selection["tried"].items():
                for entry in tried:
                    mark = " <- kept" if entry["settings"] == selection["chosen"][method] else ""
                    print(f"  {method} {json.dumps(entry['settings'])}: beats both baselines on {entry['key'][0]} "
                          f"findings, pooled pointing game {entry['key'][1]:.3f}{mark}")
            methods, settings = list(selection["chosen"]), selection["chosen"]
            summary["selection"] = {"split": args.choose_on, **selection}
            print(f"kept: --methods {','.join(methods)} --settings '{json.dumps(settings)}'")
            if args.choose_only:
                _finish(args, summary, {}, started)
                return
        elif args.choose_only:
            parser.error("--choose-only needs --choose-on")
        grounding = evaluate_grounding(model, data.select(args.split), args.label, methods,
                                       tolerance=args.tolerance, seed=args.seed, settings=settings)
        print(f"grounding on {args.data} ({args.split}, {grounding['n']} cases with a box, "
              f"{grounding['seconds']:.1f} s)\n")
        print(grounding_table(grounding))
        beats = beats_baselines(grounding["per_finding"], grounding["methods"])
        print(f"\nbest method's pointing game above both baselines: {beats}")
        print(f"seconds per image: {grounding['seconds_per_image']}; settings: {grounding['settings']}\n")
        summary |= {"grounding": grounding, "beats_baselines": beats}
        if not args.no_bottleneck:
            bottlenecks["phantom"] = compare_with_probe(model, data.select("train"), data.select(args.split),
                                                        args.label, load_concepts("chest_xray"))
    if args.isic_model and args.isic_data:
        isic = load_dataset(args.isic_data, label_columns=["diagnosis"], allow_outside_root=True)
        bottlenecks["isic"] = compare_with_probe(load_model(args.isic_model), isic.select("train"),
                                                 isic.select("test"), "diagnosis", load_concepts("dermoscopy"))
    if bottlenecks:
        print("| data | concept bank | train/test | bottleneck acc / bal. acc / AUC | probe acc / bal. acc / AUC |")
        print("|---|---|---|---|---|")
    for name, result in bottlenecks.items():
        print(bottleneck_line(name, result))
    _finish(args, summary, bottlenecks, started)


def _finish(args: argparse.Namespace, summary: dict, bottlenecks: dict, started: float) -> None:
    if args.json:
        write_json(args.json, {**summary, "bottleneck": bottlenecks, "seconds": round(time.perf_counter() - started, 1),
                               "load_average": os.getloadavg()})
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (e.g. a 3D model: heatmaps are for 2D images) is one line, not a traceback
