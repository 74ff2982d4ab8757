"""The Clean Descriptors option of DICOM PS3.15 (Annex E, Table E.1-1, column "Clean Desc. Opt."):
free-text descriptors are kept only when plainly non-identifying, other free text is removed.

People type study and series descriptions, protocol names and labels, and site staff sometimes type
the patient's name, a birth date or a hospital into any text field a device lets them edit. Cleaning
free text reliably is not possible, so medvl keeps a descriptor only when every word of it is on an
allow list of common technical, anatomical and vendor words (``ALLOWED_WORDS``) and every number is
short; anything else is blanked (emptied, so the attribute stays present for the IOD):

- ``SHORT_DESCRIPTORS``: the LO / SH / CS attributes the standard lists for cleaning (Study and
  Series Description, Protocol Name, Contrast/Bolus Agent, RT plan / structure / ROI labels and
  names, ...) and three it does not list but which hold free text in practice: Body Part Examined,
  Manufacturer and Manufacturer's Model Name. These are kept when plain, blanked otherwise;
- ``PROSE_DESCRIPTORS``: the LT / ST / UT / OB attributes and sequences of that column (comments,
  notes, impressions, narratives, coded reasons): sentences are never plain enough, so they are
  removed, as the basic profile removes most of them anyway;
- every other free-text attribute, at any depth (``free_text_rule``, built from pydicom's data
  dictionary; Table E.1-1's other attributes are left to the profile, which removes, empties or
  replaces them): every attribute of VR LT, ST, UT or UC (Text Value, Unformatted Text Value,
  Comments on the Scheduled Procedure Step, Document Title, Reason for Cancellation, Material
  Notes...) is emptied, and every LO / SH attribute whose keyword ends in Comment(s), Note(s),
  Description, Label, Title, Explanation, Text or Reason (Dose Comment, Content Description, Segment
  Label, Window Center & Width Explanation...) is kept when plain, blanked otherwise. Emptied, not
  removed: the profile does not list them, so an IOD may require them (Type 1 or 2), and an empty
  value keeps the attribute in place. Code Meaning is cleaned like a short descriptor unless the
  code item's Coding Scheme Designator is a standard scheme (``STANDARD_CODING_SCHEMES``: DCM, SCT,
  SRT, LN, UCUM, RADLEX, FMA, NCIt...), where the meaning is the scheme's own text for the code; a
  private scheme's (``99...`` or any other designator) is typed by a site. Kept as they are:
  ``CODED_TEXT``, attributes of those VRs that hold codes or structure (Long Code Value, a coding
  scheme's name and identifiers, a film box's Image Display Format, an RT Fraction Pattern, column
  headers, private dictionary names), and LO / SH attributes with other names (device, coil,
  algorithm and sequence names, IDs, versions, code values): a name typed into one of those is
  found only by the final scan, and only if it is the patient's.

A plain value: at most 64 characters; no date-like run of three numbers (``31/01/1950``,
``1950-01-31``); every run of letters on the allow list (case and accents ignored); every run of
digits at most 3 long (``T1``, ``2.5 MM``, ``MR750``, not a year, ID or phone number). A CS value
must also match the CS character set, ``[A-Z0-9 _]``, up to 16 characters. Single letters are
allowed only where they are common abbreviations (``L``, ``R``, ``W``, ``C``...); names of 2+
letters are not on the list, so ``LI WU`` or ``ST ELSEWHERE HOSP`` blank the value. Vendor and
model names that are also given names or surnames (Vida, Sola, Harmony, Lumina, Tim, Altea, Elan,
Orian, Galan, Juniper, Redwood, Marconi, Picker) are left off on purpose: the list must hold no
likely names, as a name on it would be kept in anyone's descriptor. The technical words it needs
that are also names (Long, Head, Willis) are never plain in the file of a patient called so:
``is_plain``'s ``names`` (the file's patient name parts, allow list or not) makes such a descriptor
blanked, and the final scan searches a patient's name part that is on this list alone in the free
text people type (``typed_keywords``; elsewhere, in a kernel or code string, only glued to another
part, see ``identifiers.collect_identifiers``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .identifiers import fold
from .profile import profile_table

# Table E.1-1, "C" in the Clean Descriptors column: character attributes of one short value (LO / SH / CS).
STANDARD_SHORT_DESCRIPTORS = (
    "AcquisitionDeviceProcessingDescription", "AcquisitionFieldOfViewLabel", "AcquisitionProtocolDescription",
    "AdmittingDiagnosesDescription", "Allergies", "AnnotationGroupLabel", "BeamDescription", "BolusDescription",
    "ClinicalTrialSeriesDescription", "ClinicalTrialTimePointDescription", "CompensatorDescription",
    "ConceptualVolumeDescription", "ContrastBolusAgent", "DecompositionDescription", "DerivationDescription",
    "DisplacementReferenceLabel", "DoseReferenceDescription", "EntityLabel", "EntityLongLabel", "EntityName",
    "FilterLookupTableDescription", "FixationDeviceDescription", "FractionGroupDescription",
    "InterlockDescription", "InterpretationDiagnosisDescription", "MultienergyAcquisitionDescription",
    "Occupation", "PatientSetupPhotoDescription", "PatientState", "PatientTreatmentPreparationMethodDescription",
    "PerformedProcedureStepDescription", "PositionAcquisitionTemplateName", "PriorTreatmentDoseDescription",
    "ProtocolName", "PyramidLabel", "ROIGenerationDescription", "ROIName", "ROIObservationLabel", "RTPlanLabel",
    "RTPlanName", "RTPrescriptionLabel", "RTToleranceSetLabel", "RTTreatmentApproachLabel",
    "RadiationDoseIdentificationLabel", "RadiationDoseInVivoMeasurementLabel", "RadiationGenerationModeLabel",
    "RequestedContrastAgent", "RequestedProcedureDescription", "RequestedSeriesDescription",
    "ScheduledProcedureStepDescription", "SelectorLOValue", "SelectorSHValue", "SeriesDescription",
    "ServiceEpisodeDescription", "SetupTechniqueDescription", "ShieldingDeviceDescription",
    "SpecimenShortDescription", "StructureSetLabel", "StructureSetName", "StudyDescription",
    "TreatmentPositionGroupLabel", "TreatmentSite", "TreatmentSites", "UserContentLabel", "UserContentLongLabel",
    "WaveformFilterDescription",
)
# Not in Table E.1-1 (the basic profile keeps them) but typed by people in practice.
EXTRA_SHORT_DESCRIPTORS = ("BodyPartExamined", "Manufacturer", "ManufacturerModelName")
SHORT_DESCRIPTORS = frozenset(STANDARD_SHORT_DESCRIPTORS + EXTRA_SHORT_DESCRIPTORS)
# Table E.1-1 "C" attributes that hold prose, bytes or coded items: removed when cleaning.
PROSE_DESCRIPTORS = frozenset({
    "AcquisitionComments", "AdditionalPatientHistory", "AdmittingDiagnosesCodeSequence",
    "AnnotationGroupDescription", "CommentsOnRadiationDose", "CommentsOnThePerformedProcedureStep",
    "ConceptualVolumeCombinationDescription", "ContainerDescription", "ContributionDescription",
    "DeviceSettingDescription", "DischargeDiagnosisDescription", "EntityDescription",
    "EquipmentFrameOfReferenceDescription", "FractionationNotes", "FrameComments", "IdentifyingComments",
    "ImageComments", "ImagingServiceRequestComments", "Impressions", "InterlockOriginDescription",
    "InterpretationText", "LabelText", "LongDeviceDescription", "MakerNote", "MedicalAlerts", "PatientComments",
    "PatientTreatmentPreparationProcedureParameterDescription", "PositionAcquisitionTemplateDescription",
    "PrescriptionDescription", "PrescriptionNotes", "PrescriptionNotesSequence", "PyramidDescription",
    "ROIDescription", "ROIObservationDescription", "RTPhysicianIntentNarrative", "RTPlanDescription",
    "RadiationGenerationModeDescription", "ReasonForOmissionDescription", "ReasonForRequestedProcedureCodeSequence",
    "ReasonForStudy", "ReasonForSuperseding", "ReasonForTheAttributeModification",
    "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "RequestAttributesSequence", "RequestedProcedureComments",
    "RespiratoryMotionCompensationTechniqueDescription", "ResultsComments", "SelectorLTValue", "SelectorSTValue",
    "SelectorUTValue", "SpecimenDetailedDescription", "StructureSetDescription", "StudyComments",
    "TreatmentTechniqueNotes", "TreatmentToleranceViolationDescription", "VisitComments",
})
# Free text beyond the "C" rows (see the module docstring): every attribute of a free-text VR, and
# every LO / SH attribute whose keyword ends in one of FREE_TEXT_WORDS.
FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})
FREE_TEXT_WORDS = ("Comment", "Comments", "Note", "Notes", "Description", "Label", "Title", "Explanation",
                   "Text", "Reason")
# Attributes of a free-text VR or name that hold codes or structure, not text people type: kept.
CODED_TEXT = frozenset({
    "LongCodeValue",  # a code value (UC) longer than 16 characters
    "CodingSchemeName", "CodingSchemeExternalID", "CodingSchemeResponsibleOrganization",  # a coding scheme's identity
    "ImageDisplayFormat",  # a film box layout: STANDARD\\1,1
    "FractionPattern",  # an RT fractionation bit pattern
    "ConceptualVolumeCombinationExpression",  # an expression over conceptual volume numbers
    "OECFColumnNames", "SpatialFrequencyResponseColumnNames",  # column headers of measurement tables
    "PrivateDataElementKeyword", "PrivateDataElementName",  # the names of a private dictionary's entries
    "DeviceAlternateIdentifierFormat", "EXIFVersion",  # formats and versions
})
# Code Meaning is kept in a code item of these schemes (PS3.16 Table 8-1: DICOM, SNOMED CT, LOINC, UCUM,
# RadLex, FMA, NCI Thesaurus, UMLS, MeSH, ICD...): the meaning is the scheme's text for the code. In a
# private scheme (99..., or any other designator) it is cleaned like a short descriptor.
STANDARD_CODING_SCHEMES = frozenset({
    "DCM", "SCT", "SRT", "SNM3", "LN", "UCUM", "RADLEX", "FMA", "NCIT", "UMLS", "MSH", "I10", "I9C", "I10P",
    "I11", "ACR", "BARI", "C4", "C5", "CD2", "NDC", "RXNORM", "HPC", "ITIS_TSN", "MDC", "NEU", "NICIP",
    "PUBCHEM_CID", "MGI", "NCBI", "HGNC", "IBSI", "ISO3166_1", "ISO639_1", "ISO639_2", "RFC5646", "UBERON"})
CODE_MEANING = "CodeMeaning"

ALLOWED_WORDS = frozenset(fold(word) for word in """
a b c d f i l m o p r s t w x
ct mr mri pet spect us xr cr dx mg nm pt rf xa ot sc sr ko pr seg rtstruct rtplan rtdose
head brain skull neck face orbit orbits sinus sinuses iac temporal pituitary sella cervical thoracic lumbar sacral
sacrum coccyx spine cspine tspine lspine chest thorax lung lungs heart cardiac coronary aorta aortic pulmonary
abdomen abdominal abd pelvis pelvic abdpelvis liver hepatic biliary pancreas spleen kidney kidneys renal adrenal
bladder prostate uterus ovary ovaries bowel colon rectum stomach esophagus breast breasts mammo mammography
shoulder arm humerus elbow forearm wrist hand hands finger fingers hip hips femur thigh knee knees leg tibia
fibula ankle foot feet toe toes extremity extremities upper lower whole body wb vascular vessel vessels artery
arteries vein veins venous carotid circle willis bone bones joint joints soft tissue tissues muscle skin thyroid
larynx airway mediastinum trunk limb limbs extrem part
axial ax coronal cor sagittal sag oblique obl transverse tra trans localizer localiser scout topogram surveyview
survey tracker bolus tracking helical spiral sequential routine standard std protocol series study exam scan
scans image images recon reconstruction mpr mip minip vr 3d 2d thin thick slice slices sl mm cm kv mas ma ms
sec lowdose low high dose ultra ultralow fast quick dual energy spectral mono monoenergetic kev iterative
contrast noncontrast non enhanced unenhanced without with wo w/o post pre plus and or of the to for iv oral
rectal intrathecal arterial art venous ven portal pv delayed delay equilibrium early late phase phases nephro
nephrographic excretory washout perfusion angio angiography cta mra mrv venography ctv flow cine function
functional dynamic static gated ecg triggered calcium score scoring
t1 t2 pd flair stir dwi dti adc swi gre se fse tse epi ir spgr mprage vibe bravo space cube fiesta truefisp
trufi haste ssfse bold fat sat fatsat fs water dixon inphase opphase in opp out gd gad tof pc mrcp mrs
localizer b0 b1000 trace map maps diffusion weighted susceptibility spin echo gradient recovery inversion
propeller blade navigator breath hold bh fb free breathing resp respiratory triggered nav
pa ap lat lateral left right bilateral bilat lt rt unilateral decubitus supine prone erect upright standing
portable view views frontal oblique lordotic apical
cc mlo ml lm xccl tomo tomosynthesis synthetic implant implants spot mag magnification
ventricle ventricles atrium valve valves sa la ch lvot rvot short long axis stack
screening diagnostic followup follow up baseline staging restaging biopsy guided guidance drainage
ob obstetric obstetrical gyn gynecologic fetal fetus general gen mca stroke neuro msk
nuclear bone scan whole uptake fdg psma dotatate octreotide mibg sestamibi tc99m tc99 tc f18 ga68 i131 i123
attenuation correction corrected ac nac ctac emission transmission
primary secondary original derived report summary key images dose presentation state
omnipaque visipaque isovue ultravist optiray iohexol iopamidol iodixanol iopromide ioversol gadavist dotarem
magnevist multihance prohance eovist primovist clariscan gadovist gadobutrol gadoterate barium iodine
gadolinium omniscan gadodiamide ml cc mg none no yes negative positive water air saline
ge gems medical systems healthcare siemens healthineers philips toshiba canon mec hitachi fujifilm fuji
agfa kodak carestream hologic esaote samsung medison mindray konica minolta shimadzu elscint
varian elekta accuray neusoft united imaging uih planmeca sirona vatech gendex sectra imaging technologies
lightspeed brightspeed revolution discovery optima signa genesis hdxt excite echospeed twinspeed horizon
pioneer architect premier artist vct pro evo hd qx qxi innova senographe pristina essential millennium
somatom definition flash force edge drive sensation emotion perspective scope go up top
magnetom avanto aera skyra prisma trio verio espree symphony vision essenza
biograph mct vision horizon symbia intevo artis zee axiom luminos mammomat inspiration ysio multix fluorospot
aquilion one prime lightning genesis precision vitrea titan vantage
ingenia achieva intera panorama gyroscan ambition elition brilliance ict iqon incisive spectral vereos
allura azurion digitaldiagnost diagnost mammodiagnost affirmation epiq iu22 cx50 lumify
selenia dimensions 3dimensions lorad affirm horizon
logiq voluson vivid versana acuson sequoia aplio xario viamo
""".split())
_DATE_LIKE = re.compile(r"\d+\s*[-/.]\s*\d+\s*[-/.]\s*\d+")
_RUNS = re.compile(r"[^\W\d_]+|\d+")
_CS = re.compile(r"[A-Z0-9 _]{1,16}")
MAX_LENGTH = 64
MAX_DIGITS = 3


def is_plain(value: str, vr: str, names: frozenset[str] = frozenset()) -> bool:
    """True when a descriptor value is plainly non-identifying (see the module docstring); ``names``:
    the patient's name parts (folded), never plain in that patient's file, allow list or not."""
    text = str(value).strip()
    if not text:
        return True
    if vr == "CS" and not _CS.fullmatch(text):
        return False
    if len(text) > MAX_LENGTH or _DATE_LIKE.search(text):
        return False
    for run in _RUNS.findall(fold(text)):
        if run.isdigit():
            if len(run) > MAX_DIGITS:
                return False
        elif run not in ALLOWED_WORDS or run in names:
            return False
    return True


def _values(value: Any) -> list[Any]:
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _last_word(keyword: str) -> str:
    words = re.findall(r"[A-Z][a-z0-9]*|[0-9]+", keyword)
    return words[-1] if words else ""


@lru_cache(maxsize=1)
def free_text_rule() -> tuple[frozenset[str], frozenset[str]]:
    """(keywords emptied, keywords kept when plain) beyond Table E.1-1's "C" rows, from pydicom's data
    dictionary: every attribute of VR LT / ST / UT / UC (emptied), and every LO / SH attribute whose
    keyword ends in one of ``FREE_TEXT_WORDS`` (kept when plain, blanked otherwise), retired ones
    included, except ``CODED_TEXT``, the "C" rows themselves, the other attributes of Table E.1-1
    (the profile removes, empties or replaces those) and the command and file meta groups (0000,
    0002: never in a data set)."""
    from pydicom.datadict import DicomDictionary

    handled = SHORT_DESCRIPTORS | PROSE_DESCRIPTORS | CODED_TEXT | {row.keyword for row in profile_table().values()}
    emptied, short = set(), set()
    for tag, (vr, _, _, _, keyword) in DicomDictionary.items():
        if not keyword or keyword in handled or tag >> 16 in (0x0000, 0x0002):  # command and file meta groups
            continue
        if vr in FREE_TEXT_VRS:
            emptied.add(keyword)
        elif vr in ("LO", "SH") and _last_word(keyword) in FREE_TEXT_WORDS:
            short.add(keyword)
    return frozenset(emptied), frozenset(short)


@lru_cache(maxsize=1)
def typed_keywords() -> frozenset[str]:
    """Keywords of the free text people type that Clean Descriptors judges (short and prose descriptors,
    ``free_text_rule``'s): where the final scan also searches the patient's name parts that are on the
    allow list (``identifiers.find_leak``'s ``typed``)."""
    emptied, short = free_text_rule()
    return SHORT_DESCRIPTORS | PROSE_DESCRIPTORS | emptied | short


def _coded_meaning(dataset, element) -> bool:
    """A Code Meaning of a standard coding scheme (``STANDARD_CODING_SCHEMES``)."""
    scheme = str(dataset.get("CodingSchemeDesignator") or "").strip().upper()
    return element.keyword == CODE_MEANING and scheme in STANDARD_CODING_SCHEMES


def _empty(element) -> None:
    element.value = b"" if isinstance(element.value, bytes) else ""


def clean_descriptors(ds, names: frozenset[str] = frozenset()) -> list[str]:
    """Blank every short descriptor that is not plain and remove every prose descriptor (the "C" rows),
    empty every other free-text attribute and blank every other LO / SH one that names free text when
    not plain (``free_text_rule``; a Code Meaning unless its scheme is standard), in the data set and
    all its sequences; returns the keywords touched (no values). ``names``: the patient's name parts
    (folded), never plain (``is_plain``)."""
    touched: list[str] = []
    doomed: list[tuple[Any, Any]] = []
    emptied, short = free_text_rule()

    def visit(dataset, element) -> None:
        keyword = element.keyword
        if keyword in PROSE_DESCRIPTORS:
            doomed.append((dataset, element.tag))
        elif element.value in (None, "", b""):
            return
        elif keyword in emptied:
            _empty(element)
            touched.append(keyword)
        elif keyword in SHORT_DESCRIPTORS or keyword in short or (
                keyword == CODE_MEANING and not _coded_meaning(dataset, element)):
            if not all(is_plain(str(v), element.VR, names) for v in _values(element.value)):
                _empty(element)
                touched.append(keyword)

    ds.walk(visit)
    for dataset, tag in doomed:
        if tag in dataset:
            touched.append(dataset[tag].keyword)
            del dataset[tag]
    return sorted(set(touched))
