"""PACS pull and de-identification on real servers and real files.

The ``orthanc`` tests run against a real Orthanc (Debian packages ``orthanc`` +
``orthanc-dicomweb``) started by ``scripts/orthanc.sh`` on a free localhost port with a test user;
they are skipped, with the reason, where Orthanc is not installed (``scripts/orthanc.sh install``).
DICOM files with distinctive patient names, IDs, dates, accession numbers and institutions are
written here with pydicom, next to files from ``pydicom-data``; they are uploaded over the REST API,
searched (QIDO-RS), pulled (WADO-RS), de-identified, loaded and embedded. The same Orthanc answers
DIMSE too (its DICOM server on, medvl registered as its C-MOVE destination): C-ECHO, C-FIND, and
pulls by C-GET and C-MOVE through pynetdicom. Every byte of every output (pulled files, pull
reports, index) is then searched for the input's identifiers. Error handling is checked against
real servers too: Orthanc (401, unknown study, wrong URL, wrong AE title), a closed port, a port
that never answers, and a small ``http.server`` that answers like a broken PACS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicognito")
requests = pytest.importorskip("requests")
data_store = pytest.importorskip("data_store")

from pydicom.multival import MultiValue  # noqa: E402

from cli_helpers import invoke  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402
from medvl.clinical.pacs import (  # noqa: E402
    REPORT_NAME,
    STATE_NAME,
    DicomWebClient,
    iter_multipart,
    pull_study,
    read_report,
    split_credentials,
)
from medvl.data import load_dataset  # noqa: E402
from medvl.data.images import read_image  # noqa: E402
from medvl.errors import DataError, InputError  # noqa: E402

STORE = Path(data_store.__file__).parent / "data"
SCRIPT = REPO_ROOT / "scripts" / "orthanc.sh"
UID_ROOT = "1.2.826.0.1.3680043.8.498"  # pydicom's UID root
PYDICOM_DATA_FILES = ("MR-SIEMENS-DICOM-WithOverlays.dcm", "693_J2KR.dcm", "SC_rgb.dcm")
USER, PASSWORD = "medvl", "orthanc-test-pw"
MOVE_AET = "MEDVL-TEST"  # the AE title Orthanc knows medvl by (calling AE title and C-MOVE destination)

# Two made-up patients. Their dates are years apart from each other and from the pydicom-data
# files' dates, so that no date shifted by de-identification (62 to 730 days back) can land on
# another input's date and pass for a leak.
PATIENTS = {
    "A": {"name": "Vornholt^Ilsabet^Marit", "id": "MRN58213907", "other_id": "ALT99120387", "birth": "19610423",
          "date": "20190817", "accession": "ACC73310542", "institution": "Sankt Quirin Klinikum Lindau",
          "physician": "Brandauer^Wendelin", "address": "Seegasse 14, Lindau"},
    "B": {"name": "Quastenberg^Odilia", "id": "MRN40771526", "other_id": "ALT55830142", "birth": "19480302",
          "date": "20120610", "accession": "ACC66120984", "institution": "Ostholm Regional Hospital",
          "physician": "Pfeilschifter^Anselm", "address": "Kanalweg 3, Ostholm"},
}


# ---------------------------------------------------------------------- test DICOM files


def write_dicom(path: Path, patient: dict, *, study: str, series: str, number: int, modality: str,
                pixels: np.ndarray, series_number: int, description: str, position: float | None = None,
                view: str | None = None) -> Path:
    """A DICOM file carrying every kind of identifier; UIDs embed the study date, as real ones often do."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_classes = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                   "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
    date = patient["date"]
    sop_uid = f"{UID_ROOT}.{date}.{study}.{series_number}.{number}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_classes[modality], sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_classes[modality], sop_uid
    ds.StudyInstanceUID = f"{UID_ROOT}.{date}.{study}"
    ds.SeriesInstanceUID = f"{UID_ROOT}.{date}.{study}.{series_number}"
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = patient["name"], patient["id"], patient["other_id"]
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAddress = patient["birth"], "F", patient["address"]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.AccessionNumber, ds.StudyID = patient["accession"], patient["accession"][-6:]
    ds.InstitutionName, ds.ReferringPhysicianName = patient["institution"], patient["physician"]
    ds.StudyDescription = f"Follow-up of {patient['name'].split('^')[0]}"
    ds.SeriesDescription = description
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, number
    ds.BodyPartExamined = "CHEST"
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.7, 0.7]
    if position is not None:
        ds.ImagePositionPatient = [-11.2, -11.2, position]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept = 2.5, 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_patients(folder: Path) -> dict[str, list[Path]]:
    """Patient A: a 4-slice CT series (a volume), a CR and an MR image; patient B: a DX and a CR image."""
    rng = np.random.default_rng(4)
    files: dict[str, list[Path]] = {"A": [], "B": []}
    for index, z in enumerate((-7.5, -2.5, 2.5, 7.5)):  # written out of order on purpose
        files["A"].append(write_dicom(folder / f"a-ct-{(index * 3) % 4}.dcm", PATIENTS["A"], study="1", series="1",
                                      number=index + 1, modality="CT", pixels=rng.integers(0, 2000, (32, 32)),
                                      series_number=1, description="Thorax 2.5 mm", position=z))
    files["A"].append(write_dicom(folder / "a-cr.dcm", PATIENTS["A"], study="1", series="2", number=1, modality="CR",
                                  pixels=rng.integers(0, 4000, (48, 40)), series_number=2,
                                  description="PA Vornholt", view="PA"))
    files["A"].append(write_dicom(folder / "a-mr.dcm", PATIENTS["A"], study="1", series="3", number=1, modality="MR",
                                  pixels=rng.integers(0, 1000, (40, 40)), series_number=3, description="T1 axial"))
    files["B"].append(write_dicom(folder / "b-dx.dcm", PATIENTS["B"], study="2", series="1", number=1, modality="DX",
                                  pixels=rng.integers(0, 4000, (56, 48)), series_number=1, description="Chest PA",
                                  view="PA"))
    files["B"].append(write_dicom(folder / "b-cr.dcm", PATIENTS["B"], study="2", series="2", number=1, modality="CR",
                                  pixels=rng.integers(0, 4000, (48, 56)), series_number=2, description="Lateral",
                                  view="LL"))
    return files


def date_forms(date: str) -> set[str]:
    y, m, d = date[:4], date[4:6], date[6:8]
    return {date, f"{y}-{m}-{d}", f"{y}.{m}.{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}"}


def secrets_of(paths) -> set[bytes]:
    """The identifiers of DICOM files: patient name (whole and parts), IDs, accession number, institution,
    physician, address, and every date in several spellings. Values under 5 characters are left out
    (they match by chance in binary data)."""
    found: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "ReferringPhysicianName"):
            name = str(ds.get(keyword) or "")
            found |= {name, *name.replace("=", "^").split("^")}
        for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "PatientAddress"):
            value = ds.get(keyword)
            found |= {str(v) for v in (value if isinstance(value, MultiValue) else [value]) if v}
        for element in ds.iterall():
            if element.VR in ("DA", "DT") and element.value:
                digits = "".join(c for c in str(element.value) if c.isdigit())[:8]
                if len(digits) == 8:
                    found |= date_forms(digits)
    return {value.encode() for value in found if len(value.strip()) >= 5}


def leaks(folders, secrets: set[bytes]) -> list[tuple[str, str]]:
    """(file, secret) for every secret found in any byte of any file under the folders."""
    found = []
    for folder in folders:
        files = [folder] if Path(folder).is_file() else sorted(p for p in Path(folder).rglob("*") if p.is_file())
        for path in files:
            data = path.read_bytes()
            found += [(str(path), secret.decode()) for secret in secrets if secret in data]
    return found


def pydicom_data_copies(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(STORE / name, folder / f"store-{index}.dcm"))
            for index, name in enumerate(PYDICOM_DATA_FILES)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch

    from medvl.models.registry import create_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pacs-model") / "phantom-tiny"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


# -------------------------------------------------------------------------------- Orthanc


@dataclass
class Orthanc:
    url: str  # REST root
    dicomweb: str
    dimse: str  # dicom://AET@127.0.0.1:PORT
    peer_port: int  # where Orthanc sends C-MOVE results for AE title MOVE_AET
    files: dict[str, list[Path]] = field(default_factory=dict)  # study name -> uploaded files
    studies: dict[str, str] = field(default_factory=dict)  # study name -> StudyInstanceUID

    def client(self, **options) -> DicomWebClient:
        return DicomWebClient(self.dicomweb, username=USER, password=PASSWORD, **options)


def start_orthanc(folder: Path, **settings: str):
    """Start an Orthanc with scripts/orthanc.sh in ``folder`` (``settings``: more of its environment
    variables), yield it, stop it."""
    env = {**os.environ, "ORTHANC_DIR": str(folder), "ORTHANC_USER": USER, "ORTHANC_PASSWORD": PASSWORD,
           "ORTHANC_DICOM_PORT": "auto", "ORTHANC_PEER_AET": MOVE_AET, **settings}
    for name in ("ORTHANC_PORT", "ORTHANC_AET", "ORTHANC_PEER_PORT", "ORTHANC_LIMIT_FIND"):
        if name not in settings:
            env.pop(name, None)
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120)
    if started.returncode == 3:
        pytest.skip(f"Orthanc not available: {started.stderr.strip()}")
    assert started.returncode == 0, f"scripts/orthanc.sh start failed:\n{started.stderr}"
    info = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    try:
        yield Orthanc(info["url"], info["dicomweb"], info["dimse"], int(info["peer_port"]))
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=60)


def upload(orthanc: Orthanc, files: dict[str, list[Path]]) -> Orthanc:
    """POST the files to Orthanc's /instances; ``files``: study name -> files of that study."""
    orthanc.files = files
    with requests.Session() as session:
        session.auth = (USER, PASSWORD)
        for name, paths in orthanc.files.items():
            for path in paths:
                answer = session.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=60)
                assert answer.status_code == 200 and answer.json()["Status"] == "Success", answer.text
            orthanc.studies[name] = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    return orthanc


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc with the DICOMweb plugin, started by scripts/orthanc.sh; stopped at the end."""
    yield from start_orthanc(tmp_path_factory.mktemp("orthanc"))


@pytest.fixture(scope="session")
def uploaded(orthanc, tmp_path_factory) -> Orthanc:
    """The made-up patients and the pydicom-data files, uploaded with POST /instances."""
    folder = tmp_path_factory.mktemp("upload")
    patients = write_patients(folder / "made-up")
    store = pydicom_data_copies(folder / "store")
    return upload(orthanc, {"A": patients["A"], "B": patients["B"],
                            **{f"store-{i}": [p] for i, p in enumerate(store)}})


@pytest.fixture(scope="session")
def capped(tmp_path_factory) -> Iterator[Orthanc]:
    """A second Orthanc that caps every search at 2 results (LimitFindResults and LimitFindInstances),
    silently, as many PACS do, holding patient A (a 4-slice CT series, a CR and an MR image)."""
    for orthanc in start_orthanc(tmp_path_factory.mktemp("orthanc-capped"), ORTHANC_LIMIT_FIND="2"):
        yield upload(orthanc, {"A": write_patients(tmp_path_factory.mktemp("upload-capped"))["A"]})


@pytest.fixture(scope="module")
def pulled_a(uploaded, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Patient A's study pulled in two runs: 2 instances (limit), then the rest (resume)."""
    out = tmp_path_factory.mktemp("pull-a") / "a"
    with uploaded.client() as client:
        first = pull_study(client, uploaded.studies["A"], out, limit=2, show_progress=False)
        assert (out / STATE_NAME).is_file()  # unfinished: the state (with the seed) stays for the resume
        second = pull_study(client, [uploaded.studies["A"]], out, show_progress=False)
    return out, [first, second]


@pytest.mark.orthanc
def test_qido_search_finds_the_uploaded_studies(uploaded):
    with uploaded.client() as client:
        [study] = client.search_studies({"PatientID": PATIENTS["A"]["id"]})
        assert study["PatientName"] == PATIENTS["A"]["name"] and study["StudyInstanceUID"] == uploaded.studies["A"]
        assert study["NumberOfStudyRelatedInstances"] == 6
        by_date = client.search_studies({"StudyDate": "20120101-20121231"})
        assert [s["StudyInstanceUID"] for s in by_date] == [uploaded.studies["B"]]
        with_ct = {s["StudyInstanceUID"] for s in client.search_studies({"ModalitiesInStudy": "CT"})}
        assert uploaded.studies["A"] in with_ct and uploaded.studies["B"] not in with_ct
        series = client.search_series(uploaded.studies["A"])
        assert sorted(s["Modality"] for s in series) == ["CR", "CT", "MR"]
        assert len(client.search_instances(uploaded.studies["A"], fields=("SOPInstanceUID",))) == 6
        assert client.search_studies({"PatientID": "no-such-patient"}) == []
        with pytest.raises(InputError, match="unknown DICOM attribute"):
            client.search_studies({"PatientIdentifier": "x"})


@pytest.mark.orthanc
def test_wildcard_and_name_searches_find_over_dicomweb_what_dimse_finds(uploaded, monkeypatch, caplog):
    """``*``, ``?`` and the name separator ``^`` reach Orthanc as matching characters (it matches
    ``%2A`` / ``%5E`` literally): each search finds over QIDO-RS the studies C-FIND finds."""
    pytest.importorskip("pynetdicom")
    from medvl.cli.common import console

    a, b = uploaded.studies["A"], uploaded.studies["B"]
    searches = [({"PatientName": "Vorn*"}, [a]), ({"PatientName": "Vornholt^Ilsabet^Marit"}, [a]),
                ({"PatientName": "vornhol?^*"}, [a]), ({"PatientName": "Quastenberg^Odilia"}, [b]),
                ({"PatientName": "*^Odilia"}, [b]), ({"StudyDescription": "Follow*"}, sorted([a, b])),
                ({"StudyDescription": "Follow-up?of?Quastenberg"}, [b]), ({"PatientID": "MRN5821390?"}, [a]),
                ({"PatientName": "Vorn*", "ModalitiesInStudy": "CT"}, [a]), ({"PatientName": "Nobody^*"}, [])]
    dimse = dimse_client(uploaded)
    with uploaded.client() as client:
        for filters, expected in searches:
            over_web = sorted(s["StudyInstanceUID"] for s in client.search_studies(filters))
            over_dimse = sorted(s["StudyInstanceUID"] for s in dimse.search_studies(filters))
            assert over_web == over_dimse == expected, filters
        assert client.search_studies({"StudyDescription": "Follow-up of Vornholt"}) == []  # %20: not decoded
        assert "sent percent-encoded (space)" in caplog.text and "Vornholt" not in caplog.text
    assert [s["StudyInstanceUID"] for s in dimse.search_studies({"StudyDescription": "Follow-up of Vornholt"})] == [a]
    monkeypatch.setattr(console, "width", 200)
    auth = ("--user", USER, "--password", PASSWORD)
    for option in (("--patient-name", "Vornholt^*"), ("--filter", "StudyDescription=Follow-up?of?Vorn*")):
        result, output = invoke("pacs", "search", "--url", uploaded.dicomweb, *auth, *option, "--uids")
        assert result.exit_code == 0 and output.split() == [a], output


@pytest.mark.orthanc
def test_lists_of_values_find_the_same_studies_over_dicomweb_and_dimse(uploaded):
    """A list written with ',' (QIDO-RS's separator) found the studies over DICOMweb and none over
    C-FIND, which took it for one invalid value; written with '\\' (DICOM's) the other way round, both
    with exit code 0. Either separator now finds the same studies over both."""
    pytest.importorskip("pynetdicom")
    a, b = uploaded.studies["A"], uploaded.studies["B"]
    dimse = dimse_client(uploaded)
    with uploaded.client() as client:
        for separator in (",", "\\", " , "):
            for filters, expected in (({"StudyInstanceUID": separator.join([a, b])}, sorted([a, b])),
                                      ({"ModalitiesInStudy": separator.strip().join(["CR", "DX"])}, sorted([a, b])),
                                      ({"ModalitiesInStudy": "DX,SEG", "PatientID": "MRN*"}, [b])):
                over_web = sorted(s["StudyInstanceUID"] for s in client.search_studies(filters))
                over_dimse = sorted(s["StudyInstanceUID"] for s in dimse.search_studies(filters))
                assert over_web == over_dimse == expected, filters
    for url in (uploaded.dicomweb, uploaded.dimse):
        options = ("--user", USER, "--password", PASSWORD) if url.startswith("http") else ("--calling-aet", MOVE_AET)
        result, output = invoke("pacs", "search", "--url", url, *options, "--filter", f"StudyInstanceUID={a},{b}",
                                "--uids")
        assert result.exit_code == 0 and sorted(output.split()) == sorted([a, b]), (url, output)


@pytest.mark.orthanc
def test_cli_search_shows_studies_on_the_terminal(uploaded, monkeypatch):
    from medvl.cli.common import console

    monkeypatch.setattr(console, "width", 200)  # a wide terminal: cells unfolded
    auth = ("--user", USER, "--password", PASSWORD)
    result, output = invoke("pacs", "search", "--url", uploaded.dicomweb, *auth, "--patient-id", PATIENTS["B"]["id"])
    assert result.exit_code == 0, output
    assert "Quastenberg" in output and "1 studies" in output  # the user's own terminal may show them
    result, output = invoke("pacs", "search", "--url", uploaded.dicomweb, *auth, "--modality", "CT", "--uids")
    assert result.exit_code == 0, output
    assert uploaded.studies["A"] in output.split()
    result, output = invoke("pacs", "search", "--url", uploaded.dicomweb, *auth, "--study", uploaded.studies["A"])
    assert result.exit_code == 0 and "3 series" in output and "Thorax 2.5 mm" in output, output


@pytest.mark.orthanc
def test_pull_is_deidentified_resumable_and_loads(uploaded, pulled_a):
    out, (first, second) = pulled_a
    assert not first["complete"] and first["counts"]["pulled"] == 2
    assert second["complete"] and second["counts"] == {"studies": 1, "series": 3, "instances": 6, "pulled": 4,
                                                       "already_present": 2}
    assert not (out / STATE_NAME).exists()  # done: the seed is gone
    assert json.loads((out / REPORT_NAME).read_text()) == second
    assert {"PatientName", "PatientID", "StudyDate", "StudyInstanceUID"} <= set(second["deidentification"]["replaced"])
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 6
    headers = [pydicom.dcmread(p) for p in written]
    assert all(ds.PatientIdentityRemoved == "YES" for ds in headers)
    # both runs de-identified with the same seed: one study, three series, as on the server
    assert len({ds.StudyInstanceUID for ds in headers}) == 1 and len({ds.SeriesInstanceUID for ds in headers}) == 3
    assert headers[0].StudyInstanceUID != uploaded.studies["A"]
    dataset = load_dataset(out)
    kinds = sorted(r.meta["kind"] for r in dataset)
    assert kinds == ["image", "image", "volume"]
    [volume] = [r for r in dataset if r.meta["kind"] == "volume"]
    assert volume.meta["slices"] == "4" and volume.meta["slice_spacing_mm"] == "5" and volume.meta["modality"] == "CT"
    originals = sorted((pydicom.dcmread(p) for p in uploaded.files["A"] if "-ct-" in p.name),
                       key=lambda ds: float(ds.ImagePositionPatient[2]))
    expected = np.stack([ds.pixel_array.astype(np.float32) - 1024 for ds in originals])
    # HU, sorted inferior to superior; axial LPS to RAS (as NIfTI is read): rows and columns reversed
    np.testing.assert_array_equal(read_image(volume.image), expected[:, ::-1, ::-1])
    assert all(r.id.startswith(("img-", "vol-")) and r.meta["deidentified"] == "yes" for r in dataset)
    import torch

    from medvl.models.registry import create_model

    torch.manual_seed(0)
    volume_model = create_model("phantom-tiny", **{"image.spatial_dims": 3, "image.image_size": 32})
    embedding = volume_model.encode_images([volume.image])  # the pulled CT series embeds as one volume
    assert embedding.shape == (1, 64) and torch.isfinite(embedding).all()
    with pytest.raises(InputError, match="holds a finished pull"):
        pull_study(uploaded.client(), uploaded.studies["A"], out, show_progress=False)


@pytest.mark.orthanc
def test_pull_from_a_capped_server_says_what_is_missing_and_resumes_to_the_end(capped, tmp_path, monkeypatch):
    """Orthanc capped at 2 results lists 3 of the CT series' 4 instances and pages only within those 3;
    the series' Number of Series Related Instances (4) shows the gap. A pull cut short by --limit stays
    incomplete, saying so, and its resume brings the unlisted slice (the whole series is asked for)."""
    from medvl.cli.common import console

    monkeypatch.setattr(console, "width", 200)
    study, out = capped.studies["A"], tmp_path / "resumed"
    auth = ("--user", USER, "--password", PASSWORD)
    result, output = invoke("pacs", "pull", "--url", capped.dicomweb, *auth, "--study", study, "--out", out,
                            "--limit", 1, "--quiet")
    assert result.exit_code == 0 and (out / STATE_NAME).is_file(), output
    assert ("incomplete: 5 instance(s) missing: series 1 of 3 (CT) has 1 of 4, the server listing only 3 (a capped "
            "search); series 2 of 3 (CR) has 0 of 1; series 3 of 3 (MR) has 0 of 1; rerun the same command") in output
    result, output = invoke("pacs", "pull", "--url", capped.dicomweb, *auth, "--study", study, "--out", out, "--quiet")
    assert result.exit_code == 0 and "pulled 5 instance(s) (1 already there) of 6 in 3 series" in output, output
    assert "incomplete" not in output and not (out / STATE_NAME).exists()
    with capped.client() as client:
        whole = pull_study(client, study, tmp_path / "whole", show_progress=False)  # one run, no limit
    assert whole["complete"] and whole["missing"] is None and whole["counts"]["instances"] == 6
    assert whole["counts"]["pulled"] == 6  # it said "pulled 6 of 5"
    for folder in (out, tmp_path / "whole"):
        assert len(list(folder.rglob("*.dcm"))) == 6
        [volume] = [r for r in load_dataset(folder) if r.meta["kind"] == "volume"]
        assert volume.meta["slices"] == "4" and read_image(volume.image).shape == (4, 32, 32)
    report = read_report(out)
    assert report["complete"] and [s["missing"] for s in report["series"]] == [0, 0, 0]
    assert [(s["instances"], s["listed"]) for s in report["series"]] == [(4, 3), (1, 1), (1, 1)]


class MiscountingProxy(BaseHTTPRequestHandler):
    """Passes every request on to a real Orthanc, but answers series searches with ``count`` as each series'
    Number of Series Related Instances (0020,1209), as a server computing it lazily or from a stale table does,
    and instance searches of the series in ``unlisted`` with nothing; records the paths asked for."""

    upstream = ""
    count: object = 0
    unlisted: set[str] = set()
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        MiscountingProxy.paths.append(self.path)
        headers = {name: self.headers[name] for name in ("Authorization", "Accept") if self.headers[name]}
        answer = requests.get(self.upstream + self.path.removeprefix("/dicom-web"), headers=headers, timeout=60)
        body, path = answer.content, self.path.split("?")[0]
        if answer.ok and path.endswith("/series"):
            items = answer.json()
            for item in items:
                item["00201209"] = {"vr": "IS", "Value": [self.count]}
            body = json.dumps(items).encode()
        elif answer.ok and path.endswith("/instances") and path.split("/")[-2] in self.unlisted:
            body = b"[]"
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _pull_through_miscounting_proxy(uploaded, out, count, unlisted: set[str]) -> dict:
    """Patient A's study pulled through a ``MiscountingProxy`` in front of the real Orthanc that counts ``count``
    instances per series and lists none of the ``unlisted`` series' instances (the paths asked: ``.paths``)."""
    MiscountingProxy.upstream, MiscountingProxy.count = uploaded.dicomweb, count
    MiscountingProxy.unlisted, MiscountingProxy.paths = unlisted, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), MiscountingProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        return pull_study(url, uploaded.studies["A"], out, username=USER, password=PASSWORD, show_progress=False)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.orthanc
@pytest.mark.parametrize("count", [0, -1, "0", 1.5])
def test_a_series_counted_as_zero_or_less_is_still_searched_and_pulled(uploaded, tmp_path, count):
    """A series search counting 0 (or a negative or non-integer number of) instances in each series used to
    skip their instance searches: nothing pulled, the pull state deleted and the pull reported complete. The
    count is a hint: every series' instances are searched for, and all 6 of patient A's instances pulled."""
    report = _pull_through_miscounting_proxy(uploaded, tmp_path / "out", count, unlisted=set())
    searched = [p for p in MiscountingProxy.paths if p.split("?")[0].endswith("/instances")]
    assert len(searched) >= 3  # one instance search (at least) per series
    assert report["complete"] and report["missing"] is None and report["counts"]["pulled"] == 6
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 6


@pytest.mark.orthanc
def test_a_series_whose_instance_search_lists_nothing_is_retrieved_whole(uploaded, tmp_path):
    """A series the server lists, but whose instance search answers nothing (and counts 0): it is asked for
    whole (WADO-RS at series level), not passed over as empty and the pull called complete."""
    with uploaded.client() as client:
        ct = next(s for s in client.search_series(uploaded.studies["A"]) if s["Modality"] == "CT")
    report = _pull_through_miscounting_proxy(uploaded, tmp_path / "out", 0, unlisted={ct["SeriesInstanceUID"]})
    assert report["complete"] and report["counts"]["pulled"] == 6, report["missing"]
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 6


def test_a_series_listed_without_instances_that_brings_nothing_is_missing(tmp_path):
    """A source listing a series but none of its instances, which then delivers nothing for it: the pull is
    incomplete, keeps its state, and says so (it was called complete, its state and seed deleted)."""
    from medvl.clinical.pull import SeriesPlan, run_pull

    class EmptySource:
        url = "test://empty"

        def plan_series(self, study_uids):
            return [SeriesPlan("1.2.3", "1.2.3.1", "CT", 1, [], expected=0)]

        def fetch_series(self, plan, missing):
            yield from ()

    out = tmp_path / "out"
    report = run_pull(EmptySource(), "1.2.3", out, show_progress=False)
    assert not report["complete"] and (out / STATE_NAME).is_file()
    assert report["missing"] == ("1 instance(s) missing: series 1 of 1 (CT) has 0 of 1, the server listing none "
                                 "of its instances")


@pytest.fixture(scope="module")
def pulled_2d(uploaded, tmp_path_factory) -> Path:
    """Patient B and the pydicom-data studies (2D images only), pulled with the CLI."""
    out = tmp_path_factory.mktemp("pull-2d") / "pulled"
    studies = [uploaded.studies[name] for name in uploaded.studies if name != "A"]
    args = [arg for uid in studies for arg in ("--study", uid)]
    result, output = invoke("pacs", "pull", "--url", uploaded.dicomweb, "--user", USER, "--password", PASSWORD,
                            *args, "--out", out, "--quiet")
    assert result.exit_code == 0, output
    assert f"pulled 5 instance(s) (0 already there) of 5 in 5 series of {len(studies)} study(ies)" in output
    return out


@pytest.fixture(scope="module")
def pulled_index(pulled_2d, tiny_model_dir) -> Path:
    """``medvl index build`` on the pulled folder."""
    index = pulled_2d.parent / "index"
    result, output = invoke("index", "build", "--model", tiny_model_dir, "--data", pulled_2d, "--out", index, "--quiet")
    assert result.exit_code == 0, output
    return index


@pytest.mark.orthanc
def test_pulled_folder_embeds_into_an_index(pulled_2d, pulled_index, tiny_model_dir, tmp_path):
    from medvl.index import open_index

    dataset = load_dataset(pulled_2d)
    assert len(dataset) == 5 and {r.meta["kind"] for r in dataset} == {"image"}
    assert {r.meta["modality"] for r in dataset} == {"DX", "CR", "MR", "CT", "OT"}
    with open_index(str(pulled_index)) as opened:
        assert len(opened) == 5
    labelled = tmp_path / "labelled"  # train: label the pulled records by id in a labels.csv sidecar
    shutil.copytree(pulled_2d, labelled)
    rows = [f"{r.id},{'projection' if r.meta['modality'] in ('CR', 'DX') else 'other'}" for r in dataset]
    (labelled / "labels.csv").write_text("id,kind_of_image\n" + "\n".join(rows) + "\n")
    result, output = invoke("train", "--data", labelled, "--model", tiny_model_dir, "--label-column", "kind_of_image",
                            "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 5, "--quiet")
    assert result.exit_code == 0, output
    assert "trained 1 steps on 5 records" in output


@pytest.mark.orthanc
def test_no_identifier_in_any_pulled_or_indexed_byte(uploaded, pulled_a, pulled_2d, pulled_index):
    secrets = secrets_of(path for paths in uploaded.files.values() for path in paths)
    for patient in PATIENTS.values():  # the made-up values are all there to be found
        assert {patient["name"].encode(), patient["id"].encode(), patient["birth"].encode()} <= secrets
        assert {f"{patient['date'][:4]}-{patient['date'][4:6]}-{patient['date'][6:]}".encode()} <= secrets
    raw = [path for paths in uploaded.files.values() for path in paths]
    assert {s for s in secrets if any(s in p.read_bytes() for p in raw)}  # the search works on raw input
    assert leaks([pulled_a[0], pulled_2d, pulled_index], secrets) == []


@pytest.mark.orthanc
def test_keep_identifiers_is_explicit_and_warns(uploaded, tmp_path, caplog):
    out = tmp_path / "identified"
    with pytest.raises(InputError, match="seed"):
        pull_study(uploaded.client(), uploaded.studies["B"], out, keep_identifiers=True, seed=1, show_progress=False)
    report = pull_study(uploaded.client(), uploaded.studies["B"], out, keep_identifiers=True, show_progress=False)
    assert "keeping patient identifiers" in caplog.text and not report["deidentified"]
    pulled = sorted(pydicom.dcmread(p).SOPInstanceUID for p in out.rglob("*.dcm"))
    assert pulled == sorted(pydicom.dcmread(p).SOPInstanceUID for p in uploaded.files["B"])
    assert {str(pydicom.dcmread(p).PatientName) for p in out.rglob("*.dcm")} == {PATIENTS["B"]["name"]}
    assert "deidentification" not in report


@pytest.mark.orthanc
def test_server_errors_are_clear_and_hide_credentials(uploaded, tmp_path):
    host = uploaded.dicomweb.split("://")[1]
    with DicomWebClient(f"http://{USER}:wrong-password@{host}") as client:
        with pytest.raises(DataError, match="authentication failed") as error:
            client.search_studies()
    assert "wrong-password" not in str(error.value) and uploaded.dicomweb in str(error.value)
    with pytest.raises(DataError, match="HTTP 401"):
        DicomWebClient(uploaded.dicomweb).search_studies()
    with pytest.raises(DataError, match="not on the server") as error:
        pull_study(uploaded.client(), "1.2.3.4.5.6", tmp_path / "x", show_progress=False)
    assert "1.2.3.4.5.6" not in str(error.value) and not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="not found on the server .HTTP 404.*not a DICOMweb URL"):
        DicomWebClient(uploaded.url, username=USER, password=PASSWORD).search_series(uploaded.studies["B"])
    result, output = invoke("pacs", "pull", "--url", uploaded.dicomweb, "--user", USER, "--password", "nope",
                            "--study", uploaded.studies["B"], "--out", tmp_path / "y")
    assert result.exit_code == 2 and "authentication failed" in output and "nope" not in output


# ---------------------------------------------------------------------------- DIMSE (pynetdicom)


def dimse_client(orthanc: Orthanc, **options):
    from medvl.clinical.dimse import DimseClient

    return DimseClient.from_url(orthanc.dimse, calling_aet=MOVE_AET, timeout=10, **options)


@pytest.fixture(scope="module")
def dimse_pulls(uploaded, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Patient A by C-GET in two runs (limit, then resume); B and the pydicom-data studies by C-MOVE (CLI)."""
    pytest.importorskip("pynetdicom")
    from medvl.clinical.pull import run_pull

    folder = tmp_path_factory.mktemp("dimse")
    client = dimse_client(uploaded)
    first = run_pull(client, uploaded.studies["A"], folder / "get", limit=2, show_progress=False)
    second = run_pull(client, uploaded.studies["A"], folder / "get", show_progress=False)
    studies = [uploaded.studies[name] for name in uploaded.studies if name != "A"]
    args = [arg for uid in studies for arg in ("--study", uid)]
    result, output = invoke("pacs", "pull", "--url", uploaded.dimse, "--calling-aet", MOVE_AET, "--retrieve", "move",
                            "--move-port", uploaded.peer_port, *args, "--out", folder / "move", "--quiet")
    assert result.exit_code == 0, output
    assert f"pulled 5 instance(s) (0 already there) of 5 in 5 series of {len(studies)} study(ies)" in output
    return {"get": (folder / "get", [first, second]), "move": (folder / "move", [read_report(folder / "move")])}


@pytest.mark.orthanc
def test_dimse_echo_and_find(uploaded, monkeypatch):
    pytest.importorskip("pynetdicom")
    from medvl.cli.common import console

    client = dimse_client(uploaded)
    client.echo()
    [study] = client.search_studies({"PatientID": PATIENTS["A"]["id"]})
    assert study["PatientName"] == PATIENTS["A"]["name"] and study["StudyInstanceUID"] == uploaded.studies["A"]
    assert study["NumberOfStudyRelatedInstances"] == 6 and study["StudyDate"] == PATIENTS["A"]["date"]
    by_date = client.search_studies({"StudyDate": "20120101-20121231"})
    assert [s["StudyInstanceUID"] for s in by_date] == [uploaded.studies["B"]]
    assert client.search_studies({"PatientID": "no-such-patient"}) == []
    series = client.search_series(uploaded.studies["A"])
    assert sorted(s["Modality"] for s in series) == ["CR", "CT", "MR"]
    assert {s["SeriesNumber"] for s in series} == {1, 2, 3}
    assert len(client.search_instances(uploaded.studies["A"], series[0]["SeriesInstanceUID"])) >= 1
    monkeypatch.setattr(console, "width", 200)
    result, output = invoke("pacs", "echo", "--url", uploaded.dimse, "--calling-aet", MOVE_AET)
    assert result.exit_code == 0 and "C-ECHO ok" in output, output
    result, output = invoke("pacs", "search", "--url", uploaded.dimse, "--calling-aet", MOVE_AET,
                            "--patient-id", PATIENTS["B"]["id"])
    assert result.exit_code == 0 and "Quastenberg" in output and "1 studies" in output, output
    result, output = invoke("pacs", "search", "--url", uploaded.dimse, "--calling-aet", MOVE_AET,
                            "--study", uploaded.studies["A"])
    assert result.exit_code == 0 and "3 series" in output and "Thorax 2.5 mm" in output, output


@pytest.mark.orthanc
def test_dimse_get_and_move_pulls_are_deidentified(uploaded, dimse_pulls):
    out, (first, second) = dimse_pulls["get"]
    assert not first["complete"] and first["counts"]["pulled"] == 2
    assert second["complete"] and second["counts"] == {"studies": 1, "series": 3, "instances": 6, "pulled": 4,
                                                       "already_present": 2}
    assert second["server"] == uploaded.dimse and not (out / STATE_NAME).exists()
    headers = [pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]
    assert len(headers) == 6 and all(ds.PatientIdentityRemoved == "YES" for ds in headers)
    assert len({ds.StudyInstanceUID for ds in headers}) == 1 and len({ds.SeriesInstanceUID for ds in headers}) == 3
    [volume] = [r for r in load_dataset(out) if r.meta["kind"] == "volume"]
    assert volume.meta["slices"] == "4" and read_image(volume.image).shape == (4, 32, 32)
    moved, [report] = dimse_pulls["move"]
    assert report["complete"] and report["counts"]["instances"] == 5 and report["deidentified"]
    moved_files = [pydicom.dcmread(p) for p in moved.rglob("*.dcm")]
    assert all(ds.PatientIdentityRemoved == "YES" for ds in moved_files)
    j2k = pydicom.dcmread(STORE / "693_J2KR.dcm")  # sent as stored (JPEG 2000), not transcoded
    [pulled_j2k] = [ds for ds in moved_files if ds.file_meta.TransferSyntaxUID == j2k.file_meta.TransferSyntaxUID]
    np.testing.assert_array_equal(pulled_j2k.pixel_array, j2k.pixel_array)
    assert {r.meta["modality"] for r in load_dataset(moved)} == {"DX", "CR", "MR", "CT", "OT"}


@pytest.mark.orthanc
def test_no_identifier_in_dimse_pulls_or_logs(uploaded, dimse_pulls, tmp_path, caplog):
    import logging

    from medvl.clinical.pull import run_pull

    secrets = secrets_of(path for paths in uploaded.files.values() for path in paths)
    assert leaks([dimse_pulls["get"][0], dimse_pulls["move"][0]], secrets) == []
    caplog.set_level(logging.DEBUG)
    with dimse_client(uploaded, retrieve="move", move_port=uploaded.peer_port) as client:
        run_pull(client, uploaded.studies["B"], tmp_path / "logged", show_progress=False)
    assert "pulled 2 instance(s)" in caplog.text
    assert not [s for s in secrets if s.decode() in caplog.text]
    assert leaks([tmp_path / "logged"], secrets) == []


@pytest.mark.orthanc
def test_dimse_errors_are_clear(uploaded, tmp_path):
    pytest.importorskip("pynetdicom")
    from medvl.clinical.dimse import DimseClient
    from medvl.clinical.pull import run_pull

    host_port = uploaded.dimse.split("@")[1]
    # a wrong called AE title: rejected, or (seen under load) aborted; either way the error names it
    with pytest.raises(DataError, match="(Called AE title not recognised|the PACS aborted it).*'NOT-THE-PACS'"):
        DimseClient.from_url(f"dicom://NOT-THE-PACS@{host_port}", calling_aet=MOVE_AET).echo()
    # Orthanc rejects an unknown calling AE title, or now and then aborts the association: either way the
    # error names the calling AE title to check
    with pytest.raises(DataError, match="(Calling AE title not recognised|the PACS aborted it).*'STRANGER'"):
        DimseClient.from_url(uploaded.dimse, calling_aet="STRANGER").search_studies()
    with pytest.raises(DataError, match="not on the server") as error:
        run_pull(dimse_client(uploaded), "1.2.3.4.5.6", tmp_path / "x", show_progress=False)
    assert "1.2.3.4.5.6" not in str(error.value) and not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="connection refused"):
        DimseClient("127.0.0.1", free_port(), called_aet="PACS").echo()
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(DataError, match=r"within 1 s \(timeout\)"):
            DimseClient("127.0.0.1", silent.getsockname()[1], called_aet="PACS", timeout=1).echo()
    result, output = invoke("pacs", "pull", "--url", f"dicom://NOT-THE-PACS@{host_port}", "--calling-aet", MOVE_AET,
                            "--study", uploaded.studies["B"], "--out", tmp_path / "y")
    # as above: a rejection, or now and then an abort (seen under load); either way the error names the called
    # AE title to check
    assert result.exit_code == 2 and not (tmp_path / "y").exists()
    assert re.search(r"(association rejected|the PACS aborted it).*'NOT-THE-PACS'", output, re.S), output
    for args, problem in ((("--url", uploaded.dicomweb, "--retrieve", "move"), "only apply to DIMSE"),
                          (("--url", uploaded.dimse, "--user", USER), "no user, password"),
                          (("--url", uploaded.dimse, "--retrieve", "move"), "--move-port"),
                          (("--url", uploaded.dimse, "--retrieve", "fetch"), "retrieve must be one of"),
                          (("--url", "dicom://localhost:104"), "not a DIMSE address")):
        result, output = invoke("pacs", "pull", *args, "--study", "1.2.3", "--out", tmp_path / "z")
        assert result.exit_code == 2 and problem in output, output
        assert not (tmp_path / "z").exists()


def post_instances(orthanc: Orthanc, paths: list[Path]) -> list[str]:
    """POST files to Orthanc's /instances without adding them to ``orthanc.files`` (the fixtures' studies);
    their Study Instance UIDs."""
    with requests.Session() as session:
        session.auth = (USER, PASSWORD)
        for path in paths:
            answer = session.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=60)
            assert answer.status_code == 200, answer.text
    return [str(pydicom.dcmread(path, force=True).StudyInstanceUID) for path in paths]


@pytest.mark.orthanc
def test_c_move_receives_retired_and_private_storage_classes(uploaded, tmp_path):
    """The C-MOVE storage SCP accepted only pynetdicom's storage classes, so Orthanc found no context for
    a retired class (pydicom-data's color-pl.dcm: Ultrasound Image Storage of 1993) or a private one, and
    the pull failed with a bare 'status 0xC000' while C-GET and WADO-RS pulled the same study. Both now
    arrive; a retrieval the PACS still refuses names the series and its SOP class."""
    pytest.importorskip("pynetdicom")
    from pydicom.uid import generate_uid

    private = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    private.SOPClassUID = private.file_meta.MediaStorageSOPClassUID = "1.2.246.352.70.1.70"  # a vendor's class
    private.StudyInstanceUID, private.SeriesInstanceUID = generate_uid(), generate_uid()
    private.SOPInstanceUID = private.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    private.save_as(tmp_path / "private.dcm")
    retired_study, private_study, refused_study = post_instances(
        uploaded, [STORE / "color-pl.dcm", tmp_path / "private.dcm", STORE / "explicit_VR-UN.dcm"])
    move = ("--url", uploaded.dimse, "--calling-aet", MOVE_AET, "--retrieve", "move", "--move-port", uploaded.peer_port)
    result, output = invoke("pacs", "pull", *move, "--study", retired_study, "--study", private_study,
                            "--out", tmp_path / "moved", "--quiet")
    assert result.exit_code == 0 and "pulled 2 instance(s) (0 already there) of 2" in output, output
    classes = {str(pydicom.dcmread(p).SOPClassUID) for p in (tmp_path / "moved").rglob("*.dcm")}
    assert classes == {"1.2.840.10008.5.1.4.1.1.6", "1.2.246.352.70.1.70"}
    # Orthanc 1.10 cannot send this JPEG 2000 file over DIMSE at all (C-GET neither; WADO-RS can)
    result, output = invoke("pacs", "pull", *move, "--study", refused_study, "--out", tmp_path / "refused")
    assert result.exit_code == 2, output
    assert ("C-MOVE of a series without a number (CT, CT Image Storage): the PACS answered with status 0xC000"
            in " ".join(output.split())), output


@pytest.mark.orthanc
def test_cli_pull_counts_instances_at_risk_of_burned_in_text_in_deids_words(uploaded, tmp_path):
    """pydicom-data's SC_rgb.dcm (a secondary capture, modality OT, no Burned In Annotation) is flagged for its
    kind, as medvl deid flags it: the pull says it may hold burned-in text, never that it declares any."""
    out = tmp_path / "sc"
    result, output = invoke("pacs", "pull", "--url", uploaded.dicomweb, "--user", USER, "--password", PASSWORD,
                            "--study", uploaded.studies["store-2"], "--study", uploaded.studies["B"], "--out", out,
                            "--quiet")
    assert result.exit_code == 0, output
    assert "1 instance(s) may hold burned-in text in their pixels" in " ".join(output.split())
    assert "declare" not in output
    deid = read_report(out)["deidentification"]
    assert deid["files_with_burned_in_risk"] == 1 and deid["files_with_warnings"] == 1
    [flagged] = deid["burned_in_risk_files"]
    ds = pydicom.dcmread(out / flagged)
    assert ds.Modality == "OT" and "BurnedInAnnotation" not in ds


def _two_study_pull(uploaded, out: Path) -> tuple:
    """``medvl pacs pull`` of the studies store-2 (a secondary capture at risk) and B into ``out``, quietly."""
    return ("pacs", "pull", "--url", uploaded.dicomweb, "--user", USER, "--password", PASSWORD,
            "--study", uploaded.studies["store-2"], "--study", uploaded.studies["B"], "--out", out, "--quiet")


@pytest.mark.orthanc
def test_a_resumed_pull_reports_the_instances_at_risk_pulled_by_earlier_runs(uploaded, tmp_path):
    """The secondary capture pulled by a first run (``--limit 1``) stays in the final report and warning of the
    run that finishes the pull: the at-risk list is kept in the pull's state, not only this run's files."""
    out = tmp_path / "resumed"
    args = _two_study_pull(uploaded, out)
    first, output = invoke(*args, "--limit", "1")
    assert first.exit_code == 0 and "incomplete:" in output, output
    [flagged] = read_report(out)["deidentification"]["burned_in_risk_files"]
    result, output = invoke(*args)
    assert result.exit_code == 0 and "incomplete:" not in output, output
    assert "1 instance(s) may hold burned-in text in their pixels" in " ".join(output.split())
    report = read_report(out)
    assert report["complete"] and not (out / STATE_NAME).exists()
    deid = report["deidentification"]
    assert deid["files_this_run"] == len(uploaded.files["B"])
    assert deid["files_with_burned_in_risk"] == 1 and deid["burned_in_risk_files"] == [flagged]
    assert pydicom.dcmread(out / flagged).Modality == "OT"


@pytest.mark.orthanc
def test_a_resumed_pull_pulls_again_an_instance_removed_from_out_since_an_earlier_run(uploaded, tmp_path):
    """The state's list of instances done is checked against OUT: the at-risk secondary capture written by a
    first run and deleted by the user before the rerun was counted "already there", the pull reported complete
    (deleting its state and seed) and listed a burned-in-risk path that no longer existed. It is pulled again,
    with the same de-identified UIDs (the state's seed), so the same path."""
    out = tmp_path / "removed"
    args = _two_study_pull(uploaded, out)
    first, output = invoke(*args, "--limit", "2")
    assert first.exit_code == 0 and "incomplete:" in output, output
    [flagged] = read_report(out)["deidentification"]["burned_in_risk_files"]
    kept = [p for p in out.rglob("*.dcm") if p != out / flagged]
    assert len(kept) == 1
    (out / flagged).unlink()
    result, output = invoke(*args)
    assert result.exit_code == 0 and "incomplete:" not in output, output
    assert "pulled 2 instance(s) (1 already there) of 3" in " ".join(output.split()), output
    report = read_report(out)
    assert report["complete"] and not (out / STATE_NAME).exists()
    assert report["counts"]["pulled"] == 2 and report["counts"]["already_present"] == 1
    assert report["deidentification"]["burned_in_risk_files"] == [flagged]
    assert pydicom.dcmread(out / flagged).Modality == "OT"
    assert len(list(out.rglob("*.dcm"))) == 3


@pytest.mark.orthanc
def test_an_instance_stored_without_preamble_is_pulled_as_medvl_reads_it(uploaded, tmp_path):
    """Orthanc stores and serves pydicom-data's OT-PAL-8-face.dcm as it came: a data set without the
    128-byte preamble, DICM and file meta, which medvl deid and predict read. A pull takes it too (WADO-RS
    and C-GET), de-identified into a Part 10 file."""
    pytest.importorskip("pynetdicom")
    from medvl.clinical.dicom import read_dicom
    from medvl.clinical.pull import run_pull

    source = STORE / "OT-PAL-8-face.dcm"
    assert source.read_bytes()[128:132] != b"DICM"
    [study] = post_instances(uploaded, [source])
    for client, out in ((uploaded.client(), tmp_path / "web"), (dimse_client(uploaded), tmp_path / "get")):
        report = run_pull(client, study, out, show_progress=False)
        assert report["complete"] and report["counts"]["pulled"] == 1, out
        [written] = out.rglob("*.dcm")
        assert written.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(written)
        assert ds.PatientIdentityRemoved == "YES"
        np.testing.assert_array_equal(read_dicom(written)[0], read_dicom(source)[0])  # the pixels as deid reads them


@pytest.mark.orthanc
def test_a_series_the_deidentification_refuses_is_skipped_named_and_the_other_studies_pulled(uploaded, tmp_path):
    """One instance whose accession number was copied into a kept attribute (the final scan refuses it) stopped
    the whole multi-study pull, and a rerun stopped at it again: the studies after it could not be pulled. Now
    its series is skipped and named (report, log line, exit code 3), every other series pulled, and a rerun
    asks only for the refused one."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(uploaded.files["B"][0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ConvolutionKernel = ds.AccessionNumber  # a request ID in an attribute the profile keeps
    leaky = tmp_path / "leaky.dcm"
    ds.save_as(leaky)
    [bad] = post_instances(uploaded, [leaky])
    out = tmp_path / "out"
    args = ("pacs", "pull", "--url", uploaded.dicomweb, "--user", USER, "--password", PASSWORD,
            "--study", bad, "--study", uploaded.studies["A"], "--out", out, "--quiet")
    for run in range(2):
        result, output = invoke(*args)
        assert result.exit_code == 3, output
        report = read_report(out)
        failed = [series for series in report["series"] if series["error"]]
        assert [series["missing"] for series in failed] == [1] and not report["complete"]
        assert "request ID survived de-identification in ConvolutionKernel" in failed[0]["error"]
        assert "its retrieve failed: " in report["missing"] and "incomplete:" in output
        assert report["counts"]["pulled"] == (len(uploaded.files["A"]) if run == 0 else 0)
        assert len(list(out.rglob("*.dcm"))) == len(uploaded.files["A"])
        assert str(ds.AccessionNumber) not in json.dumps(report) + output
    result, output = invoke(*args[:-7], "--study", bad, "--out", tmp_path / "alone", "--quiet")
    assert result.exit_code == 2 and "survived de-identification" in output  # nothing else asked: one error


@pytest.mark.orthanc
def test_a_piped_search_table_keeps_every_column(uploaded, monkeypatch):
    """Redirected to a file (not a terminal), the table is as wide as its columns need: rich's 80 columns
    would crop the modalities and counts away without a mark."""
    from medvl.cli.common import console

    monkeypatch.setattr(console, "width", 80)
    auth = ("--user", USER, "--password", PASSWORD)
    result, output = invoke("pacs", "search", "--url", uploaded.dicomweb, *auth, "--patient-id", PATIENTS["A"]["id"])
    assert result.exit_code == 0, output
    header = next(line for line in output.splitlines() if "study UID" in line)
    assert header.split()[-4:] == ["date", "modalities", "series", "images"], output
    row = next(line for line in output.splitlines() if uploaded.studies["A"] in line)
    assert row.split()[-4:] == [PATIENTS["A"]["date"], "CR\\CT\\MR", "3", "6"], output
    result, output = invoke("pacs", "search", "--url", uploaded.dicomweb, *auth, "--study", uploaded.studies["A"])
    assert result.exit_code == 0 and "Thorax 2.5 mm" in output and "description" in output, output


@pytest.mark.orthanc
def test_a_non_ascii_letter_is_matched_by_star_as_the_warning_advises(uploaded, tmp_path, caplog):
    """Orthanc's QIDO-RS matches ``%C3%BC`` literally, and ``?`` stands for one byte of the two an ``ü`` takes
    (over C-FIND too): the warning advises ``*``, which finds the study over both transports."""
    pytest.importorskip("pynetdicom")
    ds = pydicom.dcmread(uploaded.files["A"][-1])
    ds.SpecificCharacterSet, ds.PatientName, ds.PatientID = "ISO_IR 192", "Müllerstraß^Jördis", "MRN77120455"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{UID_ROOT}.77120455.1", f"{UID_ROOT}.77120455.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.77120455.1.1.1"
    ds.save_as(tmp_path / "umlaut.dcm", enforce_file_format=True)
    [study] = post_instances(uploaded, [tmp_path / "umlaut.dcm"])
    dimse = dimse_client(uploaded)
    with uploaded.client() as client:
        assert client.search_studies({"PatientName": "Müllerstraß*"}) == []
        assert "non-ASCII letters" in caplog.text and "try * in their place" in caplog.text
        assert "? or *" not in caplog.text and "Müller" not in caplog.text
        for search in (client, dimse):
            assert [s["StudyInstanceUID"] for s in search.search_studies({"PatientName": "M*llerstra*^J*rdis"})] \
                == [study]
            assert search.search_studies({"PatientName": "M?llerstra?^J?rdis"}) == []


@pytest.mark.orthanc
def test_a_c_find_value_outside_ascii_is_sent_as_written_not_as_wildcards(uploaded):
    """A match value with letters the default character set cannot encode (Greek, Cyrillic, Chinese) went out
    with '?' (a wildcard) in place of each, and the search listed other patients. The identifier now declares
    UTF-8 (ISO_IR 192) for such a value, and the PACS finds the patient by the real letters."""
    pytest.importorskip("pynetdicom")
    charsets = Path(pydicom.__file__).parent / "data" / "charset_files"
    greek, russian, chinese = post_instances(uploaded, [charsets / "chrGreek.dcm", charsets / "chrRuss.dcm",
                                                        charsets / "chrX1.dcm"])
    dimse = dimse_client(uploaded)
    for name, study in (("Διον*", greek), ("Люк*", russian), ("*王^小東*", chinese)):
        assert [s["StudyInstanceUID"] for s in dimse.search_studies({"PatientName": name})] == [study], name
    assert dimse.search_studies({"PatientID": "Δ*"}) == []
    result, output = invoke("pacs", "search", "--url", uploaded.dimse, "--calling-aet", MOVE_AET,
                            "--patient-name", "Διον*", "--uids")
    assert result.exit_code == 0 and output.split() == [greek], output


def test_a_c_find_value_no_character_set_encodes_is_refused_naming_its_field():
    from medvl.clinical.dimse import _identifier

    pytest.importorskip("pynetdicom")
    identifier = _identifier("STUDY", {}, {"PatientName": "Jérôme*"}, ("StudyInstanceUID",))
    assert identifier.SpecificCharacterSet == "ISO_IR 192" and identifier.PatientName == "Jérôme*"
    assert "SpecificCharacterSet" not in _identifier("STUDY", {}, {"PatientName": "Smith*"}, ())
    with pytest.raises(InputError, match="^search filter StudyDescription: the value cannot be sent") as error:
        _identifier("STUDY", {}, {"StudyDescription": "x\udcff*"}, ())  # a byte the terminal could not decode
    assert "\udcff" not in str(error.value)


@pytest.mark.orthanc
def test_dimse_search_values_and_returned_uids_stay_out_of_logs_and_warnings(uploaded, caplog, recwarn):
    """pydicom complains, quoting the value, about a match value outside its VR's rules and about a
    non-conformant UID the PACS returns (pydicom-data's bad_sequence.dcm has a 64-hex-digit Study UID):
    neither reaches the log or Python's warnings. A value longer than its VR holds is refused up front,
    without quoting it, and a code string is sent in upper case, as it is stored."""
    import logging

    pytest.importorskip("pynetdicom")
    caplog.set_level(logging.DEBUG)
    [odd_uid] = post_instances(uploaded, [STORE / "bad_sequence.dcm"])
    patient_id = str(pydicom.dcmread(STORE / "bad_sequence.dcm", stop_before_pixels=True).PatientID)
    caplog.clear()  # reading the file here, pydicom complained about its UID itself
    recwarn.clear()
    dimse = dimse_client(uploaded)
    assert [s["StudyInstanceUID"] for s in dimse.search_studies({"PatientID": patient_id})] == [odd_uid]
    assert dimse.search_studies({"PatientSex": "Smith John", "PatientID": PATIENTS["A"]["id"]}) == []
    assert dimse.search_series(uploaded.studies["A"], {"BodyPartExamined": "l-spine"}) == []
    with uploaded.client() as web:
        for search in (web, dimse):
            found = search.search_studies({"ModalitiesInStudy": "ct", "PatientID": PATIENTS["A"]["id"]})
            assert [s["StudyInstanceUID"] for s in found] == [uploaded.studies["A"]]
            with pytest.raises(InputError, match="AccessionNumber: a value of 21 characters, more than the 16"):
                search.search_studies({"AccessionNumber": "ACC-SECRET-1234567890"})
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    for value in (odd_uid, "Smith John", "SMITH JOHN", "L-SPINE", "SECRET"):
        assert value not in said, value


@pytest.mark.orthanc
def test_a_dimse_pull_keeps_returned_uids_out_of_logs_and_warnings_in_every_thread(uploaded, tmp_path, caplog,
                                                                                   recwarn):
    """pydicom-data's bad_sequence.dcm has a 64-hex-digit SOP Instance UID: pydicom complained about it, quoting
    it, while pynetdicom's threads encoded the C-GET / C-MOVE requests and decoded the stores, at WARNING and as
    a UserWarning, even with --quiet. Nothing of it reaches the log, Python's warnings or the terminal now."""
    import logging

    from medvl.clinical.pull import run_pull

    pytest.importorskip("pynetdicom")
    [study] = post_instances(uploaded, [STORE / "bad_sequence.dcm"])
    sop_uid = str(pydicom.dcmread(STORE / "bad_sequence.dcm", stop_before_pixels=True, force=True).SOPInstanceUID)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    recwarn.clear()
    for retrieve in ("get", "move"):
        with dimse_client(uploaded, retrieve=retrieve, move_port=uploaded.peer_port) as client:
            report = run_pull(client, study, tmp_path / retrieve, show_progress=False)
        assert report["complete"] and report["counts"]["pulled"] == 1, retrieve
    result, output = invoke("pacs", "pull", "--url", uploaded.dimse, "--calling-aet", MOVE_AET, "--study", study,
                            "--out", tmp_path / "cli", "--quiet")
    assert result.exit_code == 0, output
    said = caplog.text + " ".join(str(w.message) for w in recwarn) + output
    assert "pulled 1 instance(s)" in caplog.text and sop_uid not in said and study not in said


# ------------------------------------------------------------------ no server needed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_connection_refused_names_the_url(tmp_path):
    url = f"http://someone:hunter22@127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(DataError, match="connection refused") as error:
        pull_study(url, "1.2.3", tmp_path / "out", show_progress=False)
    assert "hunter22" not in str(error.value) and "127.0.0.1" in str(error.value)
    assert split_credentials(url) == (url.replace("someone:hunter22@", ""), "someone", "hunter22")
    with pytest.raises(InputError, match="not an http"):
        DicomWebClient("pacs.example.org/dicom-web")


def both_transports(port: int) -> list:
    """A DICOMweb and a DIMSE client for a port where nothing listens: a search that reaches the network
    fails with a DataError (connection refused), one refused for its arguments with an InputError."""
    pytest.importorskip("pynetdicom")
    from medvl.clinical.dimse import DimseClient

    return [DicomWebClient(f"http://127.0.0.1:{port}/dicom-web"), DimseClient.from_url(f"dicom://PACS@127.0.0.1:{port}")]


@pytest.mark.parametrize(("filters", "problem"), [
    ({"limit": "1"}, "'limit' is a QIDO-RS query parameter"),
    ({"includefield": "PatientBirthDate"}, "'includefield' is a QIDO-RS query parameter"),
    ({"0011ABCD": "x"}, "tag 0011ABCD is not in the DICOM dictionary"),
    ({"PixelData": "1"}, "PixelData: holds binary data"),
    ({"Rows": "abc"}, "Rows expects a whole number from 0 to 65535 (VR US), got 'abc'"),
    ({"Rows": "70000"}, "Rows expects a whole number"),
    ({"ReferencedStudySequence": "x"}, "ReferencedStudySequence: a sequence cannot be matched"),
    ({"StudyDate": "2004-01-19"}, "StudyDate expects YYYYMMDD or YYYYMMDD-YYYYMMDD, got '2004-01-19'"),
    ({"StudyDate": "20041399"}, "StudyDate expects YYYYMMDD"),
    ({"PatientBirthDate": "20040119-2004"}, "PatientBirthDate expects YYYYMMDD"),
    ({"StudyDate": "20041231-20040101"}, "ends before it starts"),
    ({"AccessionNumber": "ACC-2209-11873-AB-77"}, "AccessionNumber: a value of 20 characters, more than the 16 a "
                                                  "DICOM SH value holds"),
    ({"PatientSex": "FEMALEFEMALEFEMALE"}, "PatientSex: a value of 18 characters, more than the 16 a DICOM CS"),
    ({"PatientName": "A" * 65 + "*"}, "PatientName: a value of 65 characters, more than the 64 a DICOM PN"),
    ({"StudyInstanceUID": "1.2.3," + "1" * 65}, "a value of 65 characters, more than the 64 a DICOM UI"),
])
def test_search_filters_no_transport_can_match_are_refused_before_asking(filters, problem):
    """The same InputError over DICOMweb and DIMSE, before any connection: never a crash in C-FIND's
    encoding, a sequence filter dropped, or a wrong date sent to find nothing."""
    for client in both_transports(free_port()):
        with pytest.raises(InputError, match=re.escape(problem)):
            client.search_studies(filters)
        with pytest.raises(InputError, match=re.escape(problem)):
            client.search_series("1.2.3", filters)


@pytest.mark.parametrize("key", ["BodyPartExamined", "SeriesDescription", "SeriesNumber", "Modality", "00180015"])
def test_a_study_search_by_a_series_attribute_is_refused_naming_it_on_both_transports(key):
    """A study search filtered on a series attribute found no study on either transport, even with '*': refused
    before asking, naming the attribute and the series search that can match it; a series search takes it."""
    value = "1" if key == "SeriesNumber" else "CT" if key == "Modality" else "CHEST"
    for client in both_transports(free_port()):
        with pytest.raises(InputError, match=f"^{key} is a series attribute, which a study search cannot match: "
                                             r"search a study's series by it \(--study UID\)"):
            client.search_studies({key: value, "PatientID": "x"})
        with pytest.raises(DataError, match="connection refused"):  # asked: a series search matches it
            client.search_series("1.2.3", {key: value})
    result, output = invoke("pacs", "search", "--url", f"dicom://PACS@127.0.0.1:{free_port()}", "--filter",
                            f"{key}={value}")
    assert result.exit_code == 2 and f"{key} is a series attribute" in output and "Traceback" not in output


@pytest.mark.parametrize("limit", [0, -1])
def test_search_limit_below_one_is_refused_on_both_transports(limit):
    for client in both_transports(free_port()):
        with pytest.raises(InputError, match=f"limit must be at least 1, got {limit}"):
            client.search_studies({"PatientID": "x"}, limit=limit)


@pytest.mark.parametrize(("timeout", "problem"), [
    ("nan", "--timeout must be a finite number, got nan"),  # was a ValueError from socket.settimeout
    ("inf", "--timeout must be a finite number, got inf"),  # was an OverflowError (time_t)
    ("1e400", "--timeout must be a finite number, got inf"),
    ("1e20", "--timeout must be <= 86400, got 1e+20"),
    ("0", "--timeout must be > 0, got 0.0"),
])
def test_a_timeout_that_is_not_finite_seconds_above_zero_is_refused_on_both_transports(tmp_path, timeout, problem):
    pytest.importorskip("pynetdicom")
    port = free_port()
    for url in (f"http://127.0.0.1:{port}/dicom-web", f"dicom://PACS@127.0.0.1:{port}"):
        for command in (("search",), ("pull", "--study", "1.2.3", "--out", tmp_path / "out"), ("echo",)):
            if command == ("echo",) and url.startswith("http"):
                continue  # C-ECHO is DIMSE only
            result, output = invoke("pacs", *command, "--url", url, "--timeout", timeout)
            assert result.exit_code == 2 and problem in output and "Traceback" not in output, (url, command, output)
            assert not (tmp_path / "out").exists()


def test_cli_search_refuses_bad_filters_dates_and_limits_with_one_line(tmp_path):
    pytest.importorskip("pynetdicom")
    port = free_port()
    for url in (f"http://127.0.0.1:{port}/dicom-web", f"dicom://PACS@127.0.0.1:{port}"):
        for args, problem in ((("--study-date", "2004-01-19"),
                               "--study-date expects YYYYMMDD or YYYYMMDD-YYYYMMDD, got '2004-01-19'"),
                              (("--filter", "StudyDate=yesterday"), "--filter StudyDate expects YYYYMMDD"),
                              (("--filter", "limit=1"), "'limit' is a QIDO-RS query parameter"),
                              (("--filter", "Rows=abc"), "--filter Rows expects a whole number"),
                              (("--filter", "ReferencedStudySequence=x"), "a sequence cannot be matched"),
                              (("--limit", "0"), "limit must be at least 1, got 0"),
                              (("--limit", "-1"), "limit must be at least 1, got -1")):
            result, output = invoke("pacs", "search", "--url", url, *args)
            assert result.exit_code == 2 and problem in output and "Traceback" not in output, (url, args, output)


def test_valid_match_values_are_sent_as_servers_compare_them():
    from medvl.clinical.clients import study_filters
    from medvl.clinical.pacs import search_filters

    assert search_filters({"Rows": "+064", "StudyDate": "20040101-", "PatientBirthDate": "-19991231",
                           "00100020": "MRN*", "ModalitiesInStudy": ""}) == {
        "Rows": "64", "StudyDate": "20040101-", "PatientBirthDate": "-19991231", "00100020": "MRN*"}
    assert study_filters(study_date="20040119", pairs=["SeriesNumber=3"]) == {"StudyDate": "20040119",
                                                                             "SeriesNumber": "3"}
    # a bad value of a named option names the option, not only the attribute it matches
    with pytest.raises(InputError, match="^--accession AccessionNumber: a value of 20 characters"):
        study_filters(accession="ACC-2209-11873-AB-77")
    with pytest.raises(InputError, match="^--modality ModalitiesInStudy: "):
        study_filters(modality="CT,,MR")
    # code strings are stored in upper case: sent so; * does not count towards a length
    assert search_filters({"ModalitiesInStudy": "ct", "PatientSex": "f", "BodyPartExamined": "l-spine*",
                           "AccessionNumber": "*" + "A" * 16 + "*", "PatientName": "Müller*^*"}) == {
        "ModalitiesInStudy": "CT", "PatientSex": "F", "BodyPartExamined": "L-SPINE*",
        "AccessionNumber": "*" + "A" * 16 + "*", "PatientName": "Müller*^*"}


def test_a_c_find_identifier_sends_values_pydicom_complains_about_without_warning(caplog, recwarn):
    """A value outside its VR's character rules (a hyphen in a code string, an umlaut) is sent, as stored data
    may hold it; pydicom's complaint, which quotes it, reaches neither the log nor Python's warnings."""
    import logging

    pytest.importorskip("pynetdicom")
    from medvl.clinical.dimse import _identifier

    caplog.set_level(logging.DEBUG)
    identifier = _identifier("STUDY", {"StudyInstanceUID": "05fa52f0e599f17b8186ff18fcdf2b55"},
                             {"BodyPartExamined": "l-spine", "PatientSex": "ö"}, ("PatientName",))
    assert identifier.BodyPartExamined == "L-SPINE" and identifier.PatientSex == "Ö"
    said = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "L-SPINE" not in said and "05fa52f0" not in said and "Ö" not in said


def test_a_list_of_values_is_sent_in_each_transports_own_form():
    """Lists come back from search_filters in DICOM's form ('\\', what C-FIND sends); QIDO-RS sends
    them with ','; an empty item is refused on both transports before any server is asked."""
    from medvl.clinical.pacs import qido_value, search_filters

    lists = {"StudyInstanceUID": "1.2.3, 1.2.4\\1.2.5", "ModalitiesInStudy": "CT,MR", "PatientName": "Vorn*"}
    checked = search_filters(lists)
    assert checked == {"StudyInstanceUID": "1.2.3\\1.2.4\\1.2.5", "ModalitiesInStudy": "CT\\MR",
                       "PatientName": "Vorn*"}
    assert search_filters(checked) == checked
    assert [qido_value(value) for value in checked.values()] == ["1.2.3,1.2.4,1.2.5", "CT,MR", "Vorn*"]
    for client in both_transports(free_port()):
        for value in ("1.2.3,", "1.2.3,,1.2.4", ",1.2.3"):
            with pytest.raises(InputError, match="StudyInstanceUID: an empty item in its list of values"):
                client.search_studies({"StudyInstanceUID": value})


class BrokenPacs(BaseHTTPRequestHandler):
    """Answers QIDO-RS with one series of one instance, and WADO-RS with whatever ``wado`` holds."""

    wado: tuple[str, bytes] = ("text/html", b"<html>login</html>")
    series: list = [{"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}}]
    instances: list = [{"00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]}}]

    def do_GET(self):  # noqa: N802 - the http.server API
        listing = "application/dicom+json"
        if self.path.endswith("/series") or "/series?" in self.path:
            kind, body = listing, json.dumps(self.series).encode()
        elif "/instances" in self.path:
            kind, body = listing, json.dumps(self.instances).encode()
        else:
            kind, body = self.wado
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture()
def broken_pacs():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BrokenPacs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    server.shutdown()
    server.server_close()


def multipart(parts: list[bytes], boundary: str = "b0und4ry", close: bool = True) -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


@pytest.mark.parametrize(("kind", "body", "problem"), [
    ("text/html", b"<html>please log in</html>", "expected multipart/related DICOM, the server sent text/html"),
    ('multipart/related; type="application/dicom"; boundary=b0und4ry', multipart([b"not dicom at all" * 20]),
     "not a DICOM file"),
    ('multipart/related; type="application/dicom"; boundary=b0und4ry',
     multipart([b"\0" * 128 + b"DICM" + b"\0" * 40], close=False)[:-30], "truncated transfer"),
])
def test_non_dicom_payloads_are_refused(broken_pacs, tmp_path, kind, body, problem):
    BrokenPacs.wado = (kind, body)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=problem) as error:
        pull_study(broken_pacs, "1.2.3", out, show_progress=False)
    assert broken_pacs in str(error.value)
    assert not list(out.rglob("*.dcm"))  # nothing half-written


SERIES_ITEM = {"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080060": {"vr": "CS", "Value": ["CT"]}}


@pytest.mark.parametrize(("series", "instances", "problem"), [
    ([{**SERIES_ITEM, "00200011": {"vr": "IS", "Value": 1e308}}], None,
     "series search: expected a JSON list of DICOM datasets (element 00200011: Value is not a list)"),
    ([{**SERIES_ITEM, "00201209": {"vr": "SQ", "Value": 3}}], None,
     "series search: expected a JSON list of DICOM datasets (element 00201209: Value is not a list)"),
    ([{**SERIES_ITEM, "00100010": {"vr": "PN", "Value": "Vornholt^Ilsabet"}}], None,
     "series search: expected a JSON list of DICOM datasets (element 00100010: Value is not a list)"),
    (None, [{"00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]}, "FFFFFFFFFFFF": {"vr": "UI", "Value": ["x"]}}],
     "instance search: expected a JSON list of DICOM datasets (an element key is wider than a DICOM tag"),
])
def test_malformed_dicom_json_answers_are_one_line_errors(broken_pacs, tmp_path, monkeypatch, series, instances,
                                                         problem):
    """QIDO-RS answers whose Value is not a list (a number, a string) or whose element key is wider than a tag
    crashed from_dicom_json with a TypeError / OverflowError traceback: a DataError naming the server answer
    (never the value), exit 2 at the CLI."""
    monkeypatch.setattr(BrokenPacs, "series", series or BrokenPacs.series)
    monkeypatch.setattr(BrokenPacs, "instances", instances or BrokenPacs.instances)
    with pytest.raises(DataError) as error:
        pull_study(broken_pacs, "1.2.3", tmp_path / "out", show_progress=False)
    assert str(error.value).startswith(f"{broken_pacs}: {problem}") and "Vornholt" not in str(error.value)
    for command in (("search", "--study", "1.2.3"), ("pull", "--study", "1.2.3", "--out", tmp_path / "cli")):
        if series is None and command[0] == "search":
            continue  # the series search lists no instances
        result, output = invoke("pacs", *command, "--url", broken_pacs)
        assert result.exit_code == 2 and problem in " ".join(output.split()), output
        assert "Traceback" not in output and "Vornholt" not in output


def test_query_values_keep_the_dicom_matching_characters():
    from medvl.clinical.pacs import query_string

    params = [("PatientName", "DOE^J* ?"), ("StudyInstanceUID", "1.2,1.3"), ("StudyDescription", "a&b=c%+"),
              ("PatientID", "Müller")]
    assert query_string(params) == ("PatientName=DOE^J*%20?&StudyInstanceUID=1.2,1.3&StudyDescription=a%26b%3Dc%25%2B"
                                    "&PatientID=M%C3%BCller")
    assert query_string(params[:1], safe="*?,") == "PatientName=DOE%5EJ*%20?"


class StrictPacs(BaseHTTPRequestHandler):
    """A QIDO-RS server that refuses a bare "^" in the URL (HTTP 400, as RFC 3986 strict servers do)."""

    paths: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        StrictPacs.paths.append(self.path)
        status, body = (400, b"bad request") if "^" in self.path else (200, b"[]")
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_refusing_a_bare_caret_is_asked_again_with_it_encoded():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StrictPacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with DicomWebClient(f"http://127.0.0.1:{server.server_address[1]}/dicom-web") as client:
            assert client.search_studies({"PatientName": "DOE^*"}, fields=()) == []
    finally:
        server.shutdown()
        server.server_close()
    assert StrictPacs.paths == ["/dicom-web/studies?PatientName=DOE^*", "/dicom-web/studies?PatientName=DOE%5E*"]


def test_the_no_match_warning_advises_star_for_non_ascii_letters(caplog):
    """A space may be replaced by ? (one byte); a non-ASCII letter is two or more bytes in UTF-8, so only *
    matches it (Orthanc: ``M?ller*`` finds nothing, over C-FIND too)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StrictPacs)  # answers [] to any search without a bare ^
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with DicomWebClient(f"http://127.0.0.1:{server.server_address[1]}/dicom-web") as client:
            assert client.search_studies({"PatientName": "Müller*"}, fields=()) == []
            assert "(non-ASCII letters)" in caplog.text and caplog.text.rstrip().endswith("try * in their place")
            caplog.clear()
            assert client.search_studies({"StudyDescription": "Follow-up of*"}, fields=()) == []
            assert "(space)" in caplog.text and "try ? or * in their place" in caplog.text
    finally:
        server.shutdown()
        server.server_close()
    assert "Müller" not in caplog.text and "Follow" not in caplog.text


def test_qido_paging_goes_on_past_a_short_page():
    from medvl.clinical.pacs import _all_pages

    items = [{"SOPInstanceUID": f"1.2.{i}"} for i in range(5)]
    asked: list[int] = []

    def capped(offset: int) -> list[dict]:  # 2 results a page whatever the limit asked: a capped server
        asked.append(offset)
        return items[offset:offset + 2]

    assert _all_pages(capped, "SOPInstanceUID") == items and asked == [0, 2, 4, 5]
    asked.clear()
    assert _all_pages(capped, "SOPInstanceUID", expected=4) == items[:4] and asked == [0, 2]  # the count is there
    assert _all_pages(lambda offset: items[:2], "SOPInstanceUID") == items[:2]  # a server ignoring offset


def test_pull_is_never_complete_while_the_source_counts_more_than_it_delivers(tmp_path):
    """A source listing 3 of the 4 instances it counts, which delivers only what it listed (as a DIMSE
    retrieve refuses instances not asked for): the pull stays incomplete and keeps its state."""
    from medvl.clinical.pull import SeriesPlan, run_pull

    slices = sorted(p for p in write_patients(tmp_path / "files")["A"] if "-ct-" in p.name)
    headers = [pydicom.dcmread(p) for p in slices]

    class CappedSource:
        url = "test://capped"

        def plan_series(self, study_uids):
            return [SeriesPlan(headers[0].StudyInstanceUID, headers[0].SeriesInstanceUID, "CT", 1,
                               [ds.SOPInstanceUID for ds in headers[:3]], expected=4)]

        def fetch_series(self, plan, missing):
            for path, ds in zip(slices, headers, strict=True):
                if ds.SOPInstanceUID in missing:
                    with path.open("rb") as body:
                        yield body

    out = tmp_path / "out"
    for run in range(2):  # a rerun gets no further, and says so again
        report = run_pull(CappedSource(), headers[0].StudyInstanceUID, out, show_progress=False)
        assert not report["complete"] and (out / STATE_NAME).is_file()
        assert report["missing"] == ("1 instance(s) missing: series 1 of 1 (CT) has 3 of 4, the server listing "
                                     "only 3 (a capped search)")
        assert report["counts"]["pulled"] == (3 if run == 0 else 0) and len(list(out.rglob("*.dcm"))) == 3


class FilesSource:
    """A pull source serving files as a PACS serves them: one series per file, the bytes as stored."""

    url = "test://files"

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.headers = [pydicom.dcmread(path, force=True, stop_before_pixels=True) for path in paths]

    def plan_series(self, study_uids):
        from medvl.clinical.pull import SeriesPlan

        return [SeriesPlan(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", index)),
                           str(ds.get("Modality")), index, [str(ds.SOPInstanceUID)])
                for index, ds in enumerate(self.headers)]

    def fetch_series(self, plan, missing):
        for path, ds in zip(self.paths, self.headers, strict=True):
            if str(ds.SOPInstanceUID) in missing:
                with path.open("rb") as body:
                    yield body


def test_pull_report_counts_burned_in_risk_not_every_warning(tmp_path, caplog):
    """An ultrasound image without Burned In Annotation is at risk for its kind (``deid.burned_in_risk``); a CT
    image warned only because it had no Study Instance UID is not: the report and the log count the first."""
    from medvl.clinical.pull import run_pull

    ct = write_dicom(tmp_path / "ct.dcm", PATIENTS["B"], study="9", series="1", number=1, modality="CT",
                     pixels=np.zeros((8, 8)), series_number=1, description="Thorax")
    ds = pydicom.dcmread(ct)
    del ds.StudyInstanceUID  # a whole object without it: given one, with a warning
    ds.save_as(ct)
    ultrasound = STORE / "color-pl.dcm"
    assert pydicom.dcmread(ultrasound, stop_before_pixels=True).get("BurnedInAnnotation") is None
    report = run_pull(FilesSource([ct, ultrasound]), "1.2.3", tmp_path / "out", show_progress=False)
    deid = report["deidentification"]
    assert deid["files_with_burned_in_risk"] == 1 and deid["files_with_warnings"] == 2
    [flagged] = deid["burned_in_risk_files"]
    assert pydicom.dcmread(tmp_path / "out" / flagged).Modality == "US"
    assert "1 pulled instance(s) may hold burned-in text in their pixels" in caplog.text
    assert "declare" not in caplog.text


def test_a_series_that_fails_is_skipped_but_a_lost_connection_stops_the_pull(tmp_path):
    """A series the source fails to deliver (here an instance that is not DICOM) no longer stops the series
    after it; a connection lost stops the pull at once (every other series would fail the same way)."""
    from medvl.clinical.pull import STATE_NAME, run_pull
    from medvl.errors import ConnectionFailure

    good = [write_dicom(tmp_path / f"ct{i}.dcm", PATIENTS["B"], study=str(i), series="1", number=1, modality="CT",
                        pixels=np.zeros((8, 8)), series_number=1, description="Thorax") for i in range(2)]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"MZ" + os.urandom(400))
    source = FilesSource([good[0], good[1], good[1]])
    source.paths = [good[0], junk, good[1]]
    source.headers[1] = pydicom.Dataset()
    source.headers[1].SOPInstanceUID, source.headers[1].Modality = "1.2.3.4.5", "CT"
    report = run_pull(source, "1.2.3", tmp_path / "out", show_progress=False)
    assert report["counts"]["pulled"] == 2 and not report["complete"] and (tmp_path / "out" / STATE_NAME).is_file()
    assert [series["error"] for series in report["series"]] == [
        None, "a received instance is not a DICOM file (no DICM marker at byte 128 and no DICOM header at the "
              "start)", None]
    assert report["missing"].startswith("1 instance(s) missing: series 2 of 3 (CT) has 0 of 1, its retrieve "
                                        "failed: a received instance is not a DICOM file")

    class Unreachable(FilesSource):
        asked = 0

        def fetch_series(self, plan, missing):
            Unreachable.asked += 1
            raise ConnectionFailure(self.url, "cannot connect: connection refused")
            yield

    with pytest.raises(ConnectionFailure, match="connection refused"):
        run_pull(Unreachable(good), "1.2.3", tmp_path / "gone", show_progress=False)
    assert Unreachable.asked == 1


@pytest.mark.parametrize("change", [
    {"done": "/etc/hostname"}, {"done": "../../../../../../etc/hostname"}, {"done": 5}, {"done": False},
    {"at_risk": ["/etc/hostname"]}, {"at_risk": [5]}, {"seed": False}, {"format": 99}, {"studies": "x"},
    {"keep_identifiers": "no"},
])
def test_a_pull_state_edited_by_hand_is_refused_naming_it(tmp_path, change):
    """The state was trusted as read: a done path outside OUT counted as pulled (and an at-risk one was named in the
    report), a value of another type crashed the resume (TypeError / AttributeError), an unknown format was taken."""
    from medvl.clinical.pull import run_pull

    files = [write_dicom(tmp_path / f"ct{i}.dcm", PATIENTS["B"], study="5", series=str(i), number=1, modality="CT",
                         pixels=np.zeros((8, 8)), series_number=i, description="Thorax") for i in (1, 2)]
    out = tmp_path / "out"
    assert not run_pull(FilesSource(files), "1.2.3", out, limit=1, show_progress=False)["complete"]
    state = json.loads((out / STATE_NAME).read_text())
    [key] = state["done"]
    for name, value in change.items():
        if name == "done":
            state["done"][key] = value
        else:
            state[name] = value
    (out / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(DataError) as error:
        run_pull(FilesSource(files), "1.2.3", out, show_progress=False)
    assert str(error.value) == f"{out / STATE_NAME}: unreadable pull state; delete the folder and pull again"


@pytest.mark.parametrize("keep_identifiers", [False, True])
def test_a_pull_started_before_the_whole_day_date_shift_is_refused_on_resume(tmp_path, keep_identifiers):
    """The state kept the seed but not how the date shift follows from it: a pull started by medvl before
    2026-12-07 (dicognito's seeded hours; a state of format 1 without date_shift) and resumed by this one went on
    with another offset, one real Study Date written as two pseudo-dates 15 months apart in one study. Refused,
    nothing more written; a pull keeping identifiers shifts no date and resumes."""
    from medvl.clinical.deid import DATE_SHIFT
    from medvl.clinical.pull import run_pull

    files = [write_dicom(tmp_path / f"ct{i}.dcm", PATIENTS["B"], study="5", series=str(i), number=1, modality="CT",
                         pixels=np.zeros((8, 8)), series_number=i, description="Thorax") for i in (1, 2)]
    out = tmp_path / "out"
    pull = {"keep_identifiers": keep_identifiers, "show_progress": False}
    assert not run_pull(FilesSource(files), "1.2.3", out, limit=1, **pull)["complete"]
    state = json.loads((out / STATE_NAME).read_text())
    assert state.pop("date_shift") == (None if keep_identifiers else DATE_SHIFT)
    (out / STATE_NAME).write_text(json.dumps(state | {"format": 1}))  # as medvl before 2026-12-07 wrote it
    if keep_identifiers:
        assert run_pull(FilesSource(files), "1.2.3", out, **pull)["complete"]
        return
    with pytest.raises(InputError) as error:
        run_pull(FilesSource(files), "1.2.3", out, **pull)
    assert str(error.value) == (f"{out}: the unfinished pull there was started by another medvl version, which "
                                "shifts dates differently; finish it with the medvl version that started it, or "
                                "start a new pull into another folder")
    assert len(list(out.rglob("*.dcm"))) == 1 and (out / STATE_NAME).is_file()


def test_pull_takes_a_data_set_without_preamble_and_names_the_source_once(tmp_path):
    from medvl.clinical.pull import run_pull

    raw = STORE / "OT-PAL-8-face.dcm"  # no preamble, DICM or file meta: as medvl deid / predict read it
    report = run_pull(FilesSource([raw]), "1.2.3", tmp_path / "out", show_progress=False)
    assert report["complete"] and report["counts"]["pulled"] == 1
    [written] = (tmp_path / "out").rglob("*.dcm")
    assert written.read_bytes()[128:132] == b"DICM" and pydicom.dcmread(written).PatientIdentityRemoved == "YES"
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"MZ" + os.urandom(400))
    source = FilesSource([raw])
    source.paths = [junk]
    with pytest.raises(DataError, match="not a DICOM file") as error:
        run_pull(source, "1.2.3", tmp_path / "junk-out", show_progress=False)
    assert str(error.value).startswith("test://files (series 1 of 1): a received instance is not a DICOM file")
    assert str(error.value).count("test://files") == 1


def test_multipart_parser_handles_any_chunking():
    parts = [os.urandom(3000), b"", b"--b0und4r", os.urandom(70000)]
    body = b"preamble\r\n" + multipart(parts)
    for size in (1, 7, 64, 4096, len(body)):
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        found = [stream.read() for _, stream in iter_multipart(chunks, b"b0und4ry", "test")]
        assert found == parts


# ------------------------------------------------------- index built straight from raw DICOM


@pytest.fixture(scope="module")
def raw_dicom(tmp_path_factory) -> tuple[Path, set[bytes]]:
    """Identified DICOM (not de-identified): the made-up patients and pydicom-data files."""
    folder = tmp_path_factory.mktemp("raw") / "dicom"
    files = write_patients(folder / "made-up")
    store = pydicom_data_copies(folder / "store")
    secrets = secrets_of([*files["A"], *files["B"], *store])
    return folder, secrets


def test_dicom_folder_loader_keeps_no_identifier(raw_dicom, tmp_path):
    folder, secrets = raw_dicom
    dataset = load_dataset(folder)
    assert len(dataset) == 8  # CT volume + CR, MR (A) + DX, CR (B) + 3 pydicom-data images
    for record in dataset:
        text = json.dumps([record.id, record.meta, record.labels, record.text]).encode()
        assert not [s for s in secrets if s in text], record.id
    assert sorted(r.meta["deidentified"] for r in dataset) == ["no"] * 7 + ["yes"]  # 693_J2KR says it is
    descriptions = {r.meta.get("series_description") for r in dataset}
    assert "Thorax 2.5 mm" in descriptions and "PA Vornholt" not in descriptions  # a name in it: dropped
    [volume] = [r for r in dataset if r.meta["kind"] == "volume"]
    assert "Thorax" not in repr(volume.image) and read_image(volume.image).shape == (4, 32, 32)


def test_dicom_folder_labels_sidecar(raw_dicom, tmp_path):
    folder = tmp_path / "labelled"
    shutil.copytree(raw_dicom[0] / "made-up", folder)
    study_a = f"{UID_ROOT}.{PATIENTS['A']['date']}.1"
    series_b = f"{UID_ROOT}.{PATIENTS['B']['date']}.2.2"
    (folder / "labels.csv").write_text(
        "StudyInstanceUID,finding,split,text\n"
        f"{study_a},nodule,train,Small nodule in the right upper lobe.\n"
        "9.9.9,effusion,test,\n")
    dataset = load_dataset(folder)
    assert dataset.label_names == ["finding"] and dataset.default_labels == ["finding"]
    labelled = [r for r in dataset if r.labels]
    assert len(labelled) == 3 and {r.split for r in labelled} == {"train"}
    assert all(r.text == "Small nodule in the right upper lobe." for r in labelled)
    (folder / "labels.csv").write_text(f"SeriesInstanceUID,view\n{series_b},lateral\n")
    [lateral] = [r for r in load_dataset(folder) if r.labels]
    assert lateral.labels == {"view": "lateral"} and lateral.meta["view_position"] == "LL"
    (folder / "labels.csv").write_text("patient,finding\nx,y\n")
    with pytest.raises(DataError, match="needs a key column"):
        load_dataset(folder)


def test_index_from_raw_dicom_holds_no_identifier(raw_dicom, tiny_model_dir, tmp_path):
    from medvl.index import build_index
    from medvl.models.registry import load_model

    folder, secrets = raw_dicom
    images = load_dataset(folder)
    images = images.subset([r for r in images if r.meta["kind"] == "image"])
    out = tmp_path / "index"
    info = build_index(load_model(tiny_model_dir), images, out, model_dir=tiny_model_dir, show_progress=False)
    assert info["n_cases"] == 7
    assert leaks([out], secrets) == []


@pytest.mark.pgvector
def test_pgvector_index_from_raw_dicom_holds_no_identifier(raw_dicom, tiny_model_dir):
    import tempfile

    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    from medvl.index import build_index
    from medvl.models.registry import load_model

    folder, secrets = raw_dicom
    images = load_dataset(folder)
    images = images.subset([r for r in images if r.meta["kind"] == "image"])
    data_dir = Path(tempfile.mkdtemp(prefix="medvl-pg-pacs-"))  # pgserver opens its parents: keep it apart
    try:
        try:
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        except Exception as err:  # noqa: BLE001 - no server to test against
            pytest.skip(f"pgserver could not start a PostgreSQL server: {err}")
        try:
            info = build_index(load_model(tiny_model_dir), images, server.get_uri() + "#raw_dicom",
                               model_dir=tiny_model_dir, show_progress=False)
            assert info["n_cases"] == 7
            server.psql("CHECKPOINT;")  # table pages and WAL on disk
            assert leaks([data_dir], secrets) == []
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
