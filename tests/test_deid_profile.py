"""PS3.15 Table E.1-1 as data (``medvl.clinical.profile``) and its application by ``medvl deid``.

The table is checked against pydicom's data dictionary; then every attribute it lists is planted in
one file with a marker value, and the de-identified file must hold none of the markers. Real files of
pydicom's test corpus and the probe's crafted cases (institution code, operator, clinical-trial and
station attributes, the sending site's AE title) check the attributes one by one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicognito")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.datadict import dictionary_description, dictionary_VR, keyword_for_tag  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from medvl.clinical.deid import DATE_SHIFT, deidentify  # noqa: E402
from medvl.clinical.profile import (  # noqa: E402
    ACTIONS,
    DICOGNITO_IDS,
    EXTRA_REMOVED,
    FILE_META_REMOVED,
    TABLE_FILE,
    profile_table,
)

CT = Path(get_testdata_file("CT_small.dcm"))
PLANTED_DATE = "19830407"
UID_ROOT = "1.2.826.0.1.3680043.8.498.777"
TEXT_VRS = ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UR", "UT")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # planted values pydicom calls invalid


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def test_table_matches_the_pydicom_dictionary():
    rows = profile_table()
    assert len(rows) == 617  # Table E.1-1 (2024b), single-tag rows
    lines = [line for line in TABLE_FILE.read_text(encoding="utf-8").splitlines() if line and line[0] != "#"]
    assert len(lines) == len(rows)  # no tag twice
    for tag, row in rows.items():
        assert keyword_for_tag(tag) == row.keyword, row
        assert _norm(dictionary_description(tag)) == _norm(row.name), row
        assert row.action in ACTIONS, row
    for keyword in EXTRA_REMOVED + FILE_META_REMOVED:  # medvl's additions exist and are not in the table
        assert keyword in pydicom.datadict.keyword_dict and keyword not in {r.keyword for r in rows.values()}


def test_the_probe_attributes_have_their_standard_actions():
    by_keyword = {row.keyword: row.action for row in profile_table().values()}
    assert by_keyword["InstitutionCodeSequence"] == "X/Z/D" and by_keyword["InstitutionAddress"] == "X"
    assert by_keyword["OperatorIdentificationSequence"] == "X/D"
    assert by_keyword["ClinicalTrialSubjectID"] == "D" and by_keyword["ClinicalTrialSiteName"] == "Z"
    assert by_keyword["PerformedStationName"] == "X" and by_keyword["TimezoneOffsetFromUTC"] == "X"
    assert by_keyword["VerifyingOrganization"] == "D" and by_keyword["PatientID"] == "Z/D"
    assert by_keyword["ReferencedImageSequence"] == "X/Z/U*" and by_keyword["StudyInstanceUID"] == "U"


# ------------------------------------------------------------------ every attribute, planted


def _code_item(marker: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = marker, "99MKR", f"{marker} meaning"
    return item


def _planted_value(index: int, vr: str, action: str):
    """A value of ``vr`` that carries a marker (``MKR0042``), a planted UID or the planted date."""
    marker = f"MKR{index:04d}"
    if vr in TEXT_VRS:
        return marker
    if vr == "PN":
        return f"{marker}^Zed"
    if vr == "SQ":
        if action.endswith("U*"):  # a reference: kept, UIDs replaced
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            item.ReferencedSOPInstanceUID = f"{UID_ROOT}.{index}"
            return [item]
        return [_code_item(marker)]
    values = {"UI": f"{UID_ROOT}.{index}", "DA": PLANTED_DATE, "DT": PLANTED_DATE + "101010", "TM": "101010",
              "AS": "045Y", "OB": marker.encode() + b"\x00", "UN": marker.encode() + b"\x00"}
    return values.get(vr)


def planted_dataset() -> tuple[Dataset, dict[int, str]]:
    """CT_small with every Table E.1-1 attribute it can hold set to a marker value."""
    ds = pydicom.dcmread(CT)
    planted: dict[int, str] = {}
    for index, (tag, row) in enumerate(sorted(profile_table().items())):
        if tag >> 16 in (0x0000, 0x0002) or tag in ds:  # command and file meta groups; CT_small's own
            continue
        vr = dictionary_VR(tag)
        value = _planted_value(index, vr, row.action)
        if value is not None:
            ds.add_new(tag, vr, value)
            planted[tag] = row.keyword
    return ds, planted


@pytest.mark.parametrize("clean", [True, False])
def test_every_table_attribute_is_removed_emptied_or_replaced(clean, tmp_path):
    ds, planted = planted_dataset()
    assert len(planted) > 500
    source = tmp_path / "planted.dcm"
    ds.save_as(source, enforce_file_format=True)
    assert source.read_bytes().count(b"MKR") > 400
    out = tmp_path / "out.dcm"
    deidentify(source, out, seed=3, clean_descriptors=clean)
    data = out.read_bytes()
    survivors = sorted({m.decode() for m in re.findall(rb"MKR\d{4}", data)})
    assert survivors == [], [profile_table()[sorted(profile_table())[int(m[3:])]].keyword for m in survivors]
    assert UID_ROOT.encode() not in data and PLANTED_DATE.encode() not in data
    written = pydicom.dcmread(out)
    assert written.PatientIdentityRemoved == "YES"
    removed = [tag for tag, keyword in planted.items() if profile_table()[tag].action == "X"
               and dictionary_VR(tag) not in ("DA", "DT", "TM") and tag in written]
    assert [planted[tag] for tag in removed if not (clean and written[tag].value in ("", None))] == []


def test_probe_site_and_staff_attributes_are_gone(tmp_path):
    """The probe's phi2.dcm: institution code, operator identification, clinical trial subject and
    site, station, residence; the sending AE title in the file meta; an address without a name."""
    ds = pydicom.dcmread(CT)
    ds.file_meta.SourceApplicationEntityTitle = "STMARY_CT1"
    ds.InstitutionName = "St Mary General Hospital"
    ds.InstitutionCodeSequence = [_code_item("SMGH01")]
    ds.InstitutionCodeSequence[0].CodeMeaning = "St Mary General Hospital, Boston"
    operator, person = Dataset(), _code_item("EMP4711")
    person.CodeMeaning = "Hans Gruber, RT"
    operator.PersonIdentificationCodeSequence = [person]
    ds.OperatorIdentificationSequence = [operator]
    ds.ClinicalTrialSubjectID, ds.ClinicalTrialSiteName = "SUBJ-0042-KL", "St Mary General Hospital"
    ds.PerformedStationName, ds.ScheduledStationAETitle = "STMARY-CT1", "STMARY_CT1"
    ds.PatientInstitutionResidence = "Sunny Acres Nursing Home"
    ds.IssuerOfAccessionNumberSequence = [Dataset()]
    ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = "STMARY RIS"
    source = tmp_path / "phi2.dcm"
    ds.save_as(source, enforce_file_format=True)
    deidentify(source, tmp_path / "out.dcm", seed=1)
    data = (tmp_path / "out.dcm").read_bytes().lower()
    for secret in ("st mary", "stmary", "hans gruber", "emp4711", "subj-0042", "sunny acres"):
        assert secret.encode() not in data, secret
    written = pydicom.dcmread(tmp_path / "out.dcm")
    assert written.ClinicalTrialSubjectID.startswith("ANON") and written.ClinicalTrialSiteName == ""
    assert "SourceApplicationEntityTitle" not in written.file_meta and written.PatientIdentityRemoved == "YES"
    ds = pydicom.dcmread(CT)  # the address alone: dicognito rewrote it only together with Institution Name
    ds.InstitutionAddress = "12 Elm Street, Springfield"
    ds.save_as(tmp_path / "phi3.dcm", enforce_file_format=True)
    deidentify(tmp_path / "phi3.dcm", tmp_path / "out3.dcm", seed=1)
    assert b"Elm Street" not in (tmp_path / "out3.dcm").read_bytes()
    assert "InstitutionAddress" not in pydicom.dcmread(tmp_path / "out3.dcm")


@pytest.mark.parametrize(("name", "secret", "keyword"), [
    ("test-SR.dcm", b"OFFIS e.V.", "VerifyingObserverSequence"),
    ("liver.dcm", b"UIowa", "ClinicalTrialCoordinatingCenterName"),
    ("CT_small.dcm", b"-0500", "TimezoneOffsetFromUTC"),
    ("MR_small.dcm", b"-0400", "TimezoneOffsetFromUTC"),
])
def test_real_files_keep_no_site_attribute(name, secret, keyword, tmp_path):
    source = Path(get_testdata_file(name))
    assert secret in source.read_bytes() and keyword in pydicom.dcmread(source)
    deidentify(source, tmp_path / "out.dcm", seed=2)
    assert secret not in (tmp_path / "out.dcm").read_bytes()
    written = pydicom.dcmread(tmp_path / "out.dcm")
    if keyword == "VerifyingObserverSequence":  # D: the items stay, with dummies and no identifying code
        for item in written.VerifyingObserverSequence:
            assert item.VerifyingOrganization.startswith("ANON")
            assert not item.VerifyingObserverIdentificationCodeSequence
    elif keyword == "ClinicalTrialCoordinatingCenterName":  # Z: emptied
        assert written.ClinicalTrialCoordinatingCenterName == ""
    else:
        assert keyword not in written


def test_birth_date_is_emptied_and_x_names_removed(tmp_path):
    """Patient's Birth Date is Z (the Modified Dates option does not cover it: a shifted birth date
    still gives the age); person names with action X are removed, not replaced by dummies."""
    ds = pydicom.dcmread(CT)
    ds.PatientBirthDate, ds.PerformingPhysicianName, ds.ReferringPhysicianName = "19500131", "Doe^Jo", "Roe^Al"
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    report = deidentify(tmp_path / "in.dcm", tmp_path / "out.dcm", seed=4)
    written = pydicom.dcmread(tmp_path / "out.dcm")
    assert written.PatientBirthDate == "" and "PerformingPhysicianName" not in written
    assert written.ReferringPhysicianName not in ("", "Roe^Al")  # Z allows dicognito's dummy
    assert written.StudyDate != ds.StudyDate  # shifted, kept (Modified Dates option)
    assert "PerformingPhysicianName" in report["totals"]["removed"]


def test_dummies_are_consistent_within_a_run_and_with_a_seed(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, subject in enumerate(("SUBJ-1", "SUBJ-1", "SUBJ-2")):
        ds = pydicom.dcmread(CT)
        ds.SOPInstanceUID = f"{UID_ROOT}.{index}"
        ds.ClinicalTrialSubjectID = subject
        ds.save_as(folder / f"{index}.dcm", enforce_file_format=True)
    deidentify(folder, tmp_path / "a", seed=9)
    deidentify(folder, tmp_path / "b", seed=9)
    deidentify(folder, tmp_path / "c")

    def subjects(out: Path) -> list[str]:
        return [pydicom.dcmread(p).ClinicalTrialSubjectID for p in sorted(out.rglob("*.dcm"))]

    a = subjects(tmp_path / "a")
    assert a[0] == a[1] != a[2] and all(re.fullmatch(r"ANON[A-Z0-9]{8}", s) for s in a)
    assert subjects(tmp_path / "b") == a and subjects(tmp_path / "c")[0] != a[0]


@pytest.mark.parametrize("keyword", sorted(DICOGNITO_IDS))
def test_dicognito_replaces_the_ids_the_profile_keeps_as_dummies(keyword):
    from dicognito.anonymizer import Anonymizer

    ds = pydicom.dcmread(CT)
    setattr(ds, keyword, "ID12345")
    Anonymizer(seed="1").anonymize(ds)
    assert ds.get(keyword) not in (None, "", "ID12345")


def test_report_does_not_depend_on_the_date_offset(tmp_path):
    """Seeds 1 and 5 give different offsets; both reports list the same replaced attributes (the README's
    count was not reproducible). Times of day keep their values (a whole-day offset): not replaced."""
    reports = [deidentify(CT, tmp_path / f"{seed}.dcm", seed=seed) for seed in (1, 5)]
    assert reports[0]["totals"]["replaced"] == reports[1]["totals"]["replaced"]
    assert reports[0]["date_shift"] == reports[1]["date_shift"] == DATE_SHIFT  # how, never the offset itself
    assert "StudyDate" in reports[1]["totals"]["replaced"] and "StudyTime" not in reports[1]["totals"]["replaced"]
    original, shifted = pydicom.dcmread(CT), [pydicom.dcmread(tmp_path / f"{seed}.dcm") for seed in (1, 5)]
    assert all(out.StudyTime == original.StudyTime and out.StudyDate != original.StudyDate for out in shifted)
    assert shifted[0].StudyDate != shifted[1].StudyDate


def test_one_real_date_gives_one_pseudo_date_with_or_without_its_time(tmp_path):
    """Two files of one study, one with Study / Series Time late in the day and one with an empty Study Time
    (Type 2) and no Series Time: dicognito's own offset, a whole number of hours (seed 1: 3 hours more than
    whole days), moved 20040119 23:59 and 20040119 (from 00:00) to two dates a day apart. The whole-day
    offset moves both alike, 62 to 730 days back, the same with the same seed."""
    import datetime

    for index, (study_time, series_time) in enumerate([("235900", "235930"), ("", None)], 1):
        ds = pydicom.dcmread(CT)
        ds.StudyDate = ds.SeriesDate = "20040119"
        ds.StudyTime = study_time
        if series_time is None:
            del ds.SeriesTime
        else:
            ds.SeriesTime = series_time
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.{index}"
        ds.InstanceNumber, ds.ImagePositionPatient = index, [0, 0, float(index)]
        (tmp_path / "in").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "in" / f"slice{index}.dcm")
    dates = []
    for run in ("a", "b"):
        deidentify(tmp_path / "in", tmp_path / run, seed=1)
        outputs = [pydicom.dcmread(tmp_path / run / "study_001" / "series_001" / f"image_000{i}.dcm") for i in (1, 2)]
        dates.append({(out.StudyDate, out.SeriesDate) for out in outputs})
        assert len(dates[-1]) == 1, dates[-1]  # one pseudo-date for both files
        assert outputs[0].StudyTime == "235900" and outputs[0].SeriesTime == "235930"  # times of day kept
    assert dates[0] == dates[1]  # the same seed, the same shift
    (study_date, series_date), = dates[0]
    days = (datetime.date(2004, 1, 19) - datetime.datetime.strptime(study_date, "%Y%m%d").date()).days
    assert study_date == series_date and 62 <= days <= 730


def test_partial_date_times_and_utc_offsets_are_shifted_keeping_their_form(tmp_path):
    """PS3.5 DT is YYYYMMDDHHMMSS.FFFFFF&ZZXX with every component after the year optional, the hour too:
    ``20040115+0100`` and ``2004+0100`` were read as if they had no UTC offset, failed to parse and were
    emptied as "not valid DICOM dates". Every form moves back by the run's days (Study Date's shift),
    keeping its precision and its offset; an invalid one is still emptied."""
    import datetime

    values = [("20040115+0100", "%Y%m%d"), ("2004+0100", "%Y"), ("200401-0500", "%Y%m"), ("2004", "%Y"),
              ("200401", "%Y%m"), ("20040115", "%Y%m%d"), ("2004011512+0100", "%Y%m%d%H"),
              ("20040115123000.123456+0100", "%Y%m%d%H"), ("20040115123000.5", "%Y%m%d%H"),
              ("200401151230-0300", "%Y%m%d%H"), ("20049999+0100", None)]  # value, the form it is read in
    (tmp_path / "in").mkdir()
    for index, (value, _) in enumerate(values):
        ds = pydicom.dcmread(CT)
        ds.StudyDate, ds.AcquisitionDateTime = "20040115", value
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.{index}"
        ds.InstanceNumber = index + 1
        ds.save_as(tmp_path / "in" / f"{index:02d}.dcm")
    deidentify(tmp_path / "in", tmp_path / "out", seed=7)
    written = [pydicom.dcmread(p) for p in sorted((tmp_path / "out").rglob("*.dcm"))]
    study_dates = {out.StudyDate for out in written}
    assert len(study_dates) == 1
    shift = datetime.date(2004, 1, 15) - datetime.datetime.strptime(study_dates.pop(), "%Y%m%d").date()
    for out in written:
        value, form = values[out.InstanceNumber - 1]
        if form is None:
            assert out.AcquisitionDateTime == "", value
            continue
        width = len(datetime.datetime(2004, 1, 1).strftime(form))
        moment = datetime.datetime.strptime(value[:width], form) - shift
        assert out.AcquisitionDateTime == moment.strftime(form) + value[width:], value
