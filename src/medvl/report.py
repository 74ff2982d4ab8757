"""Self-contained HTML reports (numbers, plots and example cases inlined as base64 images)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_bytes

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.case{display:flex;gap:1em;margin:1em 0;align-items:flex-start}.case img{width:160px;image-rendering:pixelated}
.hit{color:#0a7a2f;font-weight:600}.note{color:#666;font-size:90%}img.plot{max-width:100%;height:auto}
.flags li{color:#9a3412}.ci{color:#666;font-size:85%}"""


def figure_to_data_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_to_data_uri(pixels: np.ndarray) -> str:
    """A [0, 1] float (C, H, W) or (H, W) array as an inline PNG."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.float32)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def roc_figure(y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], title: str):
    """One-vs-rest ROC curve per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axis = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(class_names):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(positives, probabilities[:, k])
            axis.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positives, probabilities[:, k]):.2f})")
    axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axis.legend(fontsize=8, loc="lower right")
    return figure


def curve_figure(steps: Sequence[float], values: Sequence[float], ylabel: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.5))
    axis.plot(steps, values, marker="o" if len(steps) <= 20 else None)  # a lone point shows, not an empty chart
    axis.set(xlabel="step", ylabel=ylabel, title=title)
    return figure


def table_html(rows: dict[str, Any], headers: tuple[str, str] = ("metric", "value")) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in rows.items())
    return f"<table><tr><th>{headers[0]}</th><th>{headers[1]}</th></tr>{body}</table>"


def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write an HTML page of (heading, inner html) sections atomically."""
    parts = [f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            + "\n".join(parts) + "</body></html>\n")
    return atomic_write_bytes(path, page.encode("utf-8"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))
