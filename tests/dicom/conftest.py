"""Fixtures for the DICOM crawl / header tests: pydicom's test files and synthetic variants of them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def testdata() -> Callable[[str], str]:
    """Path of one of pydicom's (or pydicom-data's) local test files, by name; never downloads."""
    from pydicom.data import get_testdata_file

    def get(name: str) -> str:
        path = get_testdata_file(name, download=False)
        if path is None:
            pytest.skip(f"pydicom test file {name} is not installed locally")
        return str(path)

    return get


@pytest.fixture()
def write_ct(testdata: Callable[[str], str]) -> Callable[..., Path]:
    """Write a copy of CT_small.dcm, optionally modified by a callback, and return its path."""
    import pydicom
    from pydicom.uid import generate_uid

    def write(path: Path, modify: Callable[[pydicom.Dataset], None] | None = None, **attrs: object) -> Path:
        ds = pydicom.dcmread(testdata("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, value in attrs.items():
            setattr(ds, key, value)
        if modify is not None:
            modify(ds)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=False)
        return path

    return write


@pytest.fixture()
def copy_testfile(testdata: Callable[[str], str]) -> Callable[[str, Path], Path]:
    def copy(name: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(testdata(name), dest)
        return dest

    return copy
