"""Builders of hostile input files for the loader tests: real bytes an attacker could send.

Decompression bombs are built without ever holding the decompressed data: a deflate stream of
zeros is made of one compressed 16 MiB piece repeated (a full flush between pieces resets the
compressor, so every piece compresses to the same bytes), and the CRC is computed chunk by chunk.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PIECE = 1 << 24  # bytes of zeros per repeated deflate piece


def deflate_repeated(prefix: bytes, chunk: bytes, count: int, wbits: int = -15) -> tuple[bytes, int]:
    """(deflate stream of ``prefix`` + ``count`` copies of ``chunk``, its CRC-32), compressing ``chunk`` once."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    parts = [compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(prefix)
    if count:
        piece = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
        parts.append(piece * count)
        for _ in range(count):
            crc = zlib.crc32(chunk, crc)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def deflate_zeros(prefix: bytes, zeros: int, wbits: int = -15) -> tuple[bytes, int]:
    """(deflate stream of ``prefix`` + ``zeros`` zero bytes, its CRC-32), built in O(zeros / 16 MiB)."""
    whole, rest = divmod(zeros, PIECE)
    data, crc = deflate_repeated(prefix, bytes(PIECE), whole, wbits)
    if not rest:
        return data, crc
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)  # the same stream again, with the tail
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    if whole:
        head += (compressor.compress(bytes(PIECE)) + compressor.flush(zlib.Z_FULL_FLUSH)) * whole
    return head + compressor.compress(bytes(rest)) + compressor.flush(), zlib.crc32(bytes(rest), crc)


def write_zip(path: Path, members: list[tuple[str, bytes, int, int]]) -> Path:
    """A zip of deflated members ``(name, deflate stream, crc, uncompressed size)`` (sizes < 4 GiB)."""
    out, directory = io.BytesIO(), io.BytesIO()
    for name, data, crc, size in members:
        offset = out.tell()
        encoded = name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(encoded), 0))
        out.write(encoded + data)
        directory.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size,
                                    len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    start = out.tell()
    out.write(directory.getvalue())
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory.getvalue()),
                          start, 0))
    path.write_bytes(out.getvalue())
    return path


def npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    """The bytes of a version 1.0 ``.npy`` header declaring ``shape`` and ``descr``."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def npz_bomb(path: Path, count: int, size: int = 28) -> Path:
    """A real MedMNIST-shaped ``.npz`` (correct sizes and CRCs) whose ``train_images`` are ``count``
    all-zero ``size x size`` uint8 images: ~1 MB on disk per GB of pixels (1.1 GB at count=1.4 million)."""
    header = npy_header((count, size, size))
    images, crc = deflate_zeros(header, count * size * size)
    labels = io.BytesIO()
    np.lib.format.write_array(labels, np.zeros((count, 1), np.uint8))
    label_bytes = labels.getvalue()
    packed = zlib.compressobj(9, zlib.DEFLATED, -15)
    label_data = packed.compress(label_bytes) + packed.flush()
    return write_zip(path, [("train_images.npy", images, crc, len(header) + count * size * size),
                            ("train_labels.npy", label_data, zlib.crc32(label_bytes), len(label_bytes))])


GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


def gzip_zeros(path: Path, prefix: bytes, zeros: int) -> Path:
    """A valid gzip file of ``prefix`` then ``zeros`` zero bytes (a gzip bomb when ``zeros`` is large)."""
    data, crc = deflate_zeros(prefix, zeros)
    path.write_bytes(GZIP_HEADER + data + struct.pack("<II", crc, (len(prefix) + zeros) & 0xFFFFFFFF))
    return path


def gzip_repeated_lines(path: Path, prefix: bytes, line: bytes, size: int) -> Path:
    """A valid gzip file of ``prefix`` then ``line`` repeated to about ``size`` bytes (a text bomb)."""
    chunk = line * (PIECE // len(line))
    count = max(1, size // len(chunk))
    data, crc = deflate_repeated(prefix, chunk, count)
    path.write_bytes(GZIP_HEADER + data + struct.pack("<II", crc, (len(prefix) + count * len(chunk)) & 0xFFFFFFFF))
    return path


def png_declaring(path: Path, width: int, height: int, mode: int = 0, depth: int = 8) -> Path:
    """A PNG whose header declares ``width x height`` with a tiny (wrong) pixel stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, mode, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + pixels + chunk(b"IEND", b""))
    return path


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzip-compressed with a fixed timestamp (same input, same bytes)."""
    return gzip.compress(data, mtime=0)


def zero_affine_nifti(path: Path) -> Path:
    """A NIfTI file whose sform is all zeros (sform_code 1, qform_code 0): no voxel axis has a direction."""
    import nibabel

    stored = bytearray(nibabel.Nifti1Image(np.zeros((12, 10, 8), np.int16), np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes())
    for k in range(12):
        struct.pack_into("<f", stored, 280 + 4 * k, 0.0)  # srow_x / srow_y / srow_z
    struct.pack_into("<h", stored, 252, 0)  # qform_code
    struct.pack_into("<h", stored, 254, 1)  # sform_code
    path.write_bytes(bytes(stored))
    return path


def corrupt_gzip_nifti(path: Path) -> Path:
    """A stored (level 0) .nii.gz with one bit flipped in the voxel data: only the gzip CRC can tell."""
    import nibabel

    volume = (np.indices((12, 10, 8)).sum(0) * 10 - 100).astype(np.int16)
    stored = nibabel.Nifti1Image(volume.transpose(2, 1, 0), np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes()
    data = bytearray(gzip.compress(stored, compresslevel=0, mtime=0))
    data[len(data) - 200] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def patched_nifti(path: Path, *fields: tuple[str, int, tuple]) -> Path:
    """A small valid NIfTI-1 volume (12 x 10 x 8 int16, 2 x 2 x 3 mm, voxels from byte 352) with header fields
    overwritten: each ``(struct format, byte offset, values)``; gzip-compressed when ``path`` ends in ``.gz``."""
    import nibabel

    volume = (np.indices((12, 10, 8)).sum(0) * 10 - 100).astype(np.int16)
    stored = bytearray(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes())
    for layout, offset, values in fields:
        struct.pack_into(layout, stored, offset, *values)
    path.write_bytes(gzip_bytes(bytes(stored)) if path.name.endswith(".gz") else bytes(stored))
    return path


def jpeg_dicom_with_inserted_bytes(path: Path, inserted: bytes, after_dht: int) -> Path:
    """pydicom's ``SC_rgb_jpeg.dcm`` (JPEG Baseline, 256 x 256 RGB) with ``inserted`` written into its JPEG stream
    ``after_dht`` bytes after the first DHT marker (``FF C4``), the DICOM fragment lengths left as they were.

    python-gdcm aborted the whole process (SIGABRT: a C++ exception nothing catches) on both of these:
    ``b"\\0"`` at 0 (an extraneous byte before the marker, which the other decoders skip: the picture is intact)
    and ``b"\\0\\0"`` at 108 (inside the Huffman tables: no decoder can decode the scan)."""
    from pydicom.data import get_testdata_file

    data = bytearray(Path(get_testdata_file("SC_rgb_jpeg.dcm")).read_bytes())
    at = data.index(b"\xff\xc4", data.index(b"\xff\xd8\xff")) + after_dht
    data[at:at] = inserted
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def animated_png(path: Path) -> Path:
    """A 2-frame APNG whose default image (left half white, what a decoder reads) is not part of its animation
    (top half white, what a browser shows)."""
    default, shown = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    default[:, :8] = 255
    shown[:8] = 255
    Image.fromarray(default).save(path, save_all=True, append_images=[Image.fromarray(shown)], default_image=True,
                                  duration=500, loop=0)
    return path



def grey_multiframe_dicom(path: Path, frames: int, rows: int, columns: int) -> Path:
    """A MONOCHROME2 CT of ``frames`` frames of ``rows`` x ``columns`` (Samples per Pixel 1), random 12-bit values, no
    window: 64 frames 3 columns wide were read by a 2D model as one 64 x 64 colour image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    pixels = np.random.default_rng(0).integers(0, 2000, (frames, rows, columns))
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
