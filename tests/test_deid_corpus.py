"""De-identification against a planted corpus and hostile inputs, through the Python API and the CLI.

The corpus is built here from pydicom's own test files: a patient with a short name (``Li^Wu``), an
ID and a birth date, and those identifiers planted in text elements of every VR that can hold them
(AE, CS, DA, DT, LO, LT, PN, SH, ST, UC, UR, UT), in sequences, in private tags and in the file meta,
spelled in several ways (cases, orders, ``^`` or spaces, glued, and the common date spellings). The
property checked every time: a run either refuses the file (naming the element, writing nothing)
or writes a file in which none of the spellings can be found. The search here is written
independently of medvl's own scan: plain substring search of the lower-cased bytes for the long
forms, and a token search of every decoded text value for the 2-letter name parts.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicognito")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from medvl.cli.main import app  # noqa: E402
from medvl.clinical.deid import deidentify  # noqa: E402
from medvl.errors import DataError  # noqa: E402

CT = Path(get_testdata_file("CT_small.dcm"))
NAME, PATIENT_ID, BIRTH = "Li^Wu", "PX7731", "19500131"
NAME_SPELLINGS = ("LI WU", "Wu^Li", "wu li", "LIWU", "Wu, Li", "li-wu", "WULI")
DATE_SPELLINGS = ("19500131", "1950-01-31", "31/01/1950", "01/31/1950", "31.01.1950", "January 31, 1950",
                  "31 Jan 1950")
ID_SPELLINGS = ("PX7731", "px7731", "MRN PX7731")
LONG_FORMS = tuple(s.lower().encode() for s in NAME_SPELLINGS[3:4] + NAME_SPELLINGS[6:] + DATE_SPELLINGS
                   + ID_SPELLINGS[:1]) + (b"li wu", b"wu li", b"wu^li", b"li^wu", b"wu, li", b"li-wu", b"elsewhere")
SHORT_PARTS = {"li", "wu"}
# the corpus plants values pydicom warns about on purpose (spaces in a URL, lower case in CS)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")


def base_dataset() -> Dataset:
    """CT_small with the corpus patient's name, ID and birth date."""
    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def leaks(data: bytes) -> list[str]:
    """Spellings of the corpus identifiers found in a file: long forms as words anywhere in the bytes, the
    2-letter name parts as whole words in any decoded text element (a word: letters and digits, so a
    random replacement such as dicognito's accession number ``7WU3`` is one word, not the name part)."""
    lowered = data.lower()
    # a long form counts as a word of its own: a random replacement value may hold its letters by chance
    # (dicognito's study ID WULIYP45ID5H holds "wuli"), while a planted spelling stands apart
    found = [form.decode() for form in LONG_FORMS
             if re.search(rb"(?<![a-z0-9])" + re.escape(form) + rb"(?![a-z0-9])", lowered)]
    ds = pydicom.dcmread(io.BytesIO(data))
    for dataset in (ds.file_meta, ds):
        for element in dataset.iterall():
            if element.VR in ("SQ", "OB", "OW", "UN") or element.value is None:
                continue
            words = set(re.split(r"[^a-z0-9]+", str(element.value).lower()))
            found += [f"{part} in {element.keyword}" for part in SHORT_PARTS & words]
    return found


# ------------------------------------------------------------------ planted identifiers


def sequence_item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def plant_private(ds: Dataset, value: str) -> None:
    block = ds.private_block(0x0009, "MEDVL CORPUS", create=True)
    block.add_new(0x01, "LO", value)
    block.add_new(0x02, "UT", f"{value} {PATIENT_ID} {BIRTH}")


# Removed or replaced by the profile (dicognito, the basic profile, Clean Descriptors, private tags):
# the run writes the file, and none of the spellings may be in it.
HANDLED: dict[str, Callable[[Dataset, str], None]] = {
    "CS BodyPartExamined": lambda ds, v: setattr(ds, "BodyPartExamined", re.sub(r"[^A-Z0-9 _]", " ", v.upper())[:16]),
    "LO StudyDescription": lambda ds, v: setattr(ds, "StudyDescription", f"CT chest {v} follow-up"),
    "LO SeriesDescription": lambda ds, v: setattr(ds, "SeriesDescription", v),
    "LO ProtocolName": lambda ds, v: setattr(ds, "ProtocolName", f"{v} protocol"),
    "LO ManufacturerModelName": lambda ds, v: setattr(ds, "ManufacturerModelName", f"DOB {v}; ST ELSEWHERE HOSP"),
    "LO Manufacturer": lambda ds, v: setattr(ds, "Manufacturer", v),
    "LO ContrastBolusAgent": lambda ds, v: setattr(ds, "ContrastBolusAgent", v),
    "LT ImageComments": lambda ds, v: setattr(ds, "ImageComments", f"patient {v} seen"),
    "LT AdditionalPatientHistory": lambda ds, v: setattr(ds, "AdditionalPatientHistory", v),
    "ST InstitutionAddress": lambda ds, v: setattr(ds, "InstitutionAddress", f"{v} street"),
    "ST DerivationDescription": lambda ds, v: setattr(ds, "DerivationDescription", v),
    "SH StationName": lambda ds, v: setattr(ds, "StationName", v[:16]),
    "PN ReferringPhysicianName": lambda ds, v: setattr(ds, "ReferringPhysicianName", v),
    "PN OtherPatientNames": lambda ds, v: setattr(ds, "OtherPatientNames", v),
    "LO OtherPatientIDs": lambda ds, v: setattr(ds, "OtherPatientIDs", v),
    "SH AccessionNumber": lambda ds, v: setattr(ds, "AccessionNumber", v[:16]),
    "UT in ContentSequence": lambda ds, v: setattr(ds, "ContentSequence", [sequence_item(TextValue=v)]),
    "LO in RequestAttributesSequence": lambda ds, v: setattr(
        ds, "RequestAttributesSequence", [sequence_item(ScheduledProcedureStepDescription=v)]),
    "PN in a sequence": lambda ds, v: setattr(ds, "ReferencedStudySequence", [sequence_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID="1.2.3.4",
        PerformingPhysicianName=v)]),
    "LO and UT in private tags": plant_private,
    # Clean Descriptors: free text beyond the standard's "C" rows, a private scheme's Code Meaning
    "UT TextValue": lambda ds, v: setattr(ds, "TextValue", f"discussed with {v}"),
    "LT CommentsOnTheScheduledProcedureStep": lambda ds, v: setattr(ds, "CommentsOnTheScheduledProcedureStep", v),
    "LO DoseComment": lambda ds, v: setattr(ds, "DoseComment", f"pregnant {v}"),
    "LO CodeMeaning of a private scheme": lambda ds, v: setattr(
        ds, "ProcedureCodeSequence", [sequence_item(CodeValue="CT1", CodingSchemeDesignator="99LOCAL",
                                                    CodeMeaning=f"CT chest {v}")]),
    # Table E.1-1 removes Retrieve AE Title; medvl removes the file meta's Source AE Title (the sending site)
    "AE RetrieveAETitle": lambda ds, v: setattr(ds, "RetrieveAETitle", v[:16]),
    "AE in the file meta": lambda ds, v: setattr(ds.file_meta, "SourceApplicationEntityTitle",
                                                 re.sub(r"[^A-Za-z0-9 ]", " ", v)[:16]),
    # every URL / URI (VR UR) is removed: an address names the site and holds the original UIDs
    "UR RetrieveURL": lambda ds, v: setattr(ds, "RetrieveURL", f"https://pacs.example/{v}"),
}
DATES_HANDLED: dict[str, Callable[[Dataset, str], None]] = {
    "DA PatientBirthDate": lambda ds, v: setattr(ds, "PatientBirthDate", BIRTH),
    "DT AcquisitionDateTime": lambda ds, v: setattr(ds, "AcquisitionDateTime", BIRTH + "120000"),
    "DA in a sequence": lambda ds, v: setattr(ds, "ReferencedStudySequence", [sequence_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID="1.2.3.4",
        StudyDate=BIRTH)]),
    "LO ManufacturerModelName": HANDLED["LO ManufacturerModelName"],
    "LO StudyDescription": HANDLED["LO StudyDescription"],
}
# Kept by the profile (technical elements): an identifier there cannot be cleaned, so the file is
# refused and the message names the element.
KEPT: dict[str, tuple[str, Callable[[Dataset, str], None]]] = {
    "SH ConvolutionKernel": ("ConvolutionKernel", lambda ds, v: setattr(ds, "ConvolutionKernel", v[:16])),
    "CS ImageType": ("ImageType", lambda ds, v: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY",
                                                                         re.sub(r"[^A-Z0-9 ]", " ", v.upper())])),
    "LO SoftwareVersions": ("SoftwareVersions", lambda ds, v: setattr(ds, "SoftwareVersions", f"v2 {v}")),
    "UC in ProcedureCodeSequence": ("ProcedureCodeSequence[0]>LongCodeValue", lambda ds, v: setattr(
        ds, "ProcedureCodeSequence", [sequence_item(LongCodeValue=v, CodingSchemeDesignator="99LOCAL",
                                                    CodeMeaning="CT chest")])),
    "LO CodeMeaning of a standard scheme": ("ProcedureCodeSequence[0]>CodeMeaning", lambda ds, v: setattr(
        ds, "ProcedureCodeSequence", [sequence_item(CodeValue="CT1", CodingSchemeDesignator="SCT",
                                                    CodeMeaning=f"CT chest {v}")])),
    "SH in the file meta": ("file meta>ImplementationVersionName", lambda ds, v: setattr(
        ds.file_meta, "ImplementationVersionName", v[:16])),
}


def run_api(ds: Dataset, tmp_path: Path, **options) -> tuple[Path, Exception | None]:
    source = write(ds, tmp_path / "in" / "planted.dcm")
    out = tmp_path / "out.dcm"
    try:
        deidentify(source, out, seed=11, **options)
    except DataError as error:
        return out, error
    return out, None


@pytest.mark.parametrize("spelling", NAME_SPELLINGS + ID_SPELLINGS)
@pytest.mark.parametrize("where", sorted(HANDLED))
def test_handled_elements_leave_no_identifier(where, spelling, tmp_path):
    ds = base_dataset()
    HANDLED[where](ds, spelling)
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    assert leaks(out.read_bytes()) == []


@pytest.mark.parametrize("spelling", DATE_SPELLINGS)
@pytest.mark.parametrize("where", sorted(DATES_HANDLED))
def test_dates_leave_in_no_spelling(where, spelling, tmp_path):
    ds = base_dataset()
    DATES_HANDLED[where](ds, spelling)
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    assert leaks(out.read_bytes()) == []


@pytest.mark.parametrize("spelling", NAME_SPELLINGS + ID_SPELLINGS + DATE_SPELLINGS)
@pytest.mark.parametrize("where", sorted(KEPT))
def test_identifier_in_a_kept_element_is_refused_and_named(where, spelling, tmp_path):
    element, plant = KEPT[where]
    ds = base_dataset()
    plant(ds, spelling)
    out, error = run_api(ds, tmp_path)
    assert error is not None and not out.exists(), f"written: {leaks(out.read_bytes())}"
    message = str(error)
    assert f"in {element};" in message and "nothing was written" in message
    assert not any(form.decode() in message.lower() for form in LONG_FORMS)  # the value is never quoted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_everything_planted_at_once_through_the_cli(tmp_path):
    """Every handled element of every VR in one file, de-identified by ``medvl deid``."""
    ds = base_dataset()
    for index, plant in enumerate(HANDLED.values()):
        plant(ds, NAME_SPELLINGS[index % len(NAME_SPELLINGS)])
    ds.ManufacturerModelName = "DOB 1950-01-31; ST ELSEWHERE HOSP"
    source = write(ds, tmp_path / "in" / "planted.dcm")
    assert leaks(source.read_bytes())  # the corpus does hold the identifiers
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm"), "--report",
                                      str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert leaks((tmp_path / "out.dcm").read_bytes()) == []
    report = (tmp_path / "report.json").read_text()
    assert {"BodyPartExamined", "ManufacturerModelName", "StudyDescription"} <= set(re.findall(r'"(\w+)"', report))
    assert not any(form.decode() in report.lower() for form in LONG_FORMS)


@pytest.mark.parametrize("keyword, value", [("StudyDate", "20199999"), ("StudyTime", "ZZ"), ("StudyTime", "240000"),
                                            ("AcquisitionDateTime", "notadatetime"), ("PatientBirthDate", "1950-13")])
def test_a_date_that_cannot_be_shifted_is_emptied_not_a_traceback(keyword, value, tmp_path):
    """dicognito raised on a malformed date or time halfway through the file: `medvl deid` ended in a traceback
    (exit 1) and the service answered 500 for every route. Such a value (and a date's paired time) is emptied."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    setattr(ds, keyword, value)
    source = tmp_path / "in.dcm"
    ds.save_as(source)
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm")])
    assert result.exit_code == 0, result.output
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert str(out.get(keyword, "")) == ""
    assert all(str(element.value) != value for element in out.iterall())  # nowhere else either
    if len(value) >= 6:  # a short value such as "ZZ" can occur by chance inside the dummy names and UIDs
        assert value.encode() not in (tmp_path / "out.dcm").read_bytes()
    if keyword.startswith("Study"):  # the study's date and time go together
        assert str(out.get("StudyDate", "")) == str(out.get("StudyTime", "")) == ""
    assert str(out.get("SeriesDate", "")) not in ("", ds.SeriesDate)  # a valid date is still shifted


def test_issue_examples_keep_descriptors_refuses_and_names_the_element(tmp_path):
    """The issue's cases: a name in Body Part Examined, a birth date and hospital in Manufacturer's
    Model Name. Cleaned by default; with --keep-descriptors the final scan refuses the file."""
    ds = base_dataset()
    ds.BodyPartExamined = "LI WU"
    source = write(ds, tmp_path / "in" / "body.dcm")
    runner = CliRunner()
    result = runner.invoke(app, ["deid", str(source), str(tmp_path / "a.dcm")])
    assert result.exit_code == 0, result.output
    written = pydicom.dcmread(tmp_path / "a.dcm")
    assert written.BodyPartExamined == "" and leaks((tmp_path / "a.dcm").read_bytes()) == []
    result = runner.invoke(app, ["deid", str(source), str(tmp_path / "b.dcm"), "--keep-descriptors"])
    assert result.exit_code == 2 and "BodyPartExamined" in result.output and "name" in result.output
    assert not (tmp_path / "b.dcm").exists() and "LI WU" not in result.output
    ds = base_dataset()
    ds.ManufacturerModelName = "DOB 1950-01-31; ST ELSEWHERE HOSP"
    source = write(ds, tmp_path / "in" / "model.dcm")
    result = runner.invoke(app, ["deid", str(source), str(tmp_path / "c.dcm"), "--keep-descriptors"])
    assert result.exit_code == 2 and "ManufacturerModelName" in result.output and "date" in result.output
    assert not (tmp_path / "c.dcm").exists()


def test_plain_descriptors_are_kept(tmp_path):
    ds = base_dataset()
    ds.StudyDescription, ds.SeriesDescription, ds.BodyPartExamined = "CT CHEST W/O CONTRAST", "AX 2.5 MM", "CHEST"
    ds.ManufacturerModelName, ds.ContrastBolusAgent = "LightSpeed VCT", "ISOVUE300/100"
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    written = pydicom.dcmread(out)
    assert (written.StudyDescription, written.SeriesDescription, written.BodyPartExamined) == (
        "CT CHEST W/O CONTRAST", "AX 2.5 MM", "CHEST")
    assert written.ManufacturerModelName == "LightSpeed VCT" and written.ContrastBolusAgent == "ISOVUE300/100"
    assert "113105" in {item.CodeValue for item in written.DeidentificationMethodCodeSequence}


# ------------------------------------------------------------- Clean Descriptors: free text

# What the free-text rule catches with pydicom 3.0's dictionary (retired attributes left out here).
# Emptied: every attribute of VR LT / ST / UT / UC outside Table E.1-1 and the coded keep-list.
EMPTIED_FREE_TEXT = """
AcquisitionContextDescription ActualEnvironmentalConditions AlgorithmParameters ApprovalStatusFurtherDescription
AssertionComments AssessmentSummaryDescription BatteryLevel BeamHardeningCorrectionTechnique
CalculatedDoseReferenceDescription CalculationComment CalibrationNotes CalibrationProcedure
CommentsOnPatientPerformanceOfVisualField CommentsOnTheScheduledProcedureStep ComponentManufacturer
ComponentManufacturingProcedure ConfigurationInformation ConfigurationInformationDescription
ConstraintViolationCondition CoordinateSystemAxisDescription CouplingMedium CouplingTechnique DelayLawIdentifier
DetectorDescription DetectorMode DocumentTitle EnvironmentalConditions ExposureControlModeDescription
ExtendedCodeMeaning FiducialDescription GeneralAccessoryDescription GeneticModificationsDescription
GraphicGroupDescription GridAbsorbingMaterial GridSpacingMaterial HL7InstanceIdentifier HPGLPenDescription
ImageFilterDescription ImplantTemplateGroupDescription IndicationDescription InformationSummary
InstructionDescription InstructionPerformanceComment IntendedStartDayOfWeek InterventionDescription
InventoryInstanceDescription InventoryPurpose LinearityCorrectionTechnique LocalNamespaceEntityID
MaskOperationExplanation MaterialGrade MaterialNotes MaterialPropertiesDescription MeasuredDoseDescription
MediaDisposition MetaboliteMapDescription OOITypeDescriptor ObservationDescription OpticalPathDescription
OverrideReason PTOLocationDescription PartialViewDescription PositionAcquisitionTemplateID
PotentialDiagnosticTasks PotentialReasonsForProcedure PreAmplifierNotes PrivateDataElementDescription
PrivateDataElementEncoding ProbeDriveNotes ProcedureStepProgressDescription ProductDescription
ProductPackageIdentifier ProtocolDesignRationale ProtocolElementCharacteristicsSummary ProtocolElementPurpose
ProtocolPlanningInformation PulserNotes RTImageDescription ReasonForCancellation ReceiverNotes
ReferenceLocationDescription RepairID SOPAuthorizationComment ScanProcedure SegmentDescription SelectorUCValue
SensorName SetupDeviceDescription SetupImageComment SetupReferenceDescription SpecificationSelectionGuidance
SpectralSensitivity StrainAdditionalInformation StrainDescription SurfaceComments TextValue
ThreatCategoryDescription TrackSetDescription TrackingID TransactionStatusComment TransformDescription
TreatmentStatusComment TreatmentTerminationDescription TreatmentToleranceViolationIdentification
UnformattedTextValue UniversalEntityID
""".split()
# Kept when plain, blanked otherwise: LO / SH attributes named ...Comment(s), Note(s), Description, Label,
# Title, Explanation, Text or Reason.
SHORT_FREE_TEXT = """
ASLCrusherDescription ASLTechniqueDescription AlgorithmDescription ApplicableSafetyStandardDescription
ApplicatorDescription AssessmentLabel ChannelDerivationDescription ChannelLabel CompletionFlagDescription
ConfigurationDescription ContainerComponentDescription ContentDescription DataElementDescription
DataSetDescription DimensionDescriptionLabel DisplaySetLabel DisplaySetPresentationGroupDescription
DisplaySubsystemDescription DoseComment EffectiveDoseCalculationMethodDescription
FieldOfViewDescription FilmSessionLabel FixationDeviceLabel FrameLabel FrameOfInterestDescription
FrameOfReferenceTransformationComment GraphicGroupLabel GraphicLayerDescription HPGLDocumentLabel HPGLPenLabel
HangingProtocolDescription HistogramExplanation ImageSetLabel IndicationLabel InstructionText LUTExplanation
LUTLabel LateralSpreadingDeviceDescription LensDescription LensStatusDescription LuminanceResponseDescription
MatingFeatureSetLabel MultiplexGroupLabel OphthalmicAxialLengthDataSourceDescription
OphthalmicImageTypeDescription PaddleDescription PatientBreedDescription PatientSetupLabel
PatientSpeciesDescription PerformedProcedureTypeDescription PixelSpacingCalibrationDescription
PixelValueMappingExplanation PlanningLandmarkDescription ProcedureStepLabel PropertyLabel
RGBATransferFunctionDescription RTImageLabel RangeModulatorDescription RangeShifterDescription
ReasonForChannelOmissionDescription ReconstructionDescription ReferenceLocationLabel ResourceDescription
SegmentLabel SegmentationCreationTemplateLabel SetupDeviceLabel ShieldingDeviceLabel SourceDescription
SubstanceAdministrationNotes SurfaceModelLabel SurfaceProcessingDescription SystemStatusComment TargetLabel
TestResultComment TextureLabel TickLabel ToleranceTableLabel TrackSetLabel VitreousStatusDescription
WedgeDescription WindowCenterWidthExplanation WorklistLabel
""".split()


def test_free_text_rule_catches_the_listed_attributes_and_nothing_coded():
    from pydicom.datadict import dictionary_VR, keyword_dict

    from medvl.clinical.descriptors import (
        CODED_TEXT,
        FREE_TEXT_VRS,
        FREE_TEXT_WORDS,
        PROSE_DESCRIPTORS,
        SHORT_DESCRIPTORS,
        free_text_rule,
    )
    from medvl.clinical.profile import profile_table

    emptied, short = free_text_rule()
    assert set(EMPTIED_FREE_TEXT) <= emptied and set(SHORT_FREE_TEXT) <= short
    assert all(dictionary_VR(keyword_dict[k]) in FREE_TEXT_VRS for k in emptied)
    assert all(dictionary_VR(keyword_dict[k]) in ("LO", "SH") and k.endswith(FREE_TEXT_WORDS) for k in short)
    table = {row.keyword for row in profile_table().values()}
    assert not (emptied | short) & (CODED_TEXT | table | SHORT_DESCRIPTORS | PROSE_DESCRIPTORS)
    assert {"CodeMeaning", "CodeValue", "LongCodeValue", "SeriesDescription"}.isdisjoint(emptied | short)


def notes_dataset() -> Dataset:
    """The probe's file: free text in four attributes Table E.1-1 does not list."""
    ds = base_dataset()
    ds.PatientName, ds.PatientID = "DOE^JANE", "X1"
    ds.TextValue = "Husband Krumplehorn phoned, home 555-0199"
    ds.CommentsOnTheScheduledProcedureStep = "Transport from 12 Elm St, Dr Krumplehorn aware"
    ds.DoseComment = "pregnant - discussed with Krumplehorn"
    ds.UnformattedTextValue = "free text note"
    return ds


def test_free_text_comments_and_notes_are_removed(tmp_path):
    """docs/security.md says Clean Descriptors removes free-text comments and notes; only the "C" rows of
    Table E.1-1 were, and TextValue, Comments on the Scheduled Procedure Step, Dose Comment and Unformatted
    Text Value came out unchanged (exit 0). They are emptied; --keep-descriptors keeps them."""
    source = write(notes_dataset(), tmp_path / "in" / "notes.dcm")
    runner = CliRunner()
    result = runner.invoke(app, ["deid", str(source), str(tmp_path / "out.dcm")])
    assert result.exit_code == 0, result.output
    written = pydicom.dcmread(tmp_path / "out.dcm")
    keywords = ("TextValue", "CommentsOnTheScheduledProcedureStep", "DoseComment", "UnformattedTextValue")
    assert {k: written.get(k) for k in keywords} == dict.fromkeys(keywords, "")
    data = (tmp_path / "out.dcm").read_bytes().lower()
    assert b"krumplehorn" not in data and b"555-0199" not in data and b"elm st" not in data
    result = runner.invoke(app, ["deid", str(source), str(tmp_path / "kept.dcm"), "--keep-descriptors"])
    assert result.exit_code == 0, result.output
    assert pydicom.dcmread(tmp_path / "kept.dcm").DoseComment == "pregnant - discussed with Krumplehorn"


def test_plain_free_text_and_standard_code_meanings_are_kept(tmp_path):
    ds = base_dataset()
    ds.ContentDescription, ds.SegmentLabel = "CHEST", "Liver"
    ds.ProcedureCodeSequence = [
        sequence_item(CodeValue="77477000", CodingSchemeDesignator="SCT", CodeMeaning="CT of Krumplehorn scan"),
        sequence_item(CodeValue="CT1", CodingSchemeDesignator="99LOCAL", CodeMeaning="CT CHEST"),
        sequence_item(CodeValue="CT2", CodingSchemeDesignator="99LOCAL", CodeMeaning="Dr Krumplehorn's CT"),
        sequence_item(CodeValue="CT3", CodingSchemeDesignator="LOCALRIS", CodeMeaning="Krumplehorn CT")]
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    written = pydicom.dcmread(out)
    assert (written.ContentDescription, written.SegmentLabel) == ("CHEST", "Liver")
    meanings = [item.CodeMeaning for item in written.ProcedureCodeSequence]
    assert meanings == ["CT of Krumplehorn scan", "CT CHEST", "", ""]  # SNOMED CT's text kept, private cleaned
    assert [item.CodeValue for item in written.ProcedureCodeSequence] == ["77477000", "CT1", "CT2", "CT3"]


def test_every_free_text_attribute_is_emptied_and_the_image_still_reads(tmp_path):
    """Every attribute the rule catches, planted at the top level and in a sequence item: none survives,
    each stays present (emptied), and the de-identified image reads as the original does."""
    from pydicom.datadict import dictionary_VR, keyword_dict

    from medvl.clinical.readers import read_dicom_values

    ds = base_dataset()
    item = sequence_item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID="1.2.3.4")
    for index, keyword in enumerate(EMPTIED_FREE_TEXT + SHORT_FREE_TEXT):
        for dataset in (ds, item):
            dataset.add_new(keyword_dict[keyword], dictionary_VR(keyword_dict[keyword]), f"MKR{index:04d} Krump")
    ds.SourceImageSequence = [item]
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    assert re.findall(rb"MKR\d{4}", out.read_bytes()) == []
    written = pydicom.dcmread(out)
    for dataset in (written, written.SourceImageSequence[0]):
        assert all(dataset[keyword].value == "" for keyword in EMPTIED_FREE_TEXT + SHORT_FREE_TEXT)
    assert (read_dicom_values(out) == read_dicom_values(CT)).all()


def test_dummy_name_sharing_a_part_with_the_patient_is_trimmed(tmp_path):
    """dicognito draws dummy names from common-name lists; a dummy part equal to a real name part
    is dropped (rather than refusing the file, or keeping the part)."""
    from dicognito.anonymizer import Anonymizer

    probe = base_dataset()
    probe.ReferringPhysicianName = "Okonkwo^Adaeze"  # Z in the profile: dicognito's dummy is kept
    Anonymizer(seed="11").anonymize(probe)
    dummy_family = str(probe.ReferringPhysicianName).split("^")[0]
    ds = base_dataset()
    ds.PatientName, ds.ReferringPhysicianName = f"{dummy_family.title()}^Qzyx", "Okonkwo^Adaeze"
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    written = pydicom.dcmread(out)
    assert written.ReferringPhysicianName and dummy_family not in str(written.ReferringPhysicianName).split("^")
    assert dummy_family.lower().encode() not in out.read_bytes().lower()


# ------------------------------------------------------------------------ burned-in text


def test_burned_in_annotation_is_flagged_and_refused_on_request(tmp_path):
    ds = base_dataset()
    ds.BurnedInAnnotation = "YES"
    source = write(ds, tmp_path / "in" / "burned.dcm")
    report = deidentify(source, tmp_path / "flagged.dcm")
    assert report["totals"]["files_with_burned_in_risk"] == 1
    assert "Burned In Annotation is YES" in report["files"][0]["burned_in_risk"]
    assert pydicom.dcmread(tmp_path / "flagged.dcm").PatientIdentityRemoved == "NO"
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "refused.dcm"), "--refuse-burned-in"])
    assert result.exit_code == 2 and "burned" in result.output.lower(), result.output
    assert not (tmp_path / "refused.dcm").exists()


def test_ultrasound_and_secondary_capture_are_flagged_and_skipped_in_a_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("US1_UNCR.dcm", "SC_rgb.dcm", "CT_small.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    report = deidentify(folder, tmp_path / "flagged")
    risks = sorted(entry["burned_in_risk"] or "" for entry in report["files"])
    assert report["files_written"] == 3 and risks[0] == "" and "ultrasound" in risks[2] and "screen" in risks[1]
    result = CliRunner().invoke(app, ["deid", str(folder), str(tmp_path / "safe"), "--refuse-burned-in"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 file(s): possible burned-in text" in result.output
    assert len(list((tmp_path / "safe").rglob("*.dcm"))) == 1


def encapsulated_pdf(path: Path) -> Path:
    """An Encapsulated PDF (modality DOC): no pixel data, the document in Encapsulated Document."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "DOC"
    ds.PatientName, ds.PatientID = NAME, PATIENT_ID
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n% a report\n%%EOF\n"
    return write(ds, path)


def test_an_encapsulated_document_is_flagged_for_its_content_not_pixels(tmp_path):
    """The warning called a PDF's content "pixels"; a document has none (its content is replaced)."""
    source = encapsulated_pdf(tmp_path / "in" / "doc.dcm")
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm"), "--report",
                                      str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    [entry] = json.loads((tmp_path / "report.json").read_text())["files"]
    assert "document" in entry["burned_in_risk"] and len(entry["warnings"]) == 1
    assert "document's content" in entry["warnings"][0] and "pixels" not in entry["warnings"][0]
    assert "encapsulated document" in " ".join(result.output.split())
    assert pydicom.dcmread(tmp_path / "out.dcm").EncapsulatedDocument == b"\x00\x00"
    write(base_dataset(), source.parent / "ct.dcm")
    result = CliRunner().invoke(app, ["deid", str(source.parent), str(tmp_path / "safe"), "--refuse-burned-in"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 file(s): possible identifying text in an encapsulated document" in " ".join(result.output.split())


# ---------------------------------------------------------------------- hostile inputs


def ct_bytes() -> bytes:
    return CT.read_bytes()


HOSTILE: dict[str, Callable[[], bytes]] = {
    "zero bytes": lambda: b"",
    **{f"CT_small cut at {cut}": (lambda cut=cut: ct_bytes()[:cut]) for cut in (0, 128, 132, 500, 1000, 3000,
                                                                                   20000, 39205)},
    "rtplan_truncated.dcm": lambda: Path(get_testdata_file("rtplan_truncated.dcm")).read_bytes(),
    "wrong magic (PNG)": lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 300,
    "DICM marker then junk": lambda: b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4,
    "junk text": lambda: b"MRN PX7731 Li^Wu born 1950-01-31\n" * 20,
    "gzip": lambda: b"\x1f\x8b\x08\x00" + b"\x00" * 200,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_exits_2_and_writes_nothing(case, tmp_path):
    source = tmp_path / "in" / "input.dcm"
    source.parent.mkdir()
    source.write_bytes(HOSTILE[case]())
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("untouched")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm"), "--report", str(report)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert str(source) in result.output.replace("\n", "")
    assert "PX7731" not in result.output and "Li^Wu" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "keep.txt"]
    assert sentinel.read_text() == "untouched"


@pytest.mark.parametrize("cut", (500, 3000))
def test_header_truncation_is_an_error_through_the_api(cut, tmp_path):
    source = tmp_path / "cut.dcm"
    source.write_bytes(ct_bytes()[:cut])
    with pytest.raises(DataError, match="truncated|incomplete") as error:
        deidentify(source, tmp_path / "out.dcm")
    assert str(source) in str(error.value) and not (tmp_path / "out.dcm").exists()
    with pytest.raises(DataError, match="truncated") as error:
        deidentify(get_testdata_file("rtplan_truncated.dcm"), tmp_path / "plan.dcm")
    assert "rtplan_truncated.dcm" in str(error.value) and not (tmp_path / "plan.dcm").exists()


def ct_with_transfer_syntax(uid: str) -> bytes:
    """CT_small (explicit VR little endian, native pixels) with its file meta's Transfer Syntax UID
    patched to ``uid`` (20 characters, the length of the one it replaces)."""
    data, written = ct_bytes(), b"1.2.840.10008.1.2.1\x00"
    assert data.count(written) == 1 and len(uid) == len(written)
    return data.replace(written, uid.encode())


@pytest.mark.parametrize(("uid", "reason"), [
    ("1.2.3.4.5.6.7.8.9.10", "unsupported transfer syntax 1.2.3.4.5.6.7.8.9.10: not a DICOM transfer syntax"),
    ("1.2.840.10008.1.2.5\x00", "pixel data not encapsulated as its transfer syntax RLE Lossless"),
])
def test_an_unwritable_transfer_syntax_is_a_one_line_error_for_a_file_and_a_folder(uid, reason, tmp_path):
    """A private / unknown transfer syntax crashed ``medvl deid`` with a traceback (exit 1) when the
    header was encoded for the final scan, and native pixels under a compressed syntax were reported
    as a failure to write. Both are refused before any change, naming the file and the syntax: exit
    2, nothing written, for a file and in a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "odd.dcm").write_bytes(ct_with_transfer_syntax(uid))
    runner = CliRunner()
    for source, out in ((folder / "odd.dcm", tmp_path / "out.dcm"), (folder, tmp_path / "out")):
        result = runner.invoke(app, ["deid", str(source), str(out)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert f"odd.dcm: {reason}" in " ".join(result.output.split()), result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_folder_skips_non_dicom_but_refuses_a_broken_dcm_file(tmp_path):
    """Files that are not DICOM are skipped and counted; a ``.dcm`` file that is empty or truncated
    claims to be DICOM, so the whole run stops, naming it, and writes nothing."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(ct_bytes())
    (folder / "notes.txt").write_bytes(HOSTILE["junk text"]())
    (folder / "empty").write_bytes(b"")
    runner = CliRunner()
    result = runner.invoke(app, ["deid", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 0 and "skipped 2 file(s): not DICOM" in result.output, result.output
    for name, data in (("empty.dcm", b""), ("cut.dcm", ct_bytes()[:3000])):
        (folder / name).write_bytes(data)
        result = runner.invoke(app, ["deid", str(folder), str(tmp_path / "out2")])
        assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no output, no staging folder
        (folder / name).unlink()


def test_report_file_is_not_overwritten_without_overwrite(tmp_path):
    report = tmp_path / "report.json"
    report.write_text("earlier report")
    runner = CliRunner()
    result = runner.invoke(app, ["deid", str(CT), str(tmp_path / "a.dcm"), "--report", str(report)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert report.read_text() == "earlier report" and not (tmp_path / "a.dcm").exists()  # refused before any work
    result = runner.invoke(app, ["deid", str(CT), str(tmp_path / "a.dcm"), "--report", str(report), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert '"files_written": 1' in report.read_text()


# ------------------------------------------------------------------ the scan's matching rules


def test_every_date_spelling_is_found_and_numbers_inside_numbers_are_not():
    from medvl.clinical.identifiers import collect_identifiers

    found = collect_identifiers(base_dataset())
    for spelling in DATE_SPELLINGS + ("DOB19500131", "1/31/1950", "31-JAN-1950", "January 31st, 1950"):
        assert found.kind_in(f"seen {spelling}.") == "date", spelling
    for spelling in NAME_SPELLINGS + ("Dr-Li",):
        assert found.kind_in(spelling) == "name", spelling
    assert found.kind_in("mrn PX7731") == "ID"
    for harmless in ("CLINIC", "SLICE WUHAN", "2.25.1195001310", "219500131", "1950-01-311"):
        assert found.kind_in(harmless) is None, harmless


def test_urls_holding_the_original_uids_are_removed(tmp_path):
    """A DICOMweb / WADO instance's Retrieve URL and Retrieve URI were written as they were: the original
    study, series and instance UIDs, the site's host name and (in the UIDs' timestamps) the real study date
    next to the shifted one. Every URL / URI (VR UR) goes, at any depth and in the file meta, and the
    report lists them."""
    ds = pydicom.dcmread(CT)
    ds.remove_private_tags()
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    ds.RetrieveURL = f"https://pacs.stgertrud.example/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    ds.add_new(0x0040E010, "UR", f"https://pacs.stgertrud.example/wado?requestType=WADO&studyUID={study}")
    ds.ReferencedSeriesSequence = [sequence_item(
        SeriesInstanceUID=series, RetrieveURL=f"https://pacs.stgertrud.example/dicom-web/studies/{study}")]
    ds.file_meta.SourcePresentationAddress = "https://pacs.stgertrud.example/dicom-web"
    source = write(ds, tmp_path / "in" / "url.dcm")
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm"), "--report",
                                      str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    data = (tmp_path / "out.dcm").read_bytes()
    for original in (study.encode(), series.encode(), sop.encode(), b"stgertrud", b"20040119"):
        assert original not in data, original
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert [e.keyword for d in (out.file_meta, out) for e in d.iterall() if e.VR == "UR"] == []
    removed = json.loads((tmp_path / "report.json").read_text())["totals"]["removed"]
    assert {"RetrieveURL", "RetrieveURI", "ReferencedSeriesSequence>RetrieveURL",
            "file_meta:SourcePresentationAddress"} <= set(removed), removed


@pytest.mark.parametrize("planted", ["{study}", "/studies/{study}/x"])
def test_an_original_uid_in_a_kept_element_is_refused(planted, tmp_path):
    """The final scan searched names, IDs and dates but not UIDs: an original study UID in any element the
    profile keeps was written, linking the output back to the source study. Every UID de-identification
    replaces is searched."""
    ds = pydicom.dcmread(CT)
    ds.remove_private_tags()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.19990305101010.7"
    ds.SoftwareVersions = planted.format(study=ds.StudyInstanceUID)
    out, error = run_api(ds, tmp_path)
    assert error is not None and not out.exists()
    assert "an original UID" in str(error) and "survived de-identification in SoftwareVersions" in str(error)
    assert ds.StudyInstanceUID not in str(error)


@pytest.mark.parametrize(("root", "software"), [("1.2.392.200036.9125.0.19950720", "LX 2.1"),
                                                ("1.2.392.200036.9125.0.19950720112207", "LX 2.1"),
                                                ("1.2.392.200036.9125.20100101", "LX 01.01.2010")])
def test_a_date_like_component_of_a_devices_uid_root_is_not_the_patients_date(root, software, tmp_path):
    """A device that builds its UIDs under an implementation root holding a date-like component (kept in the
    Implementation Class UID, as class UIDs are) had every file refused ("the patient's date survived ... in
    ImplementationClassUID") once the dates of UID components were searched as the patient's; they are not."""
    ds = pydicom.dcmread(CT)
    ds.remove_private_tags()
    ds.file_meta.ImplementationClassUID = root
    ds.SeriesInstanceUID = root + ".3.1"
    ds.SoftwareVersions = software
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    written = pydicom.dcmread(out)
    assert written.file_meta.ImplementationClassUID == root and written.SeriesInstanceUID != ds.SeriesInstanceUID


def test_a_uid_the_input_also_holds_as_a_class_uid_is_not_a_leak(tmp_path):
    """A creator UID that equals the file's Implementation Class UID (kept, as class UIDs are) is no leak;
    UIDs inside a longer UID are not matched either."""
    ds = pydicom.dcmread(CT)
    ds.remove_private_tags()
    ds.InstanceCreatorUID = ds.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.4242"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4242.1"
    ds.SoftwareVersions = "1.2.826.0.1.3680043.8.498.4242.15"  # a longer UID, not the instance's
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    assert pydicom.dcmread(out).file_meta.ImplementationClassUID == "1.2.826.0.1.3680043.8.498.4242"


@pytest.mark.parametrize("planted", [BIRTH + "123000", BIRTH + "1230", BIRTH + "12", f"v {BIRTH}123000.5+0200"])
def test_a_date_followed_by_time_digits_is_refused(planted, tmp_path):
    """A DICOM date-time (the date glued to its time digits, as DT values and UID timestamps write it) in a
    kept element passed the final scan: the real date was written next to the shifted one. It is refused as
    the date alone is; a longer number that only holds the digits is not a date-time and stays accepted."""
    ds = base_dataset()
    ds.SoftwareVersions = planted
    out, error = run_api(ds, tmp_path)
    assert error is not None and "date survived de-identification in SoftwareVersions" in str(error)
    assert not out.exists() and planted not in str(error)
    found = collect_identifiers_of(base_dataset())
    for harmless in (BIRTH + "99", BIRTH + "1", BIRTH + "1230001", BIRTH + "2460", "2.25.1" + BIRTH + "1230"):
        assert found.kind_in(harmless) is None, harmless


def collect_identifiers_of(ds: Dataset):
    from medvl.clinical.identifiers import collect_identifiers

    return collect_identifiers(ds)


def test_short_name_parts_inside_generated_ids_are_not_leaks():
    """A de-identified Study ID is random letters and digits: a 2-letter name part between digits there
    (7WU3) is chance, not the name; longer parts still count next to digits, and glued parts anywhere."""
    from medvl.clinical.identifiers import collect_identifiers

    ds = base_dataset()
    ds.PatientName = "WU^LI^^^"
    found = collect_identifiers(ds)
    for generated in ("7WU3", "A1LI", "LI9", "20WU"):
        assert found.kind_in(generated) is None, generated
    for leak in ("LI WU", "WU-7", "LIWU3", "x WULI"):
        assert found.kind_in(leak) == "name", leak
    ds.PatientName = "SMITH^JOHN"
    assert collect_identifiers(ds).kind_in("SMITH1950") == "name"


def identifiers_for(name: str, patient_id: str):
    from medvl.clinical.identifiers import collect_identifiers

    ds = base_dataset()
    ds.PatientName, ds.PatientID = name, patient_id
    return collect_identifiers(ds)


@pytest.mark.parametrize(("name", "patient_id", "text", "kind"), [
    ("O'BRIEN^MAEVE", "MRN99887766", "Pt OBRIEN M", "name"),  # the apostrophe dropped
    ("D'ANGELO^LUCA", "X1", "DANGELO", "name"),
    ("O\u2019BRIEN^MAEVE", "X1", "obrien", "name"),  # a typographic apostrophe
    ("O'BRIEN^MAEVE", "X1", "MAEVEOBRIEN", "name"),
    ("VAN DER BERG^PIETER", "X1", "VANDERBERG P", "name"),  # particles glued
    ("VAN DER BERG^PIETER", "X1", "PIETERVANDERBERG", "name"),
    ("DE LA CRUZ^ANA", "X1", "DELACRUZ", "name"),
    ("DOE^JANE", "MRN99887766", "MRN 99887766", "ID"),  # separators in the ID
    ("DOE^JANE", "MRN99887766", "mrn-99887766", "ID"),
    ("DOE^JANE", "MRN99887766", "ID 99887766", "ID"),  # the digit run alone
    ("DOE^JANE", "MRN99887766", "99-887-766", "ID"),
    ("DOE^JANE", "A-77123", "ID A77123", "ID"),
    ("DOE^JANE", "A-77123", "A 77123", "ID"),
    ("DOE^JANE", "99887766", "99-887-766", "ID"),
    ("DOE^JANE", "99887766", "99 887 766", "ID"),
    ("DOE^JANE", "99887766", "99/887/766", "ID"),
])
def test_names_and_ids_are_found_in_common_spellings(name, patient_id, text, kind):
    assert identifiers_for(name, patient_id).kind_in(text) == kind


@pytest.mark.parametrize(("name", "patient_id", "text"), [
    ("O'BRIEN^MAEVE", "X1", "OBRIENSKY"),  # glued forms are whole words too
    ("J P^SMITH", "X1", "JP"),  # initials glued are too short to search
    ("J P^SMITH", "X1", "JPEG 2000"),
    ("DOE^JANE", "X1", "2 x 1 mm"),  # short IDs are searched as written only
    ("DOE^JANE", "A-77123", "ID 77123"),  # a digit run shorter than 6 is not searched alone
    ("DOE^JANE", "100085", "version 10.0.0.85"),  # a dot between digits is no separator
    ("DOE^JANE", "100085", "1.2.840.10008.5.1.4.1.1.2"),
    ("DOE^JANE", "99887766", "1998877660"),  # nor inside a longer number
])
def test_glued_and_separated_spellings_do_not_match_inside_other_words(name, patient_id, text):
    assert identifiers_for(name, patient_id).kind_in(text) is None


@pytest.mark.parametrize(("name", "patient_id", "planted"), [
    ("O'BRIEN^MAEVE", "MRN99887766", "Pt OBRIEN M"),
    ("O'BRIEN^MAEVE", "MRN99887766", "MRN 99887766"),
    ("VAN DER BERG^PIETER", "A-77123", "VANDERBERG P"),
    ("VAN DER BERG^PIETER", "A-77123", "ID A77123"),
    ("DE LA CRUZ^ANA", "99887766", "DELACRUZ"),
    ("DE LA CRUZ^ANA", "99887766", "99-887-766"),
])
@pytest.mark.parametrize("where", ["SoftwareVersions", "TextValue"])
def test_probe_spellings_in_a_kept_element_are_refused(name, patient_id, planted, where, tmp_path):
    """The probe's cases: an apostrophe dropped, particles glued, an ID with or without separators
    in an element the profile keeps (TextValue with --keep-descriptors) passed the final scan with
    exit 0. They are refused: exit 2, the element named, nothing written."""
    ds = base_dataset()
    ds.PatientName, ds.PatientID = name, patient_id
    setattr(ds, where, planted)
    source = write(ds, tmp_path / "in" / "planted.dcm")
    options = ["--keep-descriptors"] if where == "TextValue" else []
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm"), *options])
    assert result.exit_code == 2, result.output
    assert f"survived de-identification in {where}" in result.output.replace("\n", " ")
    assert planted not in result.output and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def nested_patient_dataset(**kept) -> Dataset:
    """The probe's file: a referenced image's patient (name and ID) only inside a Source Image
    Sequence item, the top-level patient someone else."""
    ds = base_dataset()
    ds.PatientName = "ZEBRAQUARTZ^XYLOPHEMA"
    ds.SourceImageSequence = [sequence_item(
        ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", ReferencedSOPInstanceUID="1.2.3.4.5",
        PatientName="NESTEDKRUMP^WILMA", PatientID="NESTEDID4455")]
    for keyword, value in kept.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("kept", "options", "element", "kind"), [
    ({"SoftwareVersions": "Scan of NESTEDKRUMP WILMA"}, [], "SoftwareVersions", "name"),
    ({"SoftwareVersions": "v2 NESTEDID4455"}, [], "SoftwareVersions", "ID"),
    ({"ProcedureCodeSequence": [sequence_item(CodeValue="123", CodingSchemeDesignator="99LOCAL",
                                              CodeMeaning="Scan of NESTEDKRUMP WILMA")]},
     ["--keep-descriptors"], "ProcedureCodeSequence[0]>CodeMeaning", "name"),
])
def test_names_and_ids_in_sequence_items_are_searched(kept, options, element, kind, tmp_path):
    """A Patient's Name / Patient ID found only in a sequence item was replaced by dicognito, but the
    scan did not know it, so a copy in a kept element passed with exit 0. It is refused."""
    source = write(nested_patient_dataset(**kept), tmp_path / "in" / "nested.dcm")
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm"), *options])
    assert result.exit_code == 2, result.output
    assert f"patient's {kind} survived de-identification in {element};" in result.output.replace("\n", " ")
    assert "NESTED" not in result.output and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_patient_only_in_a_sequence_item_is_replaced_and_the_file_written(tmp_path):
    source = write(nested_patient_dataset(), tmp_path / "in" / "nested.dcm")
    deidentify(source, tmp_path / "out.dcm", seed=3)
    assert b"nested" not in (tmp_path / "out.dcm").read_bytes().lower()


@pytest.mark.parametrize(("request_ids", "kept", "element"), [
    ({"AccessionNumber": "A7712345"}, {"ConvolutionKernel": "A7712345"}, "ConvolutionKernel"),
    ({"StudyID": "ST55123"}, {"SoftwareVersions": "ST55123"}, "SoftwareVersions"),
    ({"AccessionNumber": "A7712345"},
     {"AnatomicRegionSequence": [sequence_item(CodeValue="1", CodingSchemeDesignator="DCM",
                                               CodeMeaning="order A7712345")]},
     "AnatomicRegionSequence[0]>CodeMeaning"),
    ({"RequestedProcedureID": "RP-998877"}, {"SoftwareVersions": "v2 RP 998877"}, "SoftwareVersions"),
    ({"RequestAttributesSequence": [sequence_item(PlacerOrderNumberImagingServiceRequest="PLC4455667")]},
     {"ConvolutionKernel": "PLC4455667"}, "ConvolutionKernel"),
])
def test_request_ids_copied_into_a_kept_element_are_refused(request_ids, kept, element, tmp_path):
    """An accession number, study ID or order number copied into an attribute the profile keeps (a
    kernel, a software version, a standard Code Meaning) was written out unchanged with exit 0, while
    a patient ID there was refused. The final scan searches request IDs too: exit 2, the element
    named, nothing written."""
    ds = base_dataset()
    for keyword, value in {**request_ids, **kept}.items():
        setattr(ds, keyword, value)
    source = write(ds, tmp_path / "in" / "request.dcm")
    result = CliRunner().invoke(app, ["deid", str(source), str(tmp_path / "out.dcm")])
    assert result.exit_code == 2, result.output
    assert f"patient's request ID survived de-identification in {element};" in result.output.replace("\n", " ")
    assert "7712345" not in result.output and sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_short_request_ids_are_not_searched_and_long_ones_are_replaced(tmp_path):
    """Study IDs are often counters (1, 4MR1, 1234) that technical values hold by chance: those of
    fewer than 6 letters and digits are not searched, so the file is written; a long accession
    number is replaced and appears nowhere in the output."""
    ds = base_dataset()
    ds.StudyID, ds.ConvolutionKernel, ds.AccessionNumber = "1234", "B1234f", "ACC99001122"
    deidentify(write(ds, tmp_path / "in" / "short.dcm"), tmp_path / "out.dcm", seed=3)
    written = pydicom.dcmread(tmp_path / "out.dcm")
    assert written.ConvolutionKernel == "B1234f" and written.StudyID != "1234"
    assert b"99001122" not in (tmp_path / "out.dcm").read_bytes()


def test_technical_words_and_modality_codes_in_a_name_are_only_searched_glued(tmp_path):
    """Real files name patients ``CQ500-CT-310`` (pydicom-data) or ``OB`` (an obstetric ultrasound):
    the parts CT and OB are in every such file's Modality or Processing Function, so they are not
    searched alone; a real name that is also a technical word (Long) is still found glued to the
    other parts, and the other parts alone."""
    data_store = pytest.importorskip("data_store")
    store = Path(data_store.__file__).parent / "data"
    for source in (store / "693_J2KR.dcm", Path(get_testdata_file("examples_palette.dcm"))):
        deidentify(source, tmp_path / f"{source.stem}.dcm")
        assert (tmp_path / f"{source.stem}.dcm").is_file()
    for kernel, refused in (("LONG", False), ("LONGWEI", True), ("WEI LONG", True)):
        ds = base_dataset()
        ds.PatientName, ds.ConvolutionKernel = "Long^Wei", kernel
        out, error = run_api(ds, tmp_path / kernel)
        assert (error is not None) == refused, (kernel, error)


@pytest.mark.parametrize(("name", "keyword", "text"), [
    ("Becker^Tim", "StudyDescription", "Head CT Tim"), ("Galan^Maria", "SeriesDescription", "Chest CT Galan"),
    ("Marconi^Luca", "ProtocolName", "Brain MR Marconi"),
    ("Redwood^Juniper", "SeriesDescription", "Juniper Redwood CT"),
    ("Long^Wei", "StudyDescription", "LONG BONE SURVEY"), ("Head^Ann", "ProtocolName", "CT HEAD"),
])
def test_a_descriptor_holding_the_patients_own_name_is_blanked(name, keyword, text, tmp_path):
    """A word the patient is called is no technical word in that patient's file: the descriptor is
    blanked, whether the word was on the allow list (Long, Head) or is a model name that is also a
    given name or surname (Tim, Galan, Marconi, Juniper, Redwood: off the list)."""
    ds = base_dataset()
    ds.PatientName = name
    setattr(ds, keyword, text)
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    assert pydicom.dcmread(out).get(keyword) == ""


def test_the_final_scan_searches_a_patients_common_word_name_alone_in_typed_text(tmp_path):
    """With --keep-descriptors, Body Part Examined and Manufacturer's Model Name are kept as they are:
    the patient's name part ``Long`` (an allow-list word) alone in one refuses the file, while a
    kernel ``LONG`` (a code, not typed text) does not."""
    ds = base_dataset()
    ds.PatientName, ds.BodyPartExamined = "Long^Wei", "LONG BONE"
    out, error = run_api(ds, tmp_path / "typed", clean_descriptors=False)
    assert isinstance(error, DataError) and "name survived de-identification in BodyPartExamined" in str(error)
    assert not out.exists()


@pytest.mark.parametrize(("name", "values"), [
    ("HU^JUN", {"RescaleType": "HU"}),  # LO, a defined term: Hounsfield units (the probe's case)
    ("OD^MEI", {"ModalityLUTType": "OD"}),
    ("LIN^WEI", {"PixelIntensityRelationship": "LIN"}),  # CS: every CR / DX image of a patient called Lin
    ("RAN^WEI", {"CorrectedImage": ["DECY", "RAN"]}),
    ("HU^JUN", {"ImageType": ["ORIGINAL", "PRIMARY", "HU"]}),
    ("COPPER^JOHN", {"FilterMaterial": "COPPER"}),  # 6+ letters: the encoded header's byte search too
])
def test_a_coded_value_that_spells_a_name_part_is_no_surviving_name(name, values, tmp_path):
    """A code (a CS value, a defined term of Rescale Type) that one of the patient's name parts spells was taken
    for the name: the file of every patient called Hu, Lin or Copper was refused (`medvl deid`, every service
    upload route). The file is written with the code kept."""
    ds = base_dataset()
    ds.PatientName = name
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out, error = run_api(ds, tmp_path)
    assert error is None, error
    written = pydicom.dcmread(out)
    for keyword, value in values.items():
        assert written.get(keyword) == value


@pytest.mark.parametrize(("name", "values", "element", "clean"), [
    ("SMITH^JOHN", {"RescaleType": "SMITH"}, "RescaleType", True),  # not one of Rescale Type's defined terms
    ("HU^JUN", {"ImageType": ["ORIGINAL", "PRIMARY", "HU JUN"]}, "ImageType", True),  # two parts in a code string
    ("HU^JUN", {"ImageType": ["ORIGINAL", "PRIMARY", "HUJUN"]}, "ImageType", True),  # glued
    ("HU^JUN", {"BodyPartExamined": "HU"}, "BodyPartExamined", False),  # a CS people type: alone too
    ("HU^JUN", {"ConvolutionKernel": "HU"}, "ConvolutionKernel", True),  # SH: no code string
    ("HU^JUN", {"SoftwareVersions": "v2 HU"}, "SoftwareVersions", True),
])
def test_a_name_in_a_coded_attribute_or_other_text_is_still_refused(name, values, element, clean, tmp_path):
    ds = base_dataset()
    ds.PatientName = name
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    out, error = run_api(ds, tmp_path, clean_descriptors=clean)
    assert isinstance(error, DataError) and f"name survived de-identification in {element};" in str(error)
    assert not out.exists()


def test_the_final_scan_tells_a_code_from_the_name_in_text_pn_and_private_elements():
    """``find_leak`` on values as they would stand after de-identification: the surname Hu in a Rescale Type of
    Hounsfield units is no leak, while in a description, a comment, a person name or a private tag it is."""
    from medvl.clinical.descriptors import typed_keywords
    from medvl.clinical.identifiers import find_leak

    found = identifiers_of("HU^JUN")

    def leak(plant) -> tuple[str, str] | None:
        ds = Dataset()
        ds.RescaleType, ds.PixelIntensityRelationship = "HU", "LIN"
        plant(ds)
        return find_leak(ds, found, typed_keywords())

    assert leak(lambda ds: None) is None
    assert leak(lambda ds: setattr(ds, "SeriesDescription", "CT HU")) == ("SeriesDescription", "name")
    assert leak(lambda ds: setattr(ds, "ImageComments", "seen by Hu")) == ("ImageComments", "name")
    assert leak(lambda ds: setattr(ds, "OperatorsName", "Hu^Li")) == ("OperatorsName", "name")
    assert leak(lambda ds: ds.private_block(0x0009, "MEDVL", create=True).add_new(0x01, "LO", "HU")) == \
        ("(0009,1001)", "name")
    assert leak(lambda ds: setattr(ds, "RescaleType", "HU JUN")) == ("RescaleType", "name")


@pytest.mark.parametrize(("value", "vr", "plain"), [
    ("CT CHEST W/O CONTRAST", "LO", True), ("AX T1 POST 2.5 MM", "LO", True), ("LightSpeed VCT", "LO", True),
    ("CHEST", "CS", True), ("WHOLE BODY", "CS", True), ("", "LO", True),
    ("chest", "CS", False),  # not valid CS
    ("LI WU", "CS", False), ("CT chest Wu", "LO", False), ("ST ELSEWHERE HOSP", "LO", False),
    ("CT 1950", "LO", False), ("CT 31/01/50", "LO", False), ("CT 1.2.3", "LO", False),
    ("MAGNETOM TRIO TIM", "LO", False), ("ACUSON JUNIPER", "LO", False),  # model names that are given names
    ("CHEST " * 12, "LO", False),  # longer than 64 characters
])
def test_plain_descriptor_rule(value, vr, plain):
    from medvl.clinical.descriptors import is_plain

    assert is_plain(value, vr) is plain


# ------------------------------------------------------- names in scripts without word spaces


def identifiers_of(name: str):
    from medvl.clinical.identifiers import collect_identifiers

    ds = Dataset()
    ds.PatientName = name
    return collect_identifiers(ds)


@pytest.mark.parametrize(("name", "text", "found"), [
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "山田太郎様の装置", True),  # the probe's case
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "装置は山田さんのもの", True),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "やまださんの検査", True),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾀﾛｳ", False),  # not one of the name's parts
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "富士の装置", False),
    ("Wang^Xiaoming=王^小明", "患者小明的检查", True),
    ("Kim^Minjun=김^민준", "김민준님의 검사", True),
    ("Kim^Minjun=김^민준", "김치", False),  # a one-syllable family name alone is not searched
    ("Li^Wu", "CLINIC", False),  # Latin script: still whole words only
    ("Li^Wu", "DR-LI", True),
])
def test_names_in_unspaced_scripts_are_found_inside_running_text(name, text, found):
    assert identifiers_of(name).found_in(text) is found


def test_cjk_name_in_a_kept_element_refuses_the_file(tmp_path):
    ds = pydicom.dcmread(CT)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID = "Yamada^Tarou=山田^太郎=やまだ^たろう", "JP00012345"
    ds.Manufacturer = "山田太郎様の装置"
    ds.SoftwareVersions = "v2 山田様"
    ds.save_as(tmp_path / "cjk.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"name survived de-identification in Manufacturer; nothing was written"):
        deidentify(tmp_path / "cjk.dcm", tmp_path / "k.dcm", clean_descriptors=False)
    with pytest.raises(DataError, match=r"name survived de-identification in SoftwareVersions"):
        deidentify(tmp_path / "cjk.dcm", tmp_path / "c.dcm")
    assert not (tmp_path / "k.dcm").exists() and not (tmp_path / "c.dcm").exists()


@pytest.mark.parametrize(("name", "copied"), [
    ("Łukasz^Wałęsa", "Lukasz"), ("Wałęsa^Łukasz", "WALESA"), ("Østergård^Åse", "Ostergard"),
    ("Østergård^Åse", "Oestergaard"), ("Æbelø^Dorte", "Aebelo"), ("Đorđević^Ana", "Dordevic"),
    ("Đorđević^Ana", "Djordjevic"), ("Œdipe^Marc", "Oedipe"), ("Þórsdóttir^Anna", "Thorsdottir"),
    ("Yıldız^Ayşe", "Yildiz"), ("Strauß^Jan", "Strauss"), ("Müller^Jan", "Mueller"), ("Buc^Jérôme", "Jerome"),
])
def test_a_name_copied_without_its_letters_that_do_not_decompose_refuses_the_file(name, copied, tmp_path):
    """Ł, Ø, Æ, Đ, Œ, Þ, ı have no Unicode decomposition: stripping accents left them, so ``Lukasz`` copied
    by a system that drops diacritics passed the final scan. They fold as such systems write them, on both
    sides, and a name part is also searched in its other common spellings (``Djordjevic``, ``Mueller``)."""
    ds = base_dataset()
    ds.SpecificCharacterSet, ds.PatientName, ds.ConvolutionKernel = "ISO_IR 192", name, copied
    write(ds, tmp_path / "in.dcm")
    with pytest.raises(DataError, match=r"name survived de-identification in ConvolutionKernel; nothing was written"):
        deidentify(tmp_path / "in.dcm", tmp_path / "out.dcm")
    assert not (tmp_path / "out.dcm").exists()


def test_unknown_public_elements_held_as_un_are_removed(tmp_path):
    """A public tag the dictionary does not know, sent as UN (a newer attribute through an older node), is
    opaque to the profile: a date in it would keep its value next to the shifted ones and give the offset
    away, a name in it (UTF-16 here) would stay. It is removed, as private tags are, at any depth."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = base_dataset()
    ds.StudyDate = "20210704"
    item = Dataset()
    item.add_new(0x00080020, "DA", "20210705")  # the next day: not an input date the scan knows
    item.add_new(0x0040A123, "PN", "Kowalczyk^Bartholomew")
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, item)
    ds.add_new(0x00189FF1, "UN", b"\xfe\xff\x00\xe0" + len(encoded.getvalue()).to_bytes(4, "little")
               + encoded.getvalue())
    ds.add_new(0x00109999, "UN", "Zimmermann Li Wu".encode("utf-16-le"))
    ds.SourceImageSequence = [sequence_item(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                                            ReferencedSOPInstanceUID="1.2.3.4")]
    ds.SourceImageSequence[0].add_new(0x00189FF3, "UN", b"20210705")
    source = write(ds, tmp_path / "in" / "un.dcm")
    assert pydicom.dcmread(source)[0x00189FF1].VR == "UN"  # read back as sent
    out = tmp_path / "out.dcm"
    report = deidentify(source, out, seed=11)
    written = pydicom.dcmread(out)
    assert 0x00189FF1 not in written and 0x00109999 not in written
    assert 0x00189FF3 not in written.SourceImageSequence[0]
    data = out.read_bytes()
    assert b"20210705" not in data and b"Kowalczyk" not in data and "Li Wu".encode("utf-16-le") not in data
    removed = json.dumps(report)
    assert "(0018,9FF1)" in removed and "(0010,9999)" in removed


@pytest.mark.parametrize("encode", [
    lambda text: text.encode("utf-16-le"), lambda text: text.encode("utf-16-be"),
    lambda text: b"\x01" + text.encode("utf-16-le"), lambda text: b"\x01\x02\x03" + text.encode("utf-16-be"),
    lambda text: text.encode("utf-8")], ids=["utf-16-le", "utf-16-be", "utf-16-le-odd", "utf-16-be-odd", "utf-8"])
def test_final_scan_reads_byte_values_as_utf16_and_utf8(encode):
    """An OB / UN value is searched as latin-1, UTF-8 and UTF-16 of either byte order at either alignment:
    a vendor blob holding the patient's name in UTF-16 is a leak, as one in latin-1 is."""
    from medvl.clinical.identifiers import collect_identifiers, find_leak

    ds = base_dataset()
    ds.PatientName = "Jürgensen^Åsa"
    found = collect_identifiers(ds)
    blob = Dataset()
    blob.add_new(0x00420011, "OB", b"\x00\x07vendor " + encode("seen by JÜRGENSEN today") + b"\x00")
    assert find_leak(blob, found) == ("EncapsulatedDocument", "name")
    blob.EncapsulatedDocument = b"\x00\x07vendor " + encode("seen by nobody today") + b"\x00"
    assert find_leak(blob, found) is None


@pytest.mark.parametrize("seed, keyword", [(69, "StudyID"), (634, "PatientID")])
def test_a_random_id_holding_a_short_patient_id_by_chance_is_replaced_not_refused(seed, keyword, tmp_path):
    """dicognito's dummy IDs are random letters and digits: with seed 69 a patient ID X1 got a study ID holding
    X1, with seed 634 a dummy patient ID holding it, and the final scan refused the file as if the ID had
    survived (about one file in 300 with an ID that short). Such a value is replaced by the run's keyed
    pseudonym, the same in every file of the run."""
    ds = base_dataset()
    ds.PatientName, ds.PatientID = "DOE^JANE", "X1"
    for name in ("a.dcm", "b.dcm"):
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"  # two images of one study
        write(ds, tmp_path / "in" / name)
    result = CliRunner().invoke(app, ["deid", str(tmp_path / "in"), str(tmp_path / "out"), "--seed", str(seed)])
    assert result.exit_code == 0, result.output
    written = [pydicom.dcmread(path) for path in sorted((tmp_path / "out").rglob("*.dcm"))]
    assert len(written) == 2
    values = {str(out.get(keyword)) for out in written}
    assert len(values) == 1 and not re.search(r"(?<![a-z])x1(?!\d)", values.pop().lower()), values
