"""Pulling studies into a folder, whatever the protocol: de-identified, atomic, resumable, reported.

A *pull source* (``PullSource``: ``medvl.clinical.pacs.DicomWebClient`` over DICOMweb,
``medvl.clinical.dimse.DimseClient`` over DIMSE) lists the series of the requested studies with the
SOP Instance UIDs in each (``plan_series``) and hands over the instances of one series as DICOM
files, one readable binary stream at a time (``fetch_series``). ``run_pull`` does the rest, the same
way for every source:

``OUT/study-<hash>/series-<hash>/<hash>.dcm`` (short SHA-256 hashes of the de-identified UIDs)
plus ``pull-report.json`` (server, counts, series with modality and number, what is missing, the
de-identification summary: attribute names only; no UIDs, names, IDs or dates). Every instance is de-identified
before it is written (``medvl.clinical.deid``: the PS3.15 basic profile via dicognito, one
anonymizer per pull so the studies, series and patients stay linked) and written atomically
(temporary file + rename). ``keep_identifiers=True`` writes the instances as received instead, with
a warning.

A pull is complete when every listed instance is there and every series holds as many instances
as the source counts in it (``SeriesPlan.expected``, DICOM's Number of Series Related Instances,
where the source gives it, and at least one: a series listed with no instance is not complete). The count
is a hint, never a reason to skip the instance search (servers answer 0 from stale tables); one that
is not a non-negative integer is ignored. Servers cap their search results without saying so, and a listing may
be shorter than the series (or empty): such a series is retrieved whole (WADO-RS / C-GET / C-MOVE at series
level) rather than instance by instance, and the pull stays incomplete, its state kept, while any
instance is known to be missing (``report["missing"]`` says which series, in one line).

A pull is resumable: ``OUT/.medvl-pull-state.json`` records which instances are done (by a hash of
their original SOP Instance UID), which of them may hold burned-in text (their paths in OUT, so the
report of the run that finishes the pull names those of earlier runs too) and, for a de-identified
pull without ``seed``, the random de-identification seed, so a rerun of the same command after an
interruption (or after ``limit``) fetches only the missing instances and maps UIDs and dates exactly
as the first run did. It records how the date shift follows from the seed (``deid.DATE_SHIFT``): a pull started
by a medvl that shifted dates another way (before 2026-12-07: whole hours) is refused, never continued with a
second offset. An instance listed there whose file has since been removed from OUT is pulled again;
a state file of another format, with a value of another type or a path that is not an instance path inside
OUT is refused (``DataError``), never trusted.
The state file is deleted when the pull completes, taking the seed with it: the seed would
reveal the date shift. Keep an unfinished folder private; finish it (rerun) or delete it.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Container, Generator, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from ..errors import ConnectionFailure, DataError, InputError, WriteError
from ..io import atomic_write_bytes, read_json, write_json
from ..progress import progress_bar
from .deid import DATE_SHIFT
from .formats import INSTALL_HINT, uid_hash

log = logging.getLogger(__name__)

STATE_NAME = ".medvl-pull-state.json"
REPORT_NAME = "pull-report.json"
STATE_SAVE_SECONDS = 1.0  # the pull state is saved at most this often (and at the end)
STATE_FORMAT = 2  # 2: records date_shift (an older medvl refuses it rather than shift dates its own way)
STATE_FORMATS = (1, 2)  # read; a de-identified pull of format 1 (no date_shift) is refused on resume
INSTANCE_PATH = re.compile(r"study-[0-9a-f]{12}/series-[0-9a-f]{12}/[0-9a-f]{20}\.dcm")  # as _Writer writes them


@dataclass
class SeriesPlan:
    """One series to pull, as the source listed it, and what the pull did with it."""

    study_uid: str
    series_uid: str
    modality: str | None
    number: int | None
    instances: list[str]  # original SOP Instance UIDs, as the source listed them
    sop_classes: set[str] = field(default_factory=set)  # SOP Class UIDs in the series, where the source lists them
    expected: int | None = None  # instances the source counts in the series (0020,1209); None: it does not say
    pulled: int = 0
    already: int = 0  # instances of the series already in OUT when this run started
    missing: int = 0  # instances known to be absent after this run (listed, or counted by the source)
    folder: str | None = None  # OUT-relative folder of the written instances
    error: str | None = None  # why fetching the series failed in this run (no identifiers); the others went on

    @property
    def size(self) -> int:
        """The instances the series holds as far as known: listed, or counted by the source if more; at least
        one (a series the source lists holds an instance, even when its instance search lists none)."""
        return max(len(self.instances), self.expected or 0, 1)

    @property
    def listing_short(self) -> bool:
        """True when the source counts more instances than it listed (a capped search), or lists none."""
        return not self.instances or (self.expected is not None and self.expected > len(self.instances))


class PullSource(Protocol):
    """What ``run_pull`` needs from a protocol client."""

    url: str  # where the studies come from, without credentials (shown in messages and the report)

    def plan_series(self, study_uids: list[str]) -> list[SeriesPlan]:
        """Every series of the studies with its SOP Instance UIDs and, where the source says,
        its number of instances; ``DataError`` for an unknown study."""
        ...

    def fetch_series(self, plan: SeriesPlan, missing: list[str]) -> Generator[IO[bytes], None, None]:
        """The ``missing`` instances of one series (more is fine; all of ``plan.instances``: the
        whole series, unlisted instances included) as DICOM files, each stream valid until the
        next; closing the iterator early stops the transfer."""
        ...


@dataclass
class _State:
    """What a pull has done so far (``STATE_NAME``); deleted when the pull completes."""

    path: Path
    studies: list[str]  # hashes of the requested study UIDs
    keep_identifiers: bool
    seed: str | None = None  # the generated de-identification seed (None: the caller's own seed)
    seed_check: str | None = None  # hash of the caller's seed, to refuse a resume with another one
    date_shift: str | None = None  # deid.DATE_SHIFT of a de-identified pull (None: keeping identifiers, or format 1)
    done: dict[str, str] = field(default_factory=dict)  # hash of original SOP Instance UID -> relative path
    at_risk: list[str] = field(default_factory=list)  # relative paths of the instances that may hold burned-in text

    def save(self) -> None:
        write_json(self.path, {"format": STATE_FORMAT, "studies": self.studies,
                               "keep_identifiers": self.keep_identifiers, "seed": self.seed,
                               "seed_check": self.seed_check, "date_shift": self.date_shift, "done": self.done,
                               "at_risk": self.at_risk})


def _open_state(out: Path, study_uids: list[str], keep_identifiers: bool, seed: str | None) -> _State:
    """A new state for an empty / new ``out``, or the saved one of an unfinished pull of the same studies."""
    studies = sorted(uid_hash(uid, 64) for uid in study_uids)
    seed_check = uid_hash(f"medvl-seed:{seed}", 64) if seed is not None else None
    path = out / STATE_NAME
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: the output must be a folder, this is a file")
    if path.is_file():
        return _resume_state(path, studies, keep_identifiers, seed, seed_check)
    if out.is_dir() and any(out.iterdir()):
        finished = " (it holds a finished pull)" if (out / REPORT_NAME).is_file() else ""
        raise InputError(f"{out}: output folder is not empty{finished}; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    generated = None if keep_identifiers or seed is not None else secrets.token_hex(16)
    state = _State(path, studies, keep_identifiers, seed=generated, seed_check=seed_check,
                   date_shift=None if keep_identifiers else DATE_SHIFT)
    state.save()
    return state


def _read_state(path: Path) -> _State:
    """The saved state, every value checked (a file edited or damaged by hand): the known format, text where text
    is written, and instance paths of the form medvl writes inside OUT (never a file elsewhere counted as pulled
    or named in the report); DataError naming the file otherwise."""
    unreadable = DataError(path, "unreadable pull state; delete the folder and pull again")
    try:
        saved = read_json(path)
    except (OSError, ValueError):
        raise unreadable from None
    if not isinstance(saved, dict) or saved.get("format") not in STATE_FORMATS:
        raise unreadable
    studies, keep = saved.get("studies"), saved.get("keep_identifiers")
    seed, seed_check = saved.get("seed"), saved.get("seed_check")
    done, at_risk = saved.get("done") or {}, saved.get("at_risk") or []
    date_shift = saved.get("date_shift")
    optional_texts = [value for value in (seed, seed_check, date_shift) if value is not None]
    if (not isinstance(studies, list) or not studies or not _texts(studies) or not isinstance(keep, bool)
            or not _texts(optional_texts)
            or not isinstance(done, dict) or not isinstance(at_risk, list)
            or not all(_instance_path(path.parent, relative) for relative in [*done.values(), *at_risk])):
        raise unreadable
    return _State(path, list(studies), keep, seed, seed_check, date_shift, dict(done), list(at_risk))


def _texts(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(value, str) for value in values)


def _instance_path(out: Path, relative: Any) -> bool:
    """True for an OUT-relative instance path as ``_Writer`` writes it, that stays inside OUT."""
    if not isinstance(relative, str) or not INSTANCE_PATH.fullmatch(relative):
        return False
    return (out / relative).resolve().is_relative_to(out.resolve())


def _resume_state(path: Path, studies: list[str], keep_identifiers: bool, seed: str | None,
                  seed_check: str | None) -> _State:
    state = _read_state(path)
    if state.studies != studies:
        raise InputError(f"{path.parent}: holds an unfinished pull of other studies; resume it with the same "
                         "--study values or use a new folder")
    if state.keep_identifiers != keep_identifiers:
        raise InputError(f"{path.parent}: the unfinished pull there was "
                         f"{'not ' if not state.keep_identifiers else ''}run with --keep-identifiers; rerun it the "
                         "same way")
    if not keep_identifiers and state.date_shift != DATE_SHIFT:  # its first instances have another date offset
        raise InputError(f"{path.parent}: the unfinished pull there was started by another medvl version, which "
                         "shifts dates differently; finish it with the medvl version that started it, or start a "
                         "new pull into another folder")
    if state.seed_check != seed_check:
        raise InputError(f"{path.parent}: resume the unfinished pull with the same --seed as before "
                         f"({'one was given' if state.seed_check else 'none was given'})")
    _forget_removed(state)
    log.info("%s: resuming a pull, %d instance(s) already there", path.parent, len(state.done))
    return state


def _forget_removed(state: _State) -> None:
    """Drop from the state the instances whose files are no longer in OUT (deleted since an earlier run), so
    they are pulled again (same seed, same paths) and no at-risk path names a file that is not there."""
    out = state.path.parent
    removed = [key for key, relative in state.done.items() if not (out / relative).is_file()]
    for key in removed:
        del state.done[key]
    state.at_risk[:] = [relative for relative in state.at_risk if (out / relative).is_file()]
    if removed:
        log.warning("%s: %d instance(s) written by an earlier run are no longer there; pulling them again", out,
                    len(removed))


def as_int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None


def instance_count(value: Any) -> int | None:
    """A source's Number of Series Related Instances (0020,1209) as a count, or None (unknown) when it is not a
    non-negative integer. A hint only: the instances are always listed, whatever it says."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        return None
    count = as_int(value)
    return count if count is not None and count >= 0 else None


def series_order(series: dict[str, Any]) -> tuple[int, str]:
    """Sort key of a series search result: by series number, then UID."""
    return as_int(series.get("SeriesNumber")) or 0, str(series["SeriesInstanceUID"])


class _Writer:
    """Parses, de-identifies (unless keeping identifiers) and atomically writes pulled instances; ``at_risk``
    (the pull state's, kept across runs) gets the path of every written instance whose pixels may hold
    burned-in text."""

    def __init__(self, out: Path, url: str, keep_identifiers: bool, seed: str | None, at_risk: list[str]):
        self.out, self.url, self.keep_identifiers = out, url, keep_identifiers
        self.anonymizer = None if keep_identifiers else _anonymizer(seed)
        self.entries: list[dict[str, Any]] = []  # this run's
        self.at_risk = at_risk

    def write(self, body: IO[bytes], where: str, skip: Container[str] = ()) -> tuple[str, str | None]:
        """Store one instance; returns (hash of its original SOP Instance UID, OUT-relative path),
        with no path when that hash is in ``skip`` (already there: nothing written)."""
        import pydicom

        from .deid import deidentify_dataset
        from .dicom import looks_like_raw_dataset, quiet_pydicom

        head = body.read(132)
        # a PACS serves what it stored: now and then a data set without preamble and file meta, as medvl reads files
        has_marker = len(head) == 132 and head[128:] == b"DICM"
        if not has_marker and not looks_like_raw_dataset(head):
            raise DataError(where, "a received instance is not a DICOM file (no DICM marker at byte 128 and no "
                                   "DICOM header at the start)")
        body.seek(0)
        with quiet_pydicom(where):
            try:
                ds = pydicom.dcmread(body, force=not has_marker)
            except Exception as error:  # noqa: BLE001 - any parser failure: a corrupt instance
                raise DataError(where, f"a received instance is not readable DICOM ({type(error).__name__})") from None
            original = str(ds.get("SOPInstanceUID") or "")
            if not original:
                raise DataError(where, "a received instance has no SOP Instance UID")
            if uid_hash(original, 64) in skip:
                return uid_hash(original, 64), None
            if self.keep_identifiers:
                body.seek(0)
                data = body.read()
            else:
                data, entry = deidentify_dataset(ds, self.anonymizer, where)
                self.entries.append(entry)
        relative = (f"study-{uid_hash(str(ds.get('StudyInstanceUID', '')), 12)}/"
                    f"series-{uid_hash(str(ds.get('SeriesInstanceUID', '')), 12)}/"
                    f"{uid_hash(str(ds.get('SOPInstanceUID', '')), 20)}.dcm")
        if not self.keep_identifiers:
            self.entries[-1]["output"] = relative
        atomic_write_bytes(self.out / relative, data)
        if not self.keep_identifiers and self.entries[-1]["burned_in_risk"] and relative not in self.at_risk:
            self.at_risk.append(relative)
        return uid_hash(original, 64), relative


def _anonymizer(seed: str | None):
    from .deid import RunAnonymizer

    try:
        import dicognito  # noqa: F401
    except ImportError:
        raise DataError(None, f"de-identifying a pull needs dicognito: {INSTALL_HINT}") from None
    return RunAnonymizer(seed)


def check_pull_arguments(study_uids: str | Iterable[str], limit: int | None, keep_identifiers: bool,
                         seed: int | str | None) -> list[str]:
    """The study UIDs as a list without repeats; ``InputError`` for arguments no pull can use."""
    study_uids = [study_uids] if isinstance(study_uids, str) else list(study_uids)
    study_uids = list(dict.fromkeys(str(uid).strip() for uid in study_uids))
    if not study_uids or not all(study_uids):
        raise InputError("give at least one study UID to pull")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    if keep_identifiers and seed is not None:
        raise InputError("a de-identification seed makes no sense with keep_identifiers")
    return study_uids


def run_pull(source: PullSource, study_uids: str | Iterable[str], out: str | Path, *,
             keep_identifiers: bool = False, seed: int | str | None = None, limit: int | None = None,
             show_progress: bool = True) -> dict[str, Any]:
    """Pull whole studies from ``source`` into the folder ``out`` (see the module docstring).

    ``seed``: de-identify with this seed (same seed, same UIDs and dummies, so separate pulls can be
    linked; default: a random seed per pull). ``limit``: stop after this many new instances (rerun
    to continue). Returns the pull report (also written to ``out/pull-report.json``).
    """
    study_uids = check_pull_arguments(study_uids, limit, keep_identifiers, seed)
    out = Path(out)
    started = time.perf_counter()
    plans = source.plan_series(study_uids)
    state = _open_state(out, study_uids, keep_identifiers, None if seed is None else str(seed))
    if keep_identifiers:
        log.warning("keeping patient identifiers: the pulled files in %s hold names, IDs and dates as the PACS "
                    "sent them", out)
    writer = _Writer(out, source.url, keep_identifiers, state.seed if seed is None else str(seed), state.at_risk)
    complete = _pull_plans(source, plans, state, writer, limit, show_progress)
    report = _pull_report(source.url, plans, writer, complete, keep_identifiers, time.perf_counter() - started)
    write_json(out / REPORT_NAME, report)
    if complete:
        state.path.unlink(missing_ok=True)  # takes the seed with it
    log.info("pulled %d instance(s) (%d already there) in %d series into %s%s", report["counts"]["pulled"],
             report["counts"]["already_present"], report["counts"]["series"], out,
             "" if complete else f" (incomplete, {report['missing']}: rerun to continue)")
    return report


def _pull_plans(source: PullSource, plans: list[SeriesPlan], state: _State, writer: _Writer,
                limit: int | None, show_progress: bool) -> bool:
    """Fetch what is missing, series by series; True when nothing is known to be missing."""
    total = sum(plan.size for plan in plans)
    budget = limit if limit is not None else math.inf  # not total: a series listed short may bring more
    saved = time.monotonic()
    present = _present_by_folder(state)
    failures: list[DataError] = []  # series whose fetch failed, each alone: the others go on
    attempts = 0
    try:
        with progress_bar("Pulling DICOM", total=total, enabled=show_progress) as advance:
            for number, plan in enumerate(plans, 1):
                missing = [sop for sop in plan.instances if uid_hash(sop, 64) not in state.done]
                plan.folder = next((str(Path(state.done[uid_hash(s, 64)]).parent) for s in plan.instances
                                    if uid_hash(s, 64) in state.done), None)
                plan.already = present[plan.folder] if plan.folder else 0
                advance(plan.already)
                unlisted = plan.listing_short and plan.already < plan.size
                if not (missing or unlisted) or budget <= 0:
                    continue
                # instances the source did not list cannot be asked for by UID: ask for the whole series
                wanted = list(plan.instances) if unlisted else missing
                attempts += 1
                try:
                    with closing(source.fetch_series(plan, wanted)) as bodies:
                        for body in bodies:
                            key, relative = writer.write(body, f"{source.url} (series {number} of {len(plans)})",
                                                         skip=state.done)
                            if relative is None:  # already here: the whole series was asked for again
                                plan.folder = str(Path(state.done[key]).parent)  # an unlisted series' folder too
                                continue
                            plan.pulled, budget = plan.pulled + 1, budget - 1
                            advance(1)
                            state.done[key] = relative
                            plan.folder = str(Path(relative).parent)
                            if time.monotonic() - saved > STATE_SAVE_SECONDS:
                                state.save()
                                saved = time.monotonic()
                            if budget <= 0:
                                break
                except (ConnectionFailure, WriteError):
                    raise  # the server is gone, or the disk: no other series would fare better
                except DataError as error:  # this series only (a refused retrieve, an unreadable instance)
                    plan.error = error.problem  # what failed, not where: the report names the server once
                    failures.append(error)
                    log.warning("series %d of %d (%s): %s; the other series go on (rerun to retry it)", number,
                                len(plans), plan.modality or "modality unknown", plan.error)
    finally:
        state.save()  # an instance written but not yet recorded is fetched and written again on resume
    if failures and not state.done and len(failures) == attempts:
        raise failures[0]  # every series asked for failed and the folder holds nothing: one error, as before
    present = _present_by_folder(state)
    for plan in plans:
        absent = sum(1 for sop in plan.instances if uid_hash(sop, 64) not in state.done)
        plan.missing = max(absent, plan.size - (present[plan.folder] if plan.folder else 0))
    return not any(plan.missing for plan in plans)


def _present_by_folder(state: _State) -> Counter[str]:
    """Instances in OUT per series folder (a series' instances share one folder, listed or not)."""
    return Counter(str(Path(relative).parent) for relative in state.done.values())


def missing_line(plans: list[SeriesPlan], shown: int = 3) -> str | None:
    """What a pull still lacks, in one line without identifiers; None when nothing is known missing."""
    short = [(number, plan) for number, plan in enumerate(plans, 1) if plan.missing]
    if not short:
        return None
    parts = []
    for number, plan in short[:shown]:
        modality = plan.modality or "modality unknown"
        part = f"series {number} of {len(plans)} ({modality}) has {plan.size - plan.missing} of {plan.size}"
        if not plan.instances:
            part += ", the server listing none of its instances"
        elif plan.listing_short:
            part += f", the server listing only {len(plan.instances)} (a capped search)"
        if plan.error:
            part += f", its retrieve failed: {plan.error}"
        parts.append(part)
    more = f"; and {len(short) - shown} more series" if len(short) > shown else ""
    return f"{sum(plan.missing for _, plan in short)} instance(s) missing: {'; '.join(parts)}{more}"


def _pull_report(url: str, plans: list[SeriesPlan], writer: _Writer, complete: bool, keep_identifiers: bool,
                 seconds: float) -> dict[str, Any]:
    series = [{"folder": plan.folder, "modality": plan.modality, "series_number": plan.number,
               "instances": plan.size, "listed": len(plan.instances), "pulled": plan.pulled,
               "already_present": plan.already, "missing": plan.missing, "error": plan.error} for plan in plans]
    counts = {"studies": len({plan.study_uid for plan in plans}), "series": len(plans),
              "instances": sum(plan.size for plan in plans),
              "pulled": sum(plan.pulled for plan in plans), "already_present": sum(plan.already for plan in plans)}
    report = {"server": url, "complete": complete, "missing": missing_line(plans), "deidentified": not keep_identifiers,
              "counts": counts, "series": series, "seconds": round(seconds, 2)}
    if not keep_identifiers:
        report["deidentification"] = _deid_summary(writer.entries, writer.at_risk)
    return report


def _deid_summary(entries: list[dict[str, Any]], at_risk_paths: list[str]) -> dict[str, Any]:
    """This run's de-identification (``entries``) in totals, and every instance of the pull at risk of
    burned-in text (``at_risk_paths``: earlier runs' too, so a resumed pull's report names them all)."""
    from dicognito import __version__ as dicognito_version

    from .deid import PROFILE

    replaced = Counter(name for entry in entries for name in entry["replaced"])
    removed = Counter(name for entry in entries for name in entry["removed"])
    at_risk = sorted(at_risk_paths)
    if at_risk:
        log.warning("%d pulled instance(s) may hold burned-in text in their pixels, or identifying text in an "
                    "encapsulated document (Burned In Annotation YES, or ultrasound / secondary capture / "
                    "document...), which de-identification does not change", len(at_risk))
    return {"profile": PROFILE, "tool": f"dicognito {dicognito_version}",
            "uids": "replaced, consistent within the pull",
            "dates": "shifted back by one whole-day offset per pull (62 to 730 days); times of day kept",
            "date_shift": DATE_SHIFT,
            "files_this_run": len(entries), "replaced": dict(sorted(replaced.items())),
            "removed": dict(sorted(removed.items())),
            "private_tags_removed": sum(entry["private_tags_removed"] for entry in entries),
            "files_with_burned_in_risk": len(at_risk), "burned_in_risk_files": at_risk,
            "files_with_warnings": sum(1 for entry in entries if entry["warnings"])}


def read_report(folder: str | Path) -> dict[str, Any]:
    """The ``pull-report.json`` of a pulled folder."""
    path = Path(folder) / REPORT_NAME
    try:
        return read_json(path)
    except FileNotFoundError:
        raise DataError(path, "no pull report (not a folder written by medvl pacs pull)") from None
    except (OSError, ValueError) as error:
        raise DataError(path, f"unreadable pull report ({type(error).__name__})") from None

