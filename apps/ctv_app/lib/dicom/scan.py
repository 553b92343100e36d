"""Find the CT series and RT structure sets in a folder datastore.

Two layouts are accepted, also mixed: a folder per series (``studies/<name>/*.dcm``, the image id
is the folder name), or files of several series in one place (loose in ``studies/``, or a study
export folder holding more than one CT series), grouped by SeriesInstanceUID; each such series
is shown to the reader as a folder of links under ``studies/.dicom_series/<SeriesInstanceUID>``
and its image id is the SeriesInstanceUID. RTSTRUCTs anywhere are found with the series they
reference, so clinical contours can become training labels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pydicom.dataset import Dataset

from .series import group_series, read_header

logger = logging.getLogger(__name__)
VIEW_FOLDER = ".dicom_series"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".json", ".txt", ".lock", ".md", ".png", ".jpg")


@dataclass
class FoundSeries:
    image_id: str
    folder: str  # what the reader reads: the series' own folder, or its link folder
    series_uid: str
    files: list[str]
    in_own_folder: bool


@dataclass
class FoundStructureSet:
    path: str
    sop_instance_uid: str
    referenced_series_uid: str | None
    label: str


class DicomScanner:
    """Scans ``root`` for DICOM, reading each file's header once (cached by path and mtime)."""

    def __init__(self, root: str):
        self.root = root
        self._headers: dict[str, tuple[float, Dataset | None]] = {}

    def _header(self, path: str) -> Dataset | None:
        try:
            mtime = os.stat(path).st_mtime
        except OSError as e:  # gone since it was listed (or a broken link): not part of this scan
            logger.warning(f"skipping {path}: {e.strerror}")
            self._headers.pop(path, None)
            return None
        cached = self._headers.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_header(path))
            self._headers[path] = cached
        return cached[1]

    def _files(self, folder: str, recursive: bool) -> list[tuple[str, Dataset]]:
        found = []
        for current, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            for name in sorted(files):
                if name.startswith(".") or name.endswith(NOT_DICOM_SUFFIXES):
                    continue
                path = os.path.join(current, name)
                header = self._header(path)
                if header is not None and "SeriesInstanceUID" in header:
                    found.append((path, header))
        return found

    def series_files(self, folder: str, series_uid: str) -> list[str]:
        """The files of series ``series_uid`` that ``folder`` (a series' own folder or its link folder)
        shows the reader: only that series', whatever else the folder holds."""
        if os.path.dirname(os.path.realpath(folder)) == os.path.realpath(os.path.join(self.root, VIEW_FOLDER)):
            candidates = [os.readlink(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]
        else:
            candidates = [path for path, _ in self._files(folder, recursive=True)]
        headers = {path: self._header(path) for path in candidates}
        return [p for p, h in headers.items() if h is not None and str(h.get("SeriesInstanceUID")) == series_uid]

    def scan(self, skip: set[str]) -> tuple[list[FoundSeries], list[FoundStructureSet]]:
        """CT series and structure sets; ``skip`` names top-level folders that are not studies."""
        series: list[FoundSeries] = []
        structure_sets: list[FoundStructureSet] = []
        places = [(self.root, False)] + [
            (os.path.join(self.root, d), True)
            for d in sorted(os.listdir(self.root))
            if not d.startswith(".") and d not in skip and os.path.isdir(os.path.join(self.root, d))
        ]
        for folder, own in places:
            files = self._files(folder, recursive=own)
            structure_sets += [_structure_set(p, h) for p, h in files if str(h.get("SOPClassUID")) == RT_STRUCTURE_SET_STORAGE]
            ct = [g for g in group_series(files).values() if g.modality == "CT"]
            for group in ct:
                if own and len(ct) == 1:
                    series.append(FoundSeries(os.path.basename(folder), folder, group.series_uid, group.paths, True))
                else:
                    view = os.path.join(self.root, VIEW_FOLDER, group.series_uid)
                    series.append(FoundSeries(group.series_uid, view, group.series_uid, group.paths, False))
        return series, structure_sets


def _structure_set(path: str, header: Dataset) -> FoundStructureSet:
    referenced = None
    for frame in header.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for s in study.get("RTReferencedSeriesSequence", []):
                referenced = referenced or str(s.SeriesInstanceUID)
    return FoundStructureSet(path, str(header.SOPInstanceUID), referenced, str(header.get("StructureSetLabel", "")))


def link_view(found: FoundSeries) -> None:
    """Make ``found.folder`` hold links to exactly the series' files (rebuilt atomically)."""
    parent = os.path.dirname(found.folder)
    os.makedirs(parent, exist_ok=True)
    wanted = {f"{i:05d}.dcm": os.path.abspath(p) for i, p in enumerate(sorted(found.files))}
    if os.path.isdir(found.folder):
        current = {n: os.readlink(os.path.join(found.folder, n)) for n in os.listdir(found.folder)}
        if current == wanted:
            return
    tmp = found.folder + ".tmp"
    if os.path.isdir(tmp):
        for n in os.listdir(tmp):
            os.unlink(os.path.join(tmp, n))
        os.rmdir(tmp)
    os.makedirs(tmp)
    for name, target in wanted.items():
        os.symlink(target, os.path.join(tmp, name))
    if os.path.isdir(found.folder):
        for n in os.listdir(found.folder):
            os.unlink(os.path.join(found.folder, n))
        os.rmdir(found.folder)
    os.replace(tmp, found.folder)
