"""Time to group a DICOM series folder (``medvl.clinical.dicom.read_dicom_series``, what ``medvl dicom-info`` and
a dataset of DICOM series read first): every file's header parsed and checked, no pixels decoded.

The series is made from pydicom's ``CT_small.dcm`` (128 x 128, a GE CT with many private elements): ``--slices``
copies with their own UIDs and positions, written to a temporary folder. The figure is the median of
``--repeats`` runs after one warm-up (files in the page cache), one thread.

    python benchmarks/dicom_headers.py [--slices 300] [--repeats 5]

Run it with ``PYTHONPATH=OLD/src`` (``git archive REV | tar -x -C OLD``) for another version's figure.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path

from medvl.clinical.dicom import read_dicom_series
from medvl.errors import InputError, run_script


def write_series(folder: Path, slices: int) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    for number in range(slices):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        ds.save_as(folder / f"{number:04d}.dcm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.slices < 1 or args.repeats < 1:
        raise InputError(f"--slices and --repeats must be at least 1, got {args.slices} and {args.repeats}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_series(folder, args.slices)
        read_dicom_series(folder)  # warm-up: imports, page cache
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            [series] = read_dicom_series(folder)
            times.append(time.perf_counter() - started)
    median = sorted(times)[len(times) // 2]
    print(f"read_dicom_series on {args.slices} CT_small slices ({len(series.files)} files, one series): median "
          f"{median:.3f} s of {args.repeats} ({median / args.slices * 1000:.2f} ms per file); "
          f"{platform.machine()}, {os.cpu_count()} CPU")


if __name__ == "__main__":
    run_script(main)
