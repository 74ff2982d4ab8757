"""Try every file shipped by pydicom-data and pydicom's test files with ``read_dicom``.

Prints a Markdown table (file, modality, transfer syntax, result: the loaded shape and dtype or the
rejection reason) and the totals; ``--out`` also writes it to a file. Exits non-zero if any file
fails with anything but medvl's own ``DataError`` (a crash is a bug: every file must either load or
be refused with a reason). Also reads nilearn's bundled MNI152 NIfTI templates with ``read_nifti``.

    python benchmarks/dicom_coverage.py --out coverage.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from medvl.clinical.dicom import read_dataset, read_dicom, transfer_syntax
from medvl.clinical.nifti import read_nifti
from medvl.errors import DataError


def sources() -> list[tuple[str, Path]]:
    """(label, folder) of every file collection to try."""
    import data_store
    import nilearn
    import pydicom.data

    return [("pydicom-data", Path(data_store.__file__).parent / "data"),
            ("pydicom", Path(pydicom.data.__file__).parent / "test_files"),
            ("nilearn", Path(nilearn.__file__).parent / "datasets" / "data")]


def describe_header(path: Path) -> tuple[str, str]:
    """(modality, transfer syntax name) from the header, '-' where unknown."""
    try:
        ds = read_dataset(path, header_only=True)
    except DataError:
        return "-", "-"
    syntax = transfer_syntax(ds)
    return str(ds.get("Modality") or "-"), syntax.name if syntax is not None else "-"


def try_file(path: Path) -> tuple[str, str, str, str]:
    """(modality, transfer syntax, outcome, result) with outcome 'loaded', 'rejected' or 'CRASH'."""
    if path.name.endswith((".nii", ".nii.gz")):
        modality, syntax = "NIfTI", "-"
    else:
        modality, syntax = describe_header(path)
    try:
        if modality == "NIfTI":
            array, spacing = read_nifti(path)
            detail = f"spacing {tuple(round(s, 3) for s in spacing)} mm"
        else:
            array, meta = read_dicom(path)
            detail = meta["photometric"] or ""
            if meta["color"] and detail != "RGB":
                detail += " -> RGB"
            elif meta["inverted"]:
                detail += " (inverted)"
        shape = "x".join(str(n) for n in array.shape)
        return modality, syntax, "loaded", f"loaded {shape} {array.dtype} {detail}".strip()
    except DataError as error:
        return modality, syntax, "rejected", f"rejected: {error.problem}"
    except Exception as error:  # noqa: BLE001 - reported as a bug, the script goes on
        return modality, syntax, "CRASH", f"CRASH {type(error).__name__}: {error}"


def markdown(rows: list[tuple[str, ...]]) -> str:
    lines = ["| file | modality | transfer syntax | result |", "|---|---|---|---|"]
    for file, modality, syntax, _, result in rows:
        lines.append(f"| `{file}` | {modality} | {syntax} | {result.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown table and totals here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started, rows = time.perf_counter(), []
    for label, folder in sources():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if label == "nilearn":
            files = [p for p in files if p.name.endswith((".nii", ".nii.gz"))]
        for path in files:
            rows.append((f"{label}/{path.relative_to(folder).as_posix()}", *try_file(path)))
    counts = {outcome: sum(row[3] == outcome for row in rows) for outcome in ("loaded", "rejected", "CRASH")}
    totals = (f"{len(rows)} files: {counts['loaded']} loaded, {counts['rejected']} rejected with a reason, "
              f"{counts['CRASH']} crashed ({time.perf_counter() - started:.1f} s)")
    text = markdown(rows) + "\n\n" + totals + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 1 if counts["CRASH"] else 0


if __name__ == "__main__":
    sys.exit(main())
