"""Hostile inputs for every loader and reader: one table per input kind.

Each row writes real hostile bytes (truncated files, zero bytes, wrong magic, decompression bombs,
wrong dtype / shape, NaN pixels, non-UTF-8 text, huge lines, paths and symbolic links leaving the
dataset folder) and says what the library must do: raise medvl's ``DataError`` / ``InputError``
naming the file (``load``: when the dataset is loaded; ``read``: when its images are read), or
apply the documented per-record skip (``skip``: the dataset loads with ``kept`` records). Every
error row is run again through the CLI (``medvl eval zero-shot`` on the dataset, or ``medvl
predict`` on the image file): exit code 2, one message naming the file, no traceback, nothing
written. No message may hold the ``MRN123`` marker that the rows plant in paths and free text.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import re
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hostile_files import (
    animated_png,
    deflate_zeros,
    gzip_repeated_lines,
    gzip_zeros,
    jpeg_dicom_with_inserted_bytes,
    npy_header,
    npz_bomb,
    png_declaring,
    write_zip,
)
from medvl.clinical.nifti import read_nifti, write_nifti
from medvl.data.images import read_image
from medvl.data.loaders import load_dataset
from medvl.errors import DataError, InputError

MARKER = "MRN123"  # planted in paths and free text: must never appear in an error message


@dataclass(frozen=True)
class Case:
    """One hostile input: ``build(folder)`` writes it and returns the path given to the loader."""

    id: str
    build: Callable[[Path], Path]
    match: str  # regular expression the message must contain
    stage: str = "load"  # load | read | skip
    kept: int = 0  # records left after a documented skip
    error: type = DataError
    names: str | None = None  # the file the message must name (default: the built path's name)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to load_dataset
    cli: bool = True  # also run through the CLI


# ---------------------------------------------------------------- small writers


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color=value).save(path)
    return path


def _png_bytes() -> bytes:
    stream = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(stream, "PNG")
    return stream.getvalue()


def _jpeg_bytes() -> bytes:
    stream = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(stream, "JPEG")
    return stream.getvalue()


def _secret(folder: Path) -> Path:
    """An image outside the dataset folder, its name carrying the identifier marker."""
    return _png(folder / f"{MARKER}.png")


# ---------------------------------------------------------------- manifests (CSV / JSONL, sidecar)

GOOD_CSV = "image,finding\na.png,normal\nb.png,effusion\n"


def _manifest(name: str, content: bytes | str, images: tuple[str, ...] = ("a.png", "b.png")) -> Callable:
    def build(folder: Path) -> Path:
        for image in images:
            _png(folder / "data" / image)
        return _write(folder / "data" / name, content)
    return build


def _outside_rows(kind: str) -> Callable:
    def build(folder: Path) -> Path:
        secret = _secret(folder)
        data = folder / "data"
        _png(data / "a.png")
        value = {"dotdot": f"../{secret.name}", "absolute": str(secret), "link": "link.png"}[kind]
        if kind == "link":
            (data / "link.png").symlink_to(secret)
        return _write(data / "manifest.csv", f"image,finding\na.png,normal\n{value},effusion\n")
    return build


def _sidecar(content: str) -> Callable:
    def build(folder: Path) -> Path:
        _png(folder / "data" / "a.png")
        _write(folder / f"{MARKER}.csv", "image,finding\ndata/a.png,normal\n")
        _write(folder / "data" / "dataset.json", content)
        return folder / "data"
    return build


def _figure1_missing(folder: Path) -> Path:
    _png(folder / "data" / "images" / "p1.png")
    rows = "patientid,finding,view,modality,notes\np1,COVID-19,PA,X-ray,fever\np2,Pneumonia,AP,X-ray,cough\n"
    return _write(folder / "data" / "metadata.csv", rows)


JSONL_LINE = '{"image": "a.png", "finding": "normal", "text": "MRN123 history"}\n'
DEEP_600 = "[" * 600 + "]" * 600  # JSON that json reads (it stops at about 1,000 levels) but nested too deeply

MANIFEST_CASES = [
    Case("csv-zero-bytes", _manifest("manifest.csv", b""), r"empty manifest \(0 bytes\)"),
    Case("csv-header-only", _manifest("manifest.csv", "image,finding\n"), r"empty manifest \(no rows\)"),
    *[Case(f"csv-truncated-{offset}", _manifest("manifest.csv", GOOD_CSV[:offset]), match)
      for offset, match in ((3, "empty manifest"), (16, "line 2: 1 cells but the header has 2 columns"),
                            (30, "line 3: 1 cells but the header has 2 columns"))],
    Case("csv-short-row", _manifest("manifest.csv", "image,text,finding\na.png,normal\nb.png,x,effusion\n"),
         r"line 2: 2 cells but the header has 3 columns \(a cell is missing"),
    Case("csv-unclosed-quote", _manifest("manifest.csv", 'image,text,finding\na.png,"fever,normal\nb.png,x,y\n'),
         r"line 2: a quoted cell \(\"\) is never closed; the rest of the file \(2 lines\)"),
    Case("csv-wrong-magic-png", _manifest("manifest.csv", _png_bytes()), "not valid UTF-8"),
    Case("csv-gzip-named-csv", _manifest("manifest.csv", gzip.compress(GOOD_CSV.encode(), mtime=0)),
         "not valid UTF-8"),
    Case("csv-utf16", _manifest("manifest.csv", GOOD_CSV.encode("utf-16")), "not valid UTF-8"),
    Case("csv-non-utf8-label", _manifest("manifest.csv", b"image,finding\na.png,norm\xe9al\n"),
         r"not valid UTF-8 \(byte offset 24, line 2, column 'finding'\)"),
    Case("csv-huge-cell", _manifest("manifest.csv", "image,finding\na.png," + "x" * 300_000 + "\n"),
         "line 2: column 'finding' holds a cell of 300,000 characters; only the text column may hold more than"),
    Case("csv-huge-path", _manifest("manifest.csv", "image\n" + "d/" * 3000 + "a.png\n"),
         "1 of 1 image files not found"),
    Case("csv-nul-in-path", _manifest("manifest.csv", "image\na\x00.png\n"), "not found"),
    Case("csv-extra-cells", _manifest("manifest.csv", "image,finding\na.png,normal,x,y\n"), "4 cells"),
    Case("csv-duplicate-column", _manifest("manifest.csv", "image,Image\na.png,b.png\n"), "duplicate column"),
    Case("csv-unterminated-quote", _manifest("manifest.csv", 'image,finding\n"a.png,normal\n'),
         r"line 2: a quoted cell \(\"\) is never closed; the rest of the file \(1 line\)"),
    Case("csv-outside-dotdot", _outside_rows("dotdot"), r"1 of 2 rows name a file outside .* \(first: line 3\)",
         names="manifest.csv"),
    Case("csv-outside-absolute", _outside_rows("absolute"), r"1 of 2 rows name a file outside .*first: line 3"),
    Case("csv-symlink-outside", _outside_rows("link"), r"1 of 2 rows name a file outside .*first: line 3"),
    Case("figure1-missing-image-skipped", _figure1_missing, "", stage="skip", kept=1),
    Case("jsonl-zero-bytes", _manifest("manifest.jsonl", b""), r"empty manifest \(0 bytes\)"),
    *[Case(f"jsonl-truncated-{offset}", _manifest("manifest.jsonl", JSONL_LINE * 2 + JSONL_LINE[:offset]),
           r"line 3: not valid JSON") for offset in (1, 12, 40, len(JSONL_LINE) - 2)],
    Case("jsonl-array-line", _manifest("manifest.jsonl", '["a.png"]\n'), "line 1: expected a JSON object"),
    Case("jsonl-duplicate-key", _manifest("manifest.jsonl", '{"image": "a.png", "Image": "b.png"}\n'),
         "line 1: key 'Image' repeats key 'image'"),
    Case("jsonl-key-respelled", _manifest("manifest.jsonl", '{"image": "a.png", "finding": "x"}\n'
                                                             '{"image": "b.png", "Finding": "y"}\n'),
         "line 2: key 'Finding' repeats key 'finding'"),
    Case("jsonl-deeply-nested", _manifest("manifest.jsonl", '{"image": ' + "[" * 100_000 + "\n"),
         "line 1: JSON nested too deeply"),
    # json reads 600 levels; the walk for a repeated key ran out of stack (a RecursionError traceback)
    Case("jsonl-nested-600", _manifest("manifest.jsonl", JSONL_LINE + '{"image": "b.png", "meta": ' + DEEP_600 + "}\n"),
         r"line 2: nested too deeply \(more than 100 levels"),
    Case("jsonl-non-utf8", _manifest("manifest.jsonl", b'{"image": "a.png", "text": "\xff"}\n'),
         r"not valid UTF-8 \(byte offset 28"),
    Case("jsonl-image-number", _manifest("manifest.jsonl", '{"image": 5}\n'), "1 of 1 image files not found"),
    Case("sidecar-manifest-outside", _sidecar(json.dumps({"manifest": f"../{MARKER}.csv"})),
         "1 of 1 manifest entries name a file outside", names="dataset.json"),
    Case("sidecar-not-json", _sidecar("{manifest"), "not valid JSON", names="dataset.json"),
    Case("sidecar-deeply-nested", _sidecar("[" * 100_000), "JSON nested too deeply", names="dataset.json"),
    Case("sidecar-nested-600", _sidecar('{"notes": ' + DEEP_600 + "}"), r"nested too deeply \(more than 100 levels",
         names="dataset.json"),
    Case("sidecar-wrong-type", _sidecar('{"label_columns": "finding"}'), "'label_columns' must be a list",
         names="dataset.json"),
]


# ---------------------------------------------------------------- MedMNIST-style .npz


def _npz(**arrays: np.ndarray) -> Callable:
    def build(folder: Path) -> Path:
        path = folder / "data.npz"
        np.savez_compressed(path, **arrays)
        return path
    return build


def _npz_bytes(data: Callable[[], bytes], name: str = "data.npz") -> Callable:
    return lambda folder: _write(folder / name, data())


@functools.cache
def _bomb_bytes() -> bytes:
    """The bytes of a real 1.6 GB (declared and present) all-zero MedMNIST-shaped .npz: ~1.6 MB."""
    with tempfile.TemporaryDirectory() as scratch:
        return npz_bomb(Path(scratch) / "bomb.npz", count=2_100_000).read_bytes()


def _good_npz_bytes() -> bytes:
    stream = io.BytesIO()
    np.savez_compressed(stream, train_images=np.arange(6 * 8 * 8, dtype=np.uint8).reshape(6, 8, 8),
                        train_labels=np.array([0, 1, 0, 1, 0, 1]))
    return stream.getvalue()


def _npz_members(members: dict[str, bytes]) -> Callable[[Path], Path]:
    """An .npz zip written member by member (raw bytes, deflated, correct CRCs)."""
    def build(folder: Path) -> Path:
        packed = []
        for name, raw in members.items():
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
            packed.append((name, compressor.compress(raw) + compressor.flush(), zlib.crc32(raw), len(raw)))
        return write_zip(folder / "data.npz", packed)
    return build


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, version=version, allow_pickle=True)
    return stream.getvalue()


LABELS = _npy(np.array([0, 1, 0]))


def _bad_crc(folder: Path) -> Path:
    path = folder / "data.npz"
    stream = io.BytesIO()
    np.savez(stream, train_images=np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8), train_labels=np.arange(3))
    data = bytearray(stream.getvalue())
    data[data.index(b"\x00\x01\x02\x03\x04\x05") + 3] ^= 0xFF  # one pixel byte of the stored (uncompressed) member
    return _write(path, bytes(data))


def _huge_npy_header() -> bytes:
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (3, 8, 8), }" + b" " * 60_000 + b"\n"
    return b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header + bytes(192)


def _unbalanced_npy_header() -> bytes:
    """A .npy member whose header's shape never closes its bracket: numpy tokenizes it (tokenize.TokenError)."""
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (3, 8, 8, }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(192)


NPZ_CASES = [
    Case("npz-zero-bytes", _npz_bytes(lambda: b""), r"not an \.npz archive"),
    *[Case(f"npz-truncated-{offset}", _npz_bytes(lambda offset=offset: _good_npz_bytes()[:offset]),
           r"not an \.npz archive") for offset in (10, 200, -30)],
    Case("npz-truncated-member-data", _npz_bytes(lambda: _good_npz_bytes()[:60] + _good_npz_bytes()[90:]),
         "not an .npz archive|corrupt|cannot read|not a readable"),
    Case("npz-wrong-magic-png", _npz_bytes(_png_bytes), r"not an \.npz archive"),
    Case("npz-repeated-class-names", _npz_members({"train_images.npy": _npy(np.zeros((3, 8, 8), np.uint8)),
                                                   "train_labels.npy": _npy(np.array([0, 1, 2])),
                                                   "class_names.npy": _npy(np.array(["x", "y", "x"]))}),
         "class names repeat 'x': each class needs its own"),
    Case("npz-bomb-1.6GB", lambda folder: _write(folder / "bomb.npz", _bomb_bytes()),
         r"'train_images' declares shape \(2100000, 28, 28\).*over the 1,610,612,736-byte limit"),
    Case("npz-bomb-lowered-limit", lambda folder: npz_bomb(folder / "bomb.npz", count=20_000),
         "over the 1,000,000-byte limit", kwargs={"max_npz_bytes": 1_000_000}, cli=False),
    Case("npz-zero-itemsize-bomb", _npz_members({"train_images.npy": _npy(np.zeros((3, 8, 8), np.uint8)),
                                                 "train_labels.npy": LABELS,
                                                 "class_names.npy": npy_header((10**12,), "<U0")}),
         r"'class_names' declares shape \(1000000000000,\)"),
    Case("npz-forged-header", _npz_members({"train_images.npy": npy_header((3000, 8, 8)) + bytes(192),
                                            "train_labels.npy": LABELS}),
         "declares 192,000 data bytes but the member holds 192"),
    Case("npz-object-array", _npz_members({"train_images.npy": _npy(np.array([None, 1, 2], dtype=object)),
                                           "train_labels.npy": LABELS}), "holds Python objects"),
    Case("npz-huge-header", _npz_members({"train_images.npy": _huge_npy_header(), "train_labels.npy": LABELS}),
         "not a readable .npy header"),
    Case("npz-unbalanced-header", _npz_members({"train_images.npy": _unbalanced_npy_header(),
                                                "train_labels.npy": LABELS}),
         r"array 'train_images': not a readable \.npy header \(TokenError"),
    Case("npz-npy-version-3", _npz_members({"train_images.npy": _npy(np.zeros((3, 8, 8), np.uint8), (3, 0)),
                                            "train_labels.npy": LABELS}), "unsupported .npy format version"),
    Case("npz-not-npy-member", _npz_members({"train_images": b"MRN123 not an array", "train_labels": b"x"}),
         "no '<split>_images' arrays"),
    Case("npz-bad-crc", _bad_crc, "Bad CRC-32"),
    Case("npz-string-images", _npz(train_images=np.array([["a", "b"], ["c", "d"]]), train_labels=np.arange(2)),
         "must be a numeric"),
    Case("npz-1d-images", _npz(train_images=np.zeros(5), train_labels=np.arange(5)), "must be a numeric"),
    Case("npz-complex-images", _npz(train_images=np.zeros((2, 4, 4), np.complex64), train_labels=np.arange(2)),
         "must be a numeric"),
    Case("npz-empty-image-axis", _npz(train_images=np.zeros((3, 0, 8)), train_labels=np.arange(3)),
         "empty image axis"),
    Case("npz-no-images", _npz(train_images=np.zeros((0, 8, 8)), train_labels=np.zeros(0)), "no images"),
    Case("npz-nan-images", _npz(train_images=np.where(np.eye(8) > 0, np.nan, 0.5)[None].repeat(2, 0),
                                train_labels=np.arange(2)), "16 NaN or infinite pixel values"),
    Case("npz-inf-images", _npz(train_images=np.full((2, 4, 4), np.inf, np.float32), train_labels=np.arange(2)),
         "32 NaN or infinite pixel values"),
    Case("npz-negative-label", _npz(train_images=np.zeros((2, 4, 4)), train_labels=np.array([0, -3])),
         "negative class index"),
    Case("npz-fractional-label", _npz(train_images=np.zeros((2, 4, 4)), train_labels=np.array([0.5, 1.0])),
         "integer class indices"),
    Case("npz-label-count", _npz(train_images=np.zeros((2, 4, 4)), train_labels=np.arange(3)), "3 rows"),
    # multi-label arrays of text or dates: a ValueError traceback ('yes'), or read as 0/1 ('1', datetime64)
    *[Case(f"npz-multi-label-{kind}", _npz(train_images=np.zeros((2, 4, 4)), train_labels=labels),
           r"'train_labels' has shape \(2, 2\): a multi-label array must hold 0/1 numbers \(or NaN for missing\), "
           + re.escape(f"got {labels.dtype}"))
      for kind, labels in (("text", np.array([["yes", "no"], ["no", "yes"]])),
                           ("digits-as-text", np.array([["1", "0"], ["0", "1"]])),
                           ("datetime", np.zeros((2, 2), "datetime64[s]")),
                           ("complex", np.zeros((2, 2), np.complex64)))],
]


# ---------------------------------------------------------------- MedPix 2.0 folder

MEDPIX_ROW = {"image": "c1_1", "Type": "CT", "U_id": "c1", "Location": "Chest", "Location Category": "Thorax",
              "Description": {"Caption": "MRN123 caption", "Plane": "Axial"}}


def _medpix(descriptions: bytes | str | None = None, case_file: str | None = None, link: bool = False,
            images: bool = True) -> Callable:
    def build(folder: Path) -> Path:
        data = folder / "medpix"
        if images:
            _png(data / "images" / "c1_1.png")
        if link:
            (data / "images" / "c1_2.png").symlink_to(_secret(folder))
        rows = descriptions if descriptions is not None else "\n".join(
            json.dumps({**MEDPIX_ROW, "image": stem}) for stem in (["c1_1", "c1_2"] if link else ["c1_1"]))
        _write(data / "descriptions_train.jsonl", rows)
        if case_file is not None:
            _write(data / "data_train.jsonl", case_file)
        return data
    return build


MEDPIX_CASES = [
    Case("medpix-zero-bytes", _medpix(b""), "no records in the descriptions files"),
    Case("medpix-truncated", _medpix(json.dumps(MEDPIX_ROW)[:40]), "line 1: not valid JSON",
         names="descriptions_train.jsonl"),
    Case("medpix-non-utf8", _medpix(b'{"image": "c1_1", "Type": "\xff"}'), "not valid UTF-8",
         names="descriptions_train.jsonl"),
    Case("medpix-deeply-nested", _medpix('{"image": ' + "[" * 100_000), "JSON nested too deeply",
         names="descriptions_train.jsonl"),
    Case("medpix-nested-600", _medpix(json.dumps(MEDPIX_ROW)[:-1] + ', "extra": ' + DEEP_600 + "}"),
         r"line 1: nested too deeply \(more than 100 levels", names="descriptions_train.jsonl"),
    Case("medpix-missing-image", _medpix(json.dumps({**MEDPIX_ROW, "image": "gone"})), "1 image files not found"),
    Case("medpix-no-image-folder", _medpix(images=False), "image folder not found", names="images"),
    Case("medpix-symlink-outside", _medpix(link=True),
         r"1 of 2 images name a file outside .*first: descriptions_train.jsonl line 2"),
    Case("medpix-truncated-case-file", _medpix(case_file='{"U_id": "c1", "Case": {"History": "MRN'),
         "line 1: not valid JSON", names="data_train.jsonl"),
]


# ---------------------------------------------------------------- IU X-ray report archive

REPORT = (b'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR1"/><Abstract>'
          b'<AbstractText Label="FINDINGS">MRN123 heart normal.</AbstractText></Abstract>'
          b"<MeSH><major>normal</major></MeSH></eCitation>")
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
          b"<eCitation>&lol2;</eCitation>")


def _tar(members: dict[str, bytes]) -> bytes:
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return stream.getvalue()


def _tgz(members: dict[str, bytes] | None = None, cut: int | None = None, raw: bytes | None = None) -> Callable:
    def build(folder: Path) -> Path:
        data = raw if raw is not None else gzip.compress(_tar(members or {"1.xml": REPORT}), mtime=0)
        return _write(folder / "NLMCXR_reports.tgz", data[:cut] if cut is not None else data)
    return build


def _tgz_bomb(folder: Path) -> Path:
    """A gzip bomb: a 150 MiB all-zero non-XML member (skipped by name, but it must be streamed past)."""
    info = tarfile.TarInfo("ecgen-radiology/README")
    info.size = 150 << 20
    return gzip_zeros(folder / "NLMCXR_reports.tgz", info.tobuf(format=tarfile.USTAR_FORMAT), (150 << 20) + 1024)


def _views_bomb(folder: Path) -> Path:
    """A valid report archive beside a view table that decompresses to 48 MiB of rows (long rows: each is
    under the csv field limit, and few enough to parse quickly)."""
    _tgz()(folder)
    gzip_repeated_lines(folder / "nlmcxr_dicom_metadata.csv.gz", b"imageid,View Position\n",
                        b"CXR1_1," + b"P" * 65_528 + b"\n", 48 << 20)
    return folder


def _report_without_text() -> bytes:
    return REPORT.replace(b'id="CXR1"', b'id="CXR2"').replace(b"MRN123 heart normal.", b"")


IU_CASES = [
    Case("tgz-zero-bytes", _tgz(raw=b""), "not a readable tar archive"),
    *[Case(f"tgz-truncated-{cut}", _tgz({"1.xml": REPORT, "2.xml": REPORT.replace(b"CXR1", b"CXR2")}, cut=cut),
           "not a readable tar archive") for cut in (5, 40, -12)],
    Case("tgz-wrong-magic-png", _tgz(raw=_png_bytes()), "not a readable tar archive"),
    Case("tgz-gzip-bomb", _tgz_bomb, r"decompresses to over 134,217,728 bytes"),
    Case("tgz-view-table-gzip-bomb", _views_bomb, r"decompresses to over 33,554,432 bytes",
         names="nlmcxr_dicom_metadata.csv.gz"),
    Case("tgz-billion-laughs", _tgz({"1.xml": LAUGHS}), "refused unsafe XML"),
    Case("tgz-malformed-xml", _tgz({"1.xml": REPORT[:-20]}), "not well-formed XML"),
    Case("tgz-non-utf8-xml", _tgz({"1.xml": REPORT.replace(b"heart", b"he\xffrt")}), "not well-formed XML"),
    Case("tgz-huge-member", _tgz({"1.xml": b"<a>" + b"x" * 2_100_000 + b"</a>"}), "over the 2,000,000-byte limit"),
    Case("tgz-report-without-text-skipped", _tgz({"1.xml": REPORT, "2.xml": _report_without_text()}), "",
         stage="skip", kept=1),
]


# ---------------------------------------------------------------- VQA-RAD / SLAKE JSON

QUESTIONS = [{"qid": 1, "image_name": "a.png", "question": "MRN123 is there an effusion?", "answer": "no",
              "answer_type": "CLOSED"}]


def _vqa(content: bytes | str | None = None, image_name: str | None = None, link: bool = False) -> Callable:
    def build(folder: Path) -> Path:
        data = folder / "vqa"
        _png(data / "images" / "a.png")
        items = list(QUESTIONS)
        if image_name is not None or link:
            name = image_name if image_name is not None else "link.png"
            if link:
                (data / "images" / "link.png").symlink_to(_secret(folder))
            else:
                _secret(folder)
            items.append({**QUESTIONS[0], "qid": 2, "image_name": name.replace("SECRET", str(folder))})
        text = content if content is not None else json.dumps(items)
        return _write(data / "trainset.json", text)
    return build


VQA_TEXT = json.dumps(QUESTIONS)

VQA_CASES = [
    Case("vqa-zero-bytes", _vqa(b""), "not valid JSON"),
    *[Case(f"vqa-truncated-{cut}", _vqa(VQA_TEXT[:cut]), "not valid JSON") for cut in (1, 30, len(VQA_TEXT) - 1)],
    Case("vqa-wrong-magic-png", _vqa(_png_bytes()), "not valid UTF-8"),
    Case("vqa-non-utf8", _vqa(VQA_TEXT.encode().replace(b"effusion", b"eff\xfesion")), "not valid UTF-8"),
    Case("vqa-deeply-nested", _vqa("[" * 100_000), "JSON nested too deeply"),
    Case("vqa-nested-600", _vqa(VQA_TEXT[:-2] + ', "extra": ' + DEEP_600 + "}]"),
         r"item 0: nested too deeply \(more than 100 levels"),
    Case("vqa-object-not-array", _vqa('{"question": "q", "answer": "a"}'), "expected a non-empty JSON array"),
    Case("vqa-huge-line", _vqa(json.dumps([{**QUESTIONS[0], "image_name": "x" * 5000}])),
         "question 1: image file 'xxx.* not found"),
    Case("vqa-outside-dotdot", _vqa(image_name=f"../../{MARKER}.png"),
         r"1 of 2 questions name a file outside .*first: item 1"),
    Case("vqa-outside-absolute", _vqa(image_name=f"SECRET/{MARKER}.png"), r"1 of 2 questions name a file outside"),
    Case("vqa-symlink-outside", _vqa(link=True), r"1 of 2 questions name a file outside"),
    Case("vqa-missing-image", _vqa(json.dumps([{**QUESTIONS[0], "image_name": "gone.png"}])),
         "question 1: image file 'gone.png' not found"),
    Case("vqa-missing-image-in-subfolder", _vqa(json.dumps([{**QUESTIONS[0], "image_name": "images/gone.png"}])),
         r"question 1: image file 'images/gone.png' not found \(looked in"),  # not 'images/images/gone.png'
    Case("vqa-missing-answer", _vqa(json.dumps([{**QUESTIONS[0], "answer": ""}])), "item 0 .*'answer'"),
    Case("vqa-question-object", _vqa(json.dumps([{**QUESTIONS[0], "question": {"text": "q"}}])),
         r"item 0 .*'question' must be text, got a JSON object"),
    Case("vqa-answer-array", _vqa(json.dumps([{**QUESTIONS[0], "answer": ["yes", "no"]}])),
         r"item 0 .*'answer' must be text, got a JSON array"),
]


# ---------------------------------------------------------------- DICOM folder


def _dicom_bytes() -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def _dicom(data: Callable[[], bytes], extra: dict[str, bytes] | None = None, link: bool = False) -> Callable:
    def build(folder: Path) -> Path:
        dicom = folder / "dicom"
        _write(dicom / "a.dcm", data())
        for name, content in (extra or {}).items():
            _write(dicom / name, content)
        if link:
            (dicom / "b.dcm").symlink_to(_write(folder / f"{MARKER}.dcm", _dicom_bytes()))
        return dicom
    return build


def _dicom_rows(rows: int) -> bytes:
    return _dicom_with(Rows=rows)


def _dicom_with(**values: Any) -> bytes:
    """CT_small with header ``values`` set, written as they are (a list gives a VM 1 element several values)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dicom_bytes()))
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    stream = io.BytesIO()
    ds.save_as(stream, enforce_file_format=True)
    return stream.getvalue()


DICOM_CASES = [
    Case("dicom-zero-bytes", _dicom(lambda: b""), "", names="a.dcm"),
    *[Case(f"dicom-truncated-header-{cut}", _dicom(lambda cut=cut: _dicom_bytes()[:cut]), match, names=names)
      # a file cut after its file meta, or before its Rows, is truncated: refused, not skipped as "no image"
      for cut, match, names in ((100, "", "a.dcm"), (140, "truncated DICOM file: nothing after the file meta", "a.dcm"),
                                (700, "truncated DICOM file: a CT Image Storage object without Rows", "a.dcm"))],
    # cut inside its pixel data: refused when the folder is read (its header says so), as when cut before them
    Case("dicom-truncated-pixels", _dicom(lambda: _dicom_bytes()[:-5000]),
         r"truncated DICOM file: element \(7FE0,0010\) has [\d,]+ of its [\d,]+ bytes", names="a.dcm"),
    Case("dicom-rows-lie", _dicom(lambda: _dicom_rows(4096)), "", names="a.dcm", stage="read"),
    Case("dicom-wrong-magic-png", _dicom(_png_bytes), "", names="a.dcm"),
    Case("dicom-symlink-outside", _dicom(_dicom_bytes, link=True),
         "1 file.s. under the folder are symbolic links to somewhere outside it"),
    Case("dicom-readme-skipped", _dicom(_dicom_bytes, extra={"README.txt": "MRN123 notes"}), "", stage="skip", kept=1),
]


# ---------------------------------------------------------------- image files (read_image)


def _image(name: str, data: Callable[[], bytes]) -> Callable:
    return lambda folder: _write(folder / name, data())


def _array_file(name: str, array: np.ndarray) -> Callable:
    def build(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if name.endswith(".npy"):
            np.save(folder / name, array, allow_pickle=True)
        else:
            Image.fromarray(array, mode="F").save(folder / name)
        return folder / name
    return build


def _ztxt_bomb() -> bytes:
    """A valid 8x8 PNG carrying a zTXt chunk that inflates to 64 MiB of zeros."""
    png = _png_bytes()
    text, _ = deflate_zeros(b"", 64 << 20, wbits=15)
    body = b"Comment\x00\x00" + text
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    return png[:33] + chunk + png[33:]


def _tiff_second_frame_without_dimensions() -> bytes:
    """A 2-frame TIFF whose second IFD lost ImageWidth / ImageLength (tags renumbered): Pillow counting the frames
    raised TypeError("Missing dimensions"), outside the errors the reader turned into a DataError."""
    stream = io.BytesIO()
    frames = [Image.new("L", (40, 32), color=value) for value in (10, 200)]
    frames[0].save(stream, "TIFF", save_all=True, append_images=frames[1:])
    data = bytearray(stream.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for entry in range(struct.unpack_from("<H", data, second)[0]):
        at = second + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] in (256, 257):
            struct.pack_into("<H", data, at, 65000)
    return bytes(data)


def _gif_with_a_frame_cut_off() -> bytes:
    """A GIF (named .png: Pillow reads by content) whose trailer gave way to a second frame's image descriptor and
    nothing after it: Pillow counting the frames raised IndexError."""
    stream = io.BytesIO()
    Image.new("L", (40, 32), color=90).save(stream, "GIF")
    return stream.getvalue()[:-1] + b"," + struct.pack("<HHHHB", 0, 0, 40, 32, 0)


NAN_IMAGE = np.where(np.eye(8) > 0, np.nan, 0.25).astype(np.float32)

IMAGE_CASES = [
    Case("png-zero-bytes", _image("x.png", lambda: b""), r"empty file \(0 bytes\)"),
    # the CLI path of a truncated file is the same whatever the offset: run it for the first offset only
    *[Case(f"png-truncated-{cut}", _image("x.png", lambda cut=cut: _png_bytes()[:cut]), "image", cli=cut == 8)
      for cut in (8, 30, 60, 2000)],
    *[Case(f"jpeg-truncated-{cut}", _image("x.jpg", lambda cut=cut: _jpeg_bytes()[:cut]), "image", cli=cut == 2)
      for cut in (2, 300, -100)],
    Case("png-wrong-magic-text", _image("x.png", lambda: b"MRN123 plain text"), "not a recognised image file"),
    Case("png-huge-declared", lambda folder: png_declaring(folder / "x.png", 12_000, 9_000),
         r"image too large: 12000 x 9000 pixels \(limit 100,000,000 pixels\)"),
    Case("png-pillow-bomb", lambda folder: png_declaring(folder / "x.png", 100_000, 100_000), "image too large"),
    Case("png-ztxt-bomb", _image("x.png", _ztxt_bomb), "corrupt or truncated image"),
    Case("tiff-frame-without-dimensions", _image("x.tif", _tiff_second_frame_without_dimensions),
         r"corrupt or truncated image \(TypeError: Missing dimensions\)"),
    Case("gif-as-png-frame-cut-off", _image("x.png", _gif_with_a_frame_cut_off),
         r"corrupt or truncated image \(IndexError: "),
    Case("npy-object", _array_file("x.npy", np.array([[None, 1]], dtype=object)), "not a readable .npy array"),
    Case("npy-1d", _array_file("x.npy", np.zeros(16)), r"expected an HxW or HxWx3 array, got shape \(16,\)"),
    Case("npy-nan", _array_file("x.npy", NAN_IMAGE), "8 pixel values are NaN or infinite"),
    Case("npy-inf", _array_file("x.npy", np.full((4, 4), -np.inf)), "16 pixel values are NaN or infinite"),
    Case("npy-huge-declared", _image("x.npy", lambda: npy_header((100_000, 100_000)) + bytes(64)),
         "not a readable .npy array"),
    Case("npy-unbalanced-header", _image("x.npy", _unbalanced_npy_header), "not a readable .npy array"),
    Case("npy-truncated", _image("x.npy", lambda: _npy(np.zeros((8, 8)))[:100]), "not a readable .npy array"),
    Case("tiff-float-nan", _array_file("x.tif", NAN_IMAGE), "8 pixel values are NaN or infinite"),
    # python-gdcm, which pydicom tried first for JPEG, aborted the process on it (SIGABRT, exit 134)
    Case("dicom-jpeg-corrupt-huffman-table",
         lambda folder: jpeg_dicom_with_inserted_bytes(folder / "x.dcm", b"\0\0", 108),
         r"could not decode the JPEG Baseline \(Process 1\) pixel data \(pillow: .*; pylibjpeg: "),
    # a US element 4 bytes long reads as two numbers: int() of them was a TypeError traceback
    Case("dicom-samples-per-pixel-two-values", _image("x.dcm", lambda: _dicom_with(SamplesPerPixel=[1, 1])),
         "Samples per Pixel must be one value, got 2"),
    Case("dicom-rows-two-values", _image("x.dcm", lambda: _dicom_with(Rows=[128, 128])),
         "Rows must be one value, got 2", cli=False),
]


# ---------------------------------------------------------------- NIfTI (read_nifti)


def _nifti_bytes(volume: np.ndarray | None = None, gz: bool = False) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / ("v.nii.gz" if gz else "v.nii")
        write_nifti(path, np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) if volume is None else volume,
                    (2.0, 1.0, 1.0))
        return path.read_bytes()


def _nifti_header(shape: tuple[int, ...], dtype: type = np.float32) -> bytes:
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\x00" * 4  # 348 bytes + the 4-byte extension flag


def _nifti_bomb(folder: Path) -> Path:
    """32 GB declared (2048^3 float32): refused from the header, nothing beyond it decompressed."""
    return gzip_zeros(folder / "v.nii.gz", _nifti_header((2048, 2048, 2048)), 1 << 20)


def _negative_dims() -> bytes:
    data = bytearray(_nifti_bytes())
    data[42:44] = struct.pack("<h", -5)  # dim[1]
    return bytes(data)


NIFTI_CASES = [
    Case("nii-zero-bytes", _image("v.nii", lambda: b""), ""),
    *[Case(f"nii-truncated-{cut}", _image("v.nii", lambda cut=cut: _nifti_bytes()[:cut]), "", cli=cut == 3)
      for cut in (3, 100, 352, -10)],
    *[Case(f"niigz-truncated-{cut}", _image("v.nii.gz", lambda cut=cut: _nifti_bytes(gz=True)[:cut]), "",
           cli=cut == 5) for cut in (5, 60, -9)],
    Case("nii-wrong-magic-png", _image("v.nii", _png_bytes), "not a NIfTI file"),
    Case("niigz-plain-gzip-text", _image("v.nii.gz", lambda: gzip.compress(b"MRN123 " * 100, mtime=0)),
         "not a NIfTI file"),
    Case("niigz-bomb-32GB", _nifti_bomb, "volume too large.*refused before decompressing"),
    Case("nii-nan-voxels", _image("v.nii", lambda: _nifti_bytes(np.full((2, 3, 4), np.nan, np.float32))),
         "NaN or infinite"),
    Case("nii-complex", _image("v.nii", lambda: _nifti_header((2, 2, 2), np.complex64) + bytes(64)),
         "unsupported NIfTI voxel type"),
    Case("nii-negative-dims", _image("v.nii", _negative_dims), ""),
]


LOADER_CASES = MANIFEST_CASES + NPZ_CASES + MEDPIX_CASES + IU_CASES + VQA_CASES + DICOM_CASES


# ---------------------------------------------------------------- the checks


def _case_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "case"
    folder.mkdir(parents=True)
    return folder


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


def _check_message(message: str, case: Case, target: Path) -> None:
    """The one-line message names the file, states the problem and leaks no planted identifier."""
    assert (case.names or target.name) in message, message
    assert re.search(case.match, message), message
    assert MARKER not in message, message


def _read_all(dataset) -> None:
    for record in dataset:
        for image in record.images:
            read_image(image)


def _library_error(case: Case, target: Path, reader: Callable[[Path], Any]) -> Exception:
    """Run the library on the hostile input; return the medvl error it raised."""
    with pytest.raises((DataError, InputError)) as caught:
        reader(target)
    assert isinstance(caught.value, case.error)
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    _check_message(message, case, target)
    return caught.value


def _cli(case: Case, target: Path, model: Path, out: Path, dataset: bool) -> tuple[Any, str]:
    """``medvl eval zero-shot`` on a dataset that fails to load, else ``medvl predict`` on the image file."""
    from cli_helpers import invoke

    if dataset and case.stage == "load":
        return invoke("eval", "zero-shot", "--model", model, "--data", target, "--split", "all",
                      "--json", out / "zs.json", "-q")
    image = target / case.names if target.is_dir() and case.names else target
    return invoke("predict", image, "--model", model, "--labels", "normal,effusion", "--json", out / "p.json")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny model (random weights): the CLI commands need one to get to reading the data."""
    from medvl.models.registry import create_model

    folder = tmp_path_factory.mktemp("model") / "tiny"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


def _check_row(case: Case, tmp_path: Path, model: Path, library: Callable[[Path], Any], dataset: bool) -> None:
    target = case.build(_case_folder(tmp_path))
    before = _files(tmp_path)
    _library_error(case, target, library)
    assert _files(tmp_path) == before  # the library wrote nothing
    if not case.cli:
        return
    result, output = _cli(case, target, model, tmp_path / "out", dataset)
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    _check_message(" ".join(lines), case, target)
    assert _files(tmp_path) == before  # no result file, no partial file, no cache


def _load_then_read(target: Path, **kwargs: Any) -> None:
    _read_all(load_dataset(target, **kwargs))


ERROR_ROWS = [case for case in LOADER_CASES if case.stage != "skip"]


@pytest.mark.parametrize("case", ERROR_ROWS, ids=lambda case: case.id)
def test_loader_refuses_hostile_input(case: Case, tmp_path: Path, tiny_model: Path):
    if case.stage == "read":  # the dataset itself loads; the image fails when read
        assert len(load_dataset(case.build(_case_folder(tmp_path / "first")))) == 1
    _check_row(case, tmp_path, tiny_model, lambda target: _load_then_read(target, **case.kwargs), dataset=True)


@pytest.mark.parametrize("case", [case for case in LOADER_CASES if case.stage == "skip"], ids=lambda case: case.id)
def test_loader_skips_documented_bad_records(case: Case, tmp_path: Path):
    target = case.build(_case_folder(tmp_path))
    before = _files(tmp_path)
    dataset = load_dataset(target)
    assert len(dataset) == case.kept
    _read_all(dataset)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("case", IMAGE_CASES, ids=lambda case: case.id)
def test_image_reader_refuses_hostile_file(case: Case, tmp_path: Path, tiny_model: Path):
    _check_row(case, tmp_path, tiny_model, read_image, dataset=False)


@pytest.mark.parametrize("case", NIFTI_CASES, ids=lambda case: case.id)
def test_nifti_reader_refuses_hostile_file(case: Case, tmp_path: Path, tiny_model: Path):
    _library_error(case, case.build(_case_folder(tmp_path / "direct")), read_nifti)
    _check_row(case, tmp_path, tiny_model, read_image, dataset=False)


@pytest.mark.parametrize("case", [MANIFEST_CASES[0], NPZ_CASES[9], VQA_CASES[-5]], ids=lambda case: case.id)
def test_cli_train_exits_2_and_writes_no_run(case: Case, tmp_path: Path):
    from cli_helpers import invoke

    target = case.build(_case_folder(tmp_path))
    out = tmp_path / "run"
    result, output = invoke("train", "--data", target, "--model", "phantom-tiny", "--out", out, "--max-steps", 1,
                            "-q")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert not out.exists()


def test_outside_root_opt_in_through_the_cli(tmp_path: Path, tiny_model: Path):
    """The same manifest loads with --allow-outside-root (the refusal is the default, not a bug)."""
    from cli_helpers import invoke

    target = _outside_rows("dotdot")(_case_folder(tmp_path))
    result, output = invoke("eval", "zero-shot", "--model", tiny_model, "--data", target, "--split", "all",
                            "--label-column", "finding", "--allow-outside-root", "-q")
    assert result.exit_code == 0, output


def test_a_multi_frame_image_reads_its_first_frame_and_the_log_does_not_name_it(tmp_path, caplog):
    """A dataset's image paths can carry patient ids: the warning counts frames, it does not name the file."""
    import logging

    from medvl.data.images import read_pil

    path = tmp_path / "DOE_JOHN_0042.tif"
    frames = [Image.fromarray(np.full((8, 8), 10 + 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING):
        pixels = read_pil(path)
    assert pixels.shape == (8, 8) and float(pixels.mean()) == 10.0
    assert "3 frames" in caplog.text and "DOE" not in caplog.text


def test_an_animated_png_is_refused_by_the_reader_and_the_cli_as_a_gif_or_tiff_is_by_the_service(tmp_path,
                                                                                                 tiny_model):
    """An APNG was read as its default image (a warning in the log only) while a browser shows its animation: the
    reading page showed one picture, the model answered on another. It is refused, naming the frames."""
    from cli_helpers import invoke
    from medvl.data.images import read_image_bytes

    path = animated_png(tmp_path / "DOE_JOHN.png")
    reason = "an animated PNG of 2 frames: send one image"
    with pytest.raises(DataError, match=reason):
        read_image(path)
    with pytest.raises(DataError, match=reason):
        read_image_bytes(path.read_bytes(), "upload")
    result, output = invoke("predict", path, "--model", tiny_model, "--labels", "normal,effusion")
    assert result.exit_code == 2 and reason in " ".join(output.split()) and "Traceback" not in output, output
    single = tmp_path / "single.png"
    Image.open(path).save(single)  # its default image alone: read as before
    assert read_image(single)[:, :8].min() == 255


def test_json_files_read_back_nested_too_deeply_are_errors_naming_the_file(tmp_path):
    """JSON nested 100,000 deep made json raise RecursionError, which the readers of an index's index.json, a pulled
    folder's pull-report.json, a model folder's config.json (read for its dimensions), a phantom's dataset.json and
    a bench run's state files did not catch (they caught ValueError): a traceback. Each is now its own error naming
    the file (``medvl.io.read_json``)."""
    from medvl.bench.runner import _json_object
    from medvl.bench.suite import _model_config
    from medvl.clinical.pull import read_report
    from medvl.data.phantom.generate import phantom_description
    from medvl.errors import ModelError
    from medvl.index import open_index
    from medvl.models.registry import model_spatial_dims

    deep = b"[" * 100_000
    for name in ("index.json", "pull-report.json", "config.json", "dataset.json", "state.json"):
        (tmp_path / name).write_bytes(deep)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "index.json"))):
        open_index(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'pull-report.json'}: unreadable pull report")):
        read_report(tmp_path)
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'config.json'}: cannot read the model config")):
        model_spatial_dims(tmp_path)
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'config.json'}: unreadable model config")):
        _model_config(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dataset.json'}: not a valid UTF-8 JSON")):
        phantom_description(tmp_path)
    assert _json_object(tmp_path / "state.json") == (None, "not JSON: JSON nested too deeply")
