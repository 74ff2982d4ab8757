"""Property test of de-identification: for a random patient (name, ID, birth date) whose identifiers
are planted, in a random spelling, into a random text element of CT_small.dcm, ``deidentify`` either
refuses the file (naming an element, writing nothing) or writes a file holding none of them.

The check here is independent of medvl's scan: plain byte search for the glued name, the ID and
every date spelling, and a whole-word search of every decoded text value for the name parts.
"""

from __future__ import annotations

import io
import re
import tempfile
from datetime import date
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicognito")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from medvl.clinical.deid import deidentify  # noqa: E402
from medvl.errors import DataError  # noqa: E402

CT = Path(get_testdata_file("CT_small.dcm"))
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def date_spellings(day: date) -> list[str]:
    y, m, d = f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}"
    month = MONTHS[day.month - 1]
    return [f"{y}{m}{d}", f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}",
            f"{month} {day.day}, {y}", f"{day.day} {month[:3]} {y}"]


def name_spellings(family: str, given: str) -> list[str]:
    return [f"{family} {given}", f"{given}^{family}", f"{family.upper()}, {given}", f"{given}{family}".upper(),
            f"{family.lower()}-{given.lower()}"]


def code_item(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X1", "99LOCAL", value
    return item


PLANTERS = {
    "BodyPartExamined": lambda ds, v: setattr(ds, "BodyPartExamined", re.sub(r"[^A-Z0-9 _]", " ", v.upper())[:16]),
    "ConvolutionKernel": lambda ds, v: setattr(ds, "ConvolutionKernel", v[:16]),
    "StudyDescription": lambda ds, v: setattr(ds, "StudyDescription", f"CT {v}"),
    "ManufacturerModelName": lambda ds, v: setattr(ds, "ManufacturerModelName", v),
    "SoftwareVersions": lambda ds, v: setattr(ds, "SoftwareVersions", v),
    "ImageComments": lambda ds, v: setattr(ds, "ImageComments", v),
    "InstitutionAddress": lambda ds, v: setattr(ds, "InstitutionAddress", v),
    "ProcedureCodeSequence": lambda ds, v: setattr(ds, "ProcedureCodeSequence", [code_item(v)]),
}

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=7).map(str.title)
# medical record numbers with a letter: a purely numeric ID cannot be told from a number (e.g. in a
# Slice Thickness of 5.000000), and numbers are not searched for IDs
patient_ids = st.from_regex(r"[A-Z]{1,3}[0-9]{5,8}", fullmatch=True)
birth_dates = st.dates(min_value=date(1920, 1, 1), max_value=date(1999, 12, 31))


def leaks(data: bytes, family: str, given: str, patient_id: str, birth: date) -> list[str]:
    lowered = data.lower()
    forms = [f"{family}{given}", f"{given}{family}", patient_id, *date_spellings(birth)]
    found = [form for form in forms if form.lower().encode() in lowered]
    ds = pydicom.dcmread(io.BytesIO(data))
    parts = {family.lower(), given.lower()}
    for dataset in (ds.file_meta, ds):
        for element in dataset.iterall():
            if element.VR not in ("SQ", "OB", "OW", "UN") and element.value is not None:
                found += sorted(parts & set(re.split(r"[^a-z]+", str(element.value).lower())))
    return found


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                  HealthCheck.function_scoped_fixture])
@given(family=names, given=names, patient_id=patient_ids, birth=birth_dates, where=st.sampled_from(sorted(PLANTERS)),
       kind=st.sampled_from(("name", "id", "date")), spelling=st.integers(0, 6), clean=st.booleans())
def test_planted_identifier_is_refused_or_gone(tmp_path, family, given, patient_id, birth, where, kind, spelling,
                                               clean):
    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{family}^{given}", patient_id, birth.strftime("%Y%m%d")
    choices = {"name": name_spellings(family, given), "id": [patient_id, f"MRN {patient_id}"],
               "date": date_spellings(birth)}[kind]
    planted = choices[spelling % len(choices)]
    PLANTERS[where](ds, planted)
    case = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example (tmp_path is shared)
    source, out = case / "in.dcm", case / "out.dcm"
    ds.save_as(source, enforce_file_format=True)
    try:
        deidentify(source, out, seed=5, clean_descriptors=clean)
    except DataError as error:
        assert "survived de-identification in " in str(error) and not out.exists()
        assert planted not in str(error) and patient_id not in str(error)  # the message never quotes values
        return
    assert leaks(out.read_bytes(), family, given, patient_id, birth) == []
