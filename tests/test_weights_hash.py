"""A weights file is hashed once (io.files.weights_sha256): the teacher's identity, which every cache, distill and
eval computes on every process, reuses the sha256 kept in $TWOSTEP_CACHE/weights_sha256.json while the file's
path, size and mtime are unchanged; a changed file is read again; `verify_hashes()` (`teacher cache --verify`,
`distill --verify-cache`) reads it again and corrects a record that disagrees. The value is sha256_file's, so
identities recorded before are unchanged."""

import json
import os

import pytest

from twostep.io import files as F
from twostep.io.folders import teacher_identity


@pytest.fixture
def counted(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTEP_CACHE", str(tmp_path / "tcache"))
    reads = []
    real = F.sha256_file
    monkeypatch.setattr(F, "sha256_file", lambda p, *a, **k: reads.append(str(p)) or real(p, *a, **k))
    return reads, real


def test_hashed_once_then_reused_until_the_file_changes(tmp_path, counted):
    reads, real = counted
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"weights" * 1000)
    a = F.weights_sha256(w)
    assert a == real(w) and len(reads) == 1
    assert F.weights_sha256(w) == a and len(reads) == 1          # reused: the file is not read again
    rec = json.loads(F.hash_record_path().read_text())
    assert rec[str(w.resolve())]["sha256"] == a and rec[str(w.resolve())]["size"] == 7000
    w.write_bytes(b"other!!" * 1000)                              # same size, new mtime
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    b = F.weights_sha256(w)
    assert b == real(w) != a and len(reads) == 2                  # read again


def test_verify_reads_again_and_corrects_a_wrong_record(tmp_path, counted):
    reads, real = counted
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"x" * 100)
    F.weights_sha256(w)
    rec = json.loads(F.hash_record_path().read_text())
    rec[str(w.resolve())]["sha256"] = "0" * 64                    # a record that lies
    F.hash_record_path().write_text(json.dumps(rec))
    assert F.weights_sha256(w) == "0" * 64                        # trusted without --verify (size and mtime match)
    with F.verify_hashes():
        assert F.weights_sha256(w) == real(w)
    assert F.weights_sha256(w) == real(w)                         # the record is corrected


def test_teacher_identity_reuses_the_hash(tmp_path, counted, tiny_teacher):
    reads, _ = counted
    first = teacher_identity(tiny_teacher)
    n = len(reads)
    assert n >= 1 and teacher_identity(tiny_teacher) == first and len(reads) == n
    F.hash_record_path().unlink()                                 # no record: read again, same identity
    assert teacher_identity(tiny_teacher) == first and len(reads) == n + 1
