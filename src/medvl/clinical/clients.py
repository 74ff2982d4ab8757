"""Which PACS client a URL asks for, and the study filters a search sends: the one policy the CLI
and the service share. ``dicom://AET@host:port`` is DIMSE (pynetdicom); anything else is DICOMweb."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError
from .dimse import DEFAULT_CALLING_AET, DimseClient, is_dicom_url
from .pacs import DicomWebClient, check_date_match, keyword_or_tag, search_filters


def open_pacs(url: str, *, user: str | None = None, password: str | None = None, token: str | None = None,
              timeout: float = 60.0, calling_aet: str | None = None, retrieve: str | None = None,
              move_port: int | None = None) -> DimseClient | DicomWebClient:
    """A DICOMweb client, or a DIMSE client for a ``dicom://`` URL; options of the other protocol
    are refused (DIMSE has no user, password or token; AE titles and move ports are DIMSE only)."""
    if is_dicom_url(url):
        if user or password or token:
            raise InputError("DIMSE (dicom://) has no user, password or token; the PACS admits AE titles and hosts")
        return DimseClient.from_url(url, calling_aet=calling_aet or DEFAULT_CALLING_AET, retrieve=retrieve or "get",
                                    move_port=move_port, timeout=timeout)
    dimse_only = {"--calling-aet": calling_aet, "--retrieve": retrieve, "--move-port": move_port}
    given = [name for name, value in dimse_only.items() if value is not None]
    if given:
        raise InputError(f"{', '.join(given)} only apply to DIMSE: give --url dicom://AET@host:port")
    return DicomWebClient(url, username=user, password=password, token=token, timeout=timeout)


def study_filters(patient_id: str | None = None, patient_name: str | None = None, modality: str | None = None,
                  study_date: str | None = None, accession: str | None = None,
                  pairs: Sequence[str] = ()) -> dict[str, str]:
    """QIDO-RS / C-FIND match keys from the usual fields plus ``KEYWORD=VALUE`` pairs (keywords or
    tags, checked against the DICOM dictionary, with values their VR can match:
    ``medvl.clinical.pacs.search_filters``); empty values are left out. InputError, before any
    server is asked, naming the option: ``--study-date`` must be ``YYYYMMDD`` or
    ``YYYYMMDD-YYYYMMDD``, as must a date given with ``--filter``."""
    if study_date:
        check_date_match(study_date, "--study-date")
    named = {"PatientID": ("--patient-id", patient_id), "PatientName": ("--patient-name", patient_name),
             "ModalitiesInStudy": ("--modality", modality), "StudyDate": ("--study-date", study_date),
             "AccessionNumber": ("--accession", accession)}
    filters: dict[str, str] = {}
    for keyword, (option, value) in named.items():  # an error names the option and the attribute it matches
        filters.update(search_filters({keyword: value}, option))
    pairs_given: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--filter expects KEYWORD=VALUE, got {pair!r}")
        pairs_given[keyword_or_tag(key)] = value.strip()
    return {**filters, **search_filters(pairs_given, "--filter")}
