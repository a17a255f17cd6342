"""Dataset manifest: per-file hashes, a location-independent dataset hash, and verification."""

from __future__ import annotations

import json
import shutil

import pytest

from masksam.cli import main
from masksam.components.data.manifest import (
    build_manifest, dataset_hash, read_manifest, sha256_file, verify_manifest, write_manifest,
)
from masksam.errors import UserError

from _data_helpers import make_dataset


def test_manifest_entries_and_hash(tmp_path):
    root = make_dataset(tmp_path / "ds", n=2)
    (root / ".hidden").write_text("ignored")
    m = write_manifest(root, progress=False)
    assert set(m["files"]) == {
        "dataset.json", "imagesTr/case_000_0000.nii.gz", "imagesTr/case_001_0000.nii.gz",
        "labelsTr/case_000.nii.gz", "labelsTr/case_001.nii.gz",
    }
    img = m["files"]["imagesTr/case_000_0000.nii.gz"]
    assert img["size_xyz"] == [8, 8, 4]
    assert img["spacing_xyz"] == pytest.approx([0.8, 0.8, 2.5])
    assert img["sha256"] == sha256_file(root / "imagesTr/case_000_0000.nii.gz")
    assert img["bytes"] == (root / "imagesTr/case_000_0000.nii.gz").stat().st_size
    assert "size_xyz" not in m["files"]["dataset.json"]
    assert m["dataset_sha256"] == dataset_hash(m["files"])
    assert read_manifest(root) == json.loads((root / "manifest.json").read_text())
    assert not [p for p in root.iterdir() if p.name.startswith(".manifest")]  # no temp left

    # same content elsewhere -> same dataset hash; one changed byte -> a different one
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert build_manifest(copy, progress=False)["dataset_sha256"] == m["dataset_sha256"]
    (copy / "dataset.json").write_text((copy / "dataset.json").read_text() + " ")
    assert build_manifest(copy, progress=False)["dataset_sha256"] != m["dataset_sha256"]


def test_verify_reports_changed_missing_added(tmp_path):
    root = make_dataset(tmp_path / "ds", n=2)
    write_manifest(root, progress=False)
    assert verify_manifest(root, progress=False).ok
    (root / "labelsTr/case_000.nii.gz").write_bytes(b"tampered")
    (root / "imagesTr/case_001_0000.nii.gz").unlink()
    (root / "notes.txt").write_text("new")
    diff = verify_manifest(root, progress=False)
    assert not diff.ok
    assert diff.changed == ["labelsTr/case_000.nii.gz"]
    assert diff.missing == ["imagesTr/case_001_0000.nii.gz"]
    assert diff.added == ["notes.txt"]
    assert "changed: labelsTr/case_000.nii.gz" in diff.summary()
    assert diff.dataset_sha256 != diff.recorded_sha256


def test_manifest_cli(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", n=1)
    assert main(["data", "manifest", str(root), "--no-progress"]) == 0
    assert main(["data", "manifest", str(root), "--verify", "--no-progress"]) == 0
    (root / "dataset.json").write_text("{}")
    assert main(["data", "manifest", str(root), "--verify", "--no-progress"]) == 1
    assert "changed: dataset.json" in capsys.readouterr().err


def test_missing_or_malformed_manifest_is_user_error(tmp_path):
    root = make_dataset(tmp_path / "ds", n=1)
    with pytest.raises(UserError, match="manifest.json"):
        verify_manifest(root)
    (root / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a dataset manifest"):
        verify_manifest(root)
    with pytest.raises(UserError, match="not a directory"):
        build_manifest(tmp_path / "nope")
