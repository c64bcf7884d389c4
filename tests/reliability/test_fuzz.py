"""Fuzzed DICOM: >= 1,000 mutants of valid demo and pydicom test files, mixed with the valid files.

Discovery must never raise; every valid file is catalogued; every mutant is catalogued or quarantined with a
reason (mutants that cannot be valid — truncated images, random bytes, empty files, link loops — are
quarantined); a second run changes nothing; series assembly, segmentation linking and lesion decoding over
the result never raise either.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from imaging_assets.dicom.records import QUARANTINE_REASONS
from imaging_assets.stages import discovery
from imaging_assets.store.warehouse import Warehouse

# pydicom warns (UserWarning) about the invalid values the mutants are made of: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N_MUTANTS = 1100
SEED = 1729

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_WRONG_VRS = [b"SQ", b"UN", b"OB", b"OW", b"FD", b"UL", b"US", b"AT", b"DA", b"UI", b"XX", b"\x00\x00", b"\xff\xff"]
_IMPLICIT_LE = b"1.2.840.10008.1.2"


@dataclass
class Elem:
    tag: tuple[int, int]
    offset: int  # of the tag
    vr_offset: int | None  # explicit VR only
    len_offset: int
    len_size: int  # 2 or 4
    value_offset: int
    length: int


def walk_elements(data: bytes) -> list[Elem]:
    """Top-level elements of a Part-10 file (little endian, explicit or implicit VR) up to the first
    undefined length or anything odd. Enough to aim mutations at tags, VRs and length fields."""
    out: list[Elem] = []
    if len(data) < 140 or data[128:132] != b"DICM":
        return out
    off, implicit = 132, False
    while off + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, off)
        if group != 2 and implicit:
            (length,) = struct.unpack_from("<I", data, off + 4)
            e = Elem((group, element), off, None, off + 4, 4, off + 8, length)
        else:
            vr = data[off + 4:off + 6]
            if not (vr.isalpha() and vr.isupper()):
                break
            if vr in _LONG_VRS:
                if off + 12 > len(data):
                    break
                (length,) = struct.unpack_from("<I", data, off + 8)
                e = Elem((group, element), off, off + 4, off + 8, 4, off + 12, length)
            else:
                (length,) = struct.unpack_from("<H", data, off + 6)
                e = Elem((group, element), off, off + 4, off + 6, 2, off + 8, length)
        out.append(e)
        if e.length == 0xFFFFFFFF or e.value_offset + e.length > len(data):
            break
        if e.tag == (2, 0x10):
            implicit = data[e.value_offset:e.value_offset + e.length].rstrip(b"\0 ") == _IMPLICIT_LE
        if group == 0xFFFE or (group > 2 and data[132:134] != b"\x02\x00"):
            break
        off = e.value_offset + e.length
    return out


def _header_end(data: bytes, elems: list[Elem]) -> int:
    pixel = [e for e in elems if e.tag == (0x7FE0, 0x0010)]
    return pixel[0].offset if pixel else min(len(data), 4096)


# ------------------------------------------------------------------------------------------- mutations


def m_truncate(data, elems, rng):
    return data[: rng.randrange(1, len(data))]


def m_truncate_header(data, elems, rng):
    return data[: rng.randrange(1, max(2, min(len(data), _header_end(data, elems))))]


def m_bitflip(data, elems, rng):
    buf = bytearray(data)
    end = max(1, _header_end(data, elems))
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(0, end)
        buf[pos] ^= 1 << rng.randrange(8)
    return bytes(buf)


def m_bitflip_meta(data, elems, rng):  # flips confined to the preamble/meta/first elements
    buf = bytearray(data)
    pos = rng.randrange(128, min(len(buf), 600))
    buf[pos] ^= 1 << rng.randrange(8)
    return bytes(buf)


def m_random(data, elems, rng):
    body = rng.randbytes(rng.randint(1, 8192))
    return (bytes(128) + b"DICM" + body) if rng.random() < 0.5 else body


def m_overflow_length(data, elems, rng):
    if not elems:
        return m_truncate(data, elems, rng)
    e = rng.choice(elems)
    buf = bytearray(data)
    if e.len_size == 2:
        value = rng.choice([0xFFFF, 0xFFFE, e.length + 1, len(data) & 0xFFFF])
        struct.pack_into("<H", buf, e.len_offset, value)
    else:
        value = rng.choice([0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, len(data) * 3, len(data) - e.value_offset + 1,
                            0xFFFFFFFF])
        struct.pack_into("<I", buf, e.len_offset, value & 0xFFFFFFFF)
    return bytes(buf)


def m_wrong_vr(data, elems, rng):
    explicit = [e for e in elems if e.vr_offset is not None]
    if not explicit:
        return m_bitflip(data, elems, rng)
    e = rng.choice(explicit)
    buf = bytearray(data)
    buf[e.vr_offset:e.vr_offset + 2] = rng.choice(_WRONG_VRS)
    return bytes(buf)


def m_garbage_value(data, elems, rng):
    small = [e for e in elems if 0 < e.length < 256 and e.value_offset + e.length <= len(data)]
    if not small:
        return m_bitflip(data, elems, rng)
    e = rng.choice(small)
    buf = bytearray(data)
    buf[e.value_offset:e.value_offset + e.length] = rng.randbytes(e.length)
    return bytes(buf)


def m_drop_element(data, elems, rng):
    inner = [e for e in elems if e.tag[0] != 2 and e.value_offset + e.length <= len(data)]
    if not inner:
        return m_truncate(data, elems, rng)
    e = rng.choice(inner)
    return data[: e.offset] + data[e.value_offset + e.length:]


def m_splice(data, elems, rng, other: bytes = b""):
    cut = rng.randrange(1, len(data))
    cut2 = rng.randrange(0, max(1, len(other)))
    return data[:cut] + other[cut2:]


MUTATIONS = {
    "truncate": m_truncate, "truncate_header": m_truncate_header, "bitflip": m_bitflip,
    "bitflip_meta": m_bitflip_meta, "random": m_random, "overflow_length": m_overflow_length,
    "wrong_vr": m_wrong_vr, "garbage_value": m_garbage_value, "drop_element": m_drop_element, "splice": m_splice,
}


@dataclass
class Corpus:
    root: Path
    valid: list[str]  # must be catalogued
    originals: list[str]  # pydicom test files: catalogued or quarantined
    mutants: dict[str, tuple[str, str]]  # path -> (mutation, seed kind)
    must_quarantine: dict[str, set[str] | None]  # path -> allowed reasons (None: any reason)
    special: dict[str, str]  # non-regular-file cases -> what they are
    expected_rows: set[str]  # every path that must have exactly one active row


def permissions_enforced(folder: Path) -> bool:
    """Whether chmod 000 makes a file unreadable for this process (not for root, unless it lacks
    CAP_DAC_OVERRIDE)."""
    probe = folder / ".permission_probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        with open(probe, "rb"):
            return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o644)
        probe.unlink()


def _kind_of(path: str) -> str:
    name = Path(path).parent.name
    return "seg" if "SEG" in name else "rtstruct" if "RT" in name else "image"


def build_corpus(root: Path, cohort, rng: random.Random) -> Corpus:
    import pydicom.data

    valid_dir, orig_dir, mut_dir = root / "valid", root / "pydicom", root / "mutants"
    shutil.copytree(cohort.dicom_dir, valid_dir, symlinks=True)
    broken = {str(valid_dir / Path(b["path"]).relative_to("dicom")) for b in cohort.broken}
    valid = sorted(str(p) for p in valid_dir.rglob("*") if p.is_file() and str(p) not in broken)
    originals = []
    orig_dir.mkdir()
    # pydicom's bundled test files, read from its package folder: get_testdata_files() would also look for
    # the external ones (network, ~15 s here) which this suite must never download
    bundled = Path(pydicom.data.__file__).parent / "test_files"
    for i, src in enumerate(sorted(str(f) for f in bundled.rglob("*.dcm"))):
        if os.path.getsize(src) > 600_000:  # keep the corpus small; the big ones add no new structure
            continue
        dst = orig_dir / f"{i:03d}_{Path(src).name}"
        shutil.copyfile(src, dst)
        originals.append(str(dst))

    seeds = [(p, "demo-" + _kind_of(p)) for p in valid] + [(p, "pydicom") for p in originals]
    demo_images = [s for s in seeds if s[1] == "demo-image"]
    others = [s for s in seeds if s[1] != "demo-image"]
    contents: dict[str, bytes] = {}

    def read(p: str) -> bytes:
        if p not in contents:
            contents[p] = Path(p).read_bytes()
        return contents[p]

    mutants: dict[str, tuple[str, str]] = {}
    must: dict[str, set[str] | None] = {}
    names = list(MUTATIONS)
    for i in range(N_MUTANTS):
        src, kind = rng.choice(demo_images) if rng.random() < 0.5 else rng.choice(others)
        data = read(src)
        mutation = names[i % len(names)]
        if len(data) < 2:
            continue
        elems = walk_elements(data)
        if mutation == "splice":
            out = m_splice(data, elems, rng, read(rng.choice(seeds)[0]))
        else:
            out = MUTATIONS[mutation](data, elems, rng)
        sub = mut_dir / f"{i // 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"m{i:05d}_{mutation}.dcm" if rng.random() < 0.8 else sub / f"m{i:05d}_{mutation}"
        path.write_bytes(out)
        mutants[str(path)] = (mutation, kind)
        # oracles: a demo CT slice ends with its pixel data, so any cut loses data; random bytes are not DICOM
        if mutation in ("truncate", "truncate_header") and kind == "demo-image":
            must[str(path)] = None
        if mutation == "random":
            must[str(path)] = None

    special: dict[str, str] = {}
    odd = root / "odd"
    odd.mkdir()
    for i in range(10):  # zero-length files
        p = odd / f"empty_{i}.dcm"
        p.write_bytes(b"")
        must[str(p)] = {"empty_file"}
        special[str(p)] = "empty"
    # directories named .dcm: empty, holding a valid file, nested
    (odd / "dir_empty.dcm").mkdir()
    (odd / "dir_holding.dcm").mkdir()
    held = odd / "dir_holding.dcm" / "slice.dcm"
    shutil.copyfile(demo_images[0][0], held)
    (odd / "dir_outer.dcm" / "dir_inner.dcm").mkdir(parents=True)
    nested = odd / "dir_outer.dcm" / "dir_inner.dcm" / "slice.dcm"
    shutil.copyfile(demo_images[1][0], nested)
    valid += [str(held), str(nested)]
    # symlinks: self loop, two-link cycle, broken, link to a valid file, link to a directory (a loop back up)
    links = odd / "links"
    links.mkdir()
    os.symlink("self.dcm", links / "self.dcm")
    os.symlink("b.dcm", links / "a.dcm")
    os.symlink("a.dcm", links / "b.dcm")
    os.symlink("does_not_exist.dcm", links / "broken.dcm")
    os.symlink(valid[5], links / "to_valid.dcm")
    os.symlink("..", links / "up.dcm")  # a directory loop: must not be followed
    for name in ("self.dcm", "a.dcm", "b.dcm", "broken.dcm"):
        must[str(links / name)] = {"unreadable"}
        special[str(links / name)] = "symlink"
    valid.append(str(links / "to_valid.dcm"))
    # unreadable permissions (root reads anything: then these are simply read; see the monkeypatched test)
    locked = odd / "locked"
    locked.mkdir()
    for i in range(3):
        p = locked / f"locked_{i}.dcm"
        shutil.copyfile(demo_images[2 + i][0], p)
        p.chmod(0)
        special[str(p)] = "chmod000"
        if permissions_enforced(root):
            must[str(p)] = {"unreadable"}
    # odd names: spaces, non-ASCII
    for name in ("with space.dcm", "ünïcødé_名前.dcm", "line\nbreak.dcm", "-leading-dash.dcm"):
        p = odd / name
        shutil.copyfile(demo_images[6][0], p)
        valid.append(str(p))

    expected = set(valid) | set(originals) | set(mutants) | set(special) | {str(p) for p in broken if Path(p).exists()}
    return Corpus(root, sorted(valid), originals, mutants, must, special, expected)


def _rows(db: Path, table: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY path").fetchall()
    finally:
        con.close()


def _active(db: Path) -> tuple[dict[str, tuple], dict[str, tuple]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        files = {r[0]: r for r in con.execute("SELECT path, kind FROM dicom_files WHERE status = 'active'").fetchall()}
        quar = {r[0]: r for r in con.execute(
            "SELECT path, reason, message FROM dicom_quarantine WHERE status = 'active'").fetchall()}
    finally:
        con.close()
    return files, quar


@pytest.fixture(scope="module")
def fuzzed(small_cohort, tmp_path_factory):
    """The corpus and its first crawl (shared by the tests of this module)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    corpus = build_corpus(tmp / "archive", small_cohort, random.Random(SEED))
    wh = Warehouse(tmp / "wh")
    db = wh.duckdb_path
    first = discovery.refresh_catalog(wh, [corpus.root], workers=2)
    yield {"corpus": corpus, "db": db, "wh": wh, "first": first}
    for p in corpus.special:
        if Path(p).exists() and not Path(p).is_symlink():
            Path(p).chmod(0o644)


@pytest.mark.slow
def test_fuzzed_corpus_is_catalogued_or_quarantined_and_stable(fuzzed):
    corpus, db, wh, first = fuzzed["corpus"], fuzzed["db"], fuzzed["wh"], fuzzed["first"]
    assert len(corpus.mutants) >= 1000
    files, quar = _active(db)
    before = (_rows(db, "dicom_files"), _rows(db, "dicom_quarantine"))

    # every valid file catalogued
    missing = [p for p in corpus.valid if p not in files]
    assert not missing, f"{len(missing)} valid files not catalogued, e.g. {[(p, quar.get(p)) for p in missing[:3]]}"
    # every path exactly once: catalogued xor quarantined, with a reason and a message
    assert not set(files) & set(quar)
    unaccounted = sorted(corpus.expected_rows - set(files) - set(quar))
    assert not unaccounted, f"{len(unaccounted)} files neither catalogued nor quarantined: {unaccounted[:5]}"
    extra = sorted((set(files) | set(quar)) - corpus.expected_rows)
    assert not extra, f"rows for paths that are not files of the corpus: {extra[:5]}"
    bad_reason = [q for q in quar.values() if q[1] not in QUARANTINE_REASONS or not q[2]]
    assert not bad_reason, bad_reason[:5]
    # oracles for mutants that cannot be valid
    wrong = {p: (files.get(p), quar.get(p)) for p, allowed in corpus.must_quarantine.items()
             if p not in quar or (allowed is not None and quar[p][1] not in allowed)}
    assert not wrong, f"{len(wrong)} mutants not quarantined as expected: {list(wrong.items())[:5]}"
    assert "loop" in quar[str(corpus.root / "odd/links/self.dcm")][2]
    assert first.seen == len(corpus.expected_rows)

    # the second run changes nothing; it reads again only the files quarantined as unreadable (a
    # permission fix changes neither size nor mtime, so those are always retried)
    unreadable = sum(1 for q in quar.values() if q[1] == "unreadable")
    second = discovery.refresh_catalog(wh, [corpus.root], workers=2)
    assert (second.read, second.removed) == (unreadable, 0), second
    assert second.unchanged == first.seen - unreadable
    assert (_rows(db, "dicom_files"), _rows(db, "dicom_quarantine")) == before

    # the stages right after discovery never raise on what the crawl let through
    series = discovery.rebuild_series(wh)
    segs = discovery.rebuild_segmentations(wh)
    assert series.series >= 8 and segs.linked >= 7

    by_mutation = Counter((m, "catalogued" if p in files else quar[p][1]) for p, (m, _) in corpus.mutants.items())
    print("\nmutant outcomes:", dict(sorted(by_mutation.items())))


@pytest.mark.slow
def test_lesions_over_the_fuzzed_corpus_never_raise(fuzzed, tmp_path):
    from imaging_assets.stages.radiomics import rebuild_lesions
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    db.parent.mkdir()
    shutil.copyfile(fuzzed["db"], db)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    out = rebuild_lesions(wh, workers=1)
    assert out.extractable >= 11


@pytest.mark.slow
def test_duplicated_seg_file_is_counted_once(small_cohort, tmp_path):
    from imaging_assets.stages.radiomics import rebuild_lesions

    dicom = tmp_path / "dicom"
    shutil.copytree(small_cohort.dicom_dir, dicom)
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    discovery.refresh_catalog(wh, [dicom], workers=1)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    base = rebuild_lesions(wh, workers=1)
    con = duckdb.connect(str(db), read_only=True)
    seg = con.execute("SELECT path FROM segmentations WHERE linked_series_key IS NOT NULL ORDER BY path").fetchone()[0]
    con.close()
    shutil.copyfile(seg, Path(seg).with_name("copy_of_" + Path(seg).name))  # the same SEG exported twice
    discovery.refresh_catalog(wh, [dicom], workers=1)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    out = rebuild_lesions(wh, workers=1)
    assert out.extractable >= base.extractable


def _copy_ct(dst: Path) -> Path:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    # an instance of its own: byte-identical files would be one instance at several paths (copies)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(dst)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


class _Denied:
    """Make a file and a directory unreadable: chmod 000, and where that means nothing (root) also make ``open``
    (the header reader's) and ``os.open`` (the directory lister's) raise PermissionError for those paths."""

    def __init__(self, monkeypatch, file: Path, directory: Path) -> None:
        self.mp, self.file, self.directory = monkeypatch, file, directory

    def __enter__(self):
        import imaging_assets.dicom.headers as headers

        if not permissions_enforced(self.file.parent):
            real_open, real_os_open = open, os.open

            def fake_open(path, *args, **kwargs):
                if str(path) == str(self.file):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(path, *args, **kwargs)

            def fake_os_open(path, *args, **kwargs):
                if str(path) == str(self.directory):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_os_open(path, *args, **kwargs)

            self.mp.setattr(headers, "open", fake_open, raising=False)
            self.mp.setattr(os, "open", fake_os_open)
        self.file.chmod(0)
        self.directory.chmod(0)
        return self

    def __exit__(self, *exc):
        self.directory.chmod(0o755)
        self.file.chmod(0o644)
        self.mp.undo()


def _archive(tmp_path: Path):
    root = tmp_path / "archive"
    ok = _copy_ct(root / "a" / "ok.dcm")
    locked_file = _copy_ct(root / "a" / "locked.dcm")
    hidden = _copy_ct(root / "b" / "inside.dcm")
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    first = discovery.refresh_catalog(wh, [root], workers=1)
    assert first.catalogued == 3
    os.utime(locked_file, ns=(1, 1))  # changed since: the next crawl must read it again
    return root, wh, db, ok, locked_file, hidden


def test_unreadable_files_and_directories_are_quarantined_not_removed(tmp_path, monkeypatch):
    """chmod 000 on a file and on a directory (simulated for root, who reads anything)."""
    root, wh, db, ok, locked_file, hidden = _archive(tmp_path)
    locked_dir = hidden.parent
    with _Denied(monkeypatch, locked_file, locked_dir):
        second = discovery.refresh_catalog(wh, [root], workers=1)
        rows = _without_updated_at(db)
        third = discovery.refresh_catalog(wh, [root], workers=1)
    files, quar = _active(db)
    assert quar[str(locked_file)][1] == "unreadable" and "permission" in quar[str(locked_file)][2].lower()
    assert quar[str(locked_dir)][1] == "unreadable" and "cannot list" in quar[str(locked_dir)][2]
    assert str(ok) in files
    # a file behind a directory that cannot be listed is in an unknown state: not marked removed
    assert str(hidden) in files and second.removed == 0 and third.removed == 0
    # the unreadable file is retried on every crawl (a permission fix changes no size/mtime), yet the
    # catalog does not change while it stays unreadable
    assert second.read == 1 and third.read == 1
    assert _without_updated_at(db) == rows
    # the directory can be listed again: it leaves the quarantine, its files stay catalogued
    discovery.refresh_catalog(wh, [root], workers=1)
    files, quar = _active(db)
    assert str(locked_dir) not in quar and str(hidden) in files


def _without_updated_at(db: Path) -> tuple[list, list]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return tuple(con.execute(f"SELECT * EXCLUDE (updated_at) FROM {t} ORDER BY path").fetchall()
                     for t in ("dicom_files", "dicom_quarantine"))
    finally:
        con.close()


def test_second_crawl_leaves_an_unlistable_directory_row_untouched(tmp_path, monkeypatch):
    root, wh, db, ok, locked_file, hidden = _archive(tmp_path)
    with _Denied(monkeypatch, locked_file, hidden.parent):
        discovery.refresh_catalog(wh, [root], workers=1)
        before = _rows(db, "dicom_quarantine")
        discovery.refresh_catalog(wh, [root], workers=1)
        assert _rows(db, "dicom_quarantine") == before


def test_file_quarantined_for_permissions_is_read_again_once_readable(tmp_path, monkeypatch):
    root, wh, db, ok, locked_file, hidden = _archive(tmp_path)
    with _Denied(monkeypatch, locked_file, hidden.parent):
        discovery.refresh_catalog(wh, [root], workers=1)
    assert str(locked_file) in _active(db)[1]
    again = discovery.refresh_catalog(wh, [root], workers=1)
    files, quar = _active(db)
    assert str(locked_file) not in quar, (again, quar.get(str(locked_file)))
    assert str(locked_file) in files


def test_non_utf8_file_name_does_not_break_discovery(tmp_path):
    root = tmp_path / "archive"
    _copy_ct(root / "ok.dcm")
    raw = os.fsencode(root) + b"/caf\xe9.dcm"
    with open(raw, "wb") as fh:
        fh.write((root / "ok.dcm").read_bytes())
    wh = Warehouse(tmp_path / "wh")
    first = discovery.refresh_catalog(wh, [root], workers=1)
    assert first.catalogued + first.quarantined == 2
