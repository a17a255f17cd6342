"""Content manifest of a raw dataset: what exactly a model was trained on.

``DIR/manifest.json`` lists every file (relative POSIX path) with its sha256, size in bytes and,
for images, the header's size and spacing; ``dataset_sha256`` hashes the sorted per-file entries,
so two directories with the same content get the same hash wherever they live. Training tags its
runs with that hash; ``verify_manifest`` tells what changed since it was written.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from masksam.components._io import image_suffix, read_json, sha256_file, write_json
from masksam.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def _listed_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files the manifest covers (hidden files and itself excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def _image_header(path: Path) -> tuple[list[int], list[float]] | None:
    """(size_xyz, spacing_xyz) from the header only, or None if it is not a readable image."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return list(reader.GetSize()), [float(s) for s in reader.GetSpacing()]


def file_entry(root: Path, rel: str) -> dict:
    """Manifest entry of one file: sha256, bytes and, for images, size_xyz and spacing_xyz."""
    path = root / rel
    entry: dict = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    if image_suffix(rel):
        header = _image_header(path)
        if header is not None:
            entry["size_xyz"], entry["spacing_xyz"] = header
    return entry


def dataset_hash(files: dict[str, dict]) -> str:
    """sha256 over the sorted ``path, sha256, bytes`` lines: the identity of the content."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\t{files[rel]['sha256']}\t{files[rel]['bytes']}\n".encode())
    return digest.hexdigest()


def build_manifest(directory: str | os.PathLike, progress: bool = True) -> dict:
    """Hash every file under ``directory`` and return the manifest dict (not written)."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (give the dataset folder holding dataset.json)")
    rels = _listed_files(root)
    files = {rel: file_entry(root, rel) for rel in tqdm(rels, desc="hashing", unit="file", disable=not progress)}
    return {
        "version": MANIFEST_VERSION,
        "dataset_sha256": dataset_hash(files),
        "num_files": len(files),
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
    }


def write_manifest(directory: str | os.PathLike, progress: bool = True) -> dict:
    """Write ``directory/manifest.json`` atomically and return it."""
    manifest = build_manifest(directory, progress=progress)
    write_json(Path(directory) / MANIFEST_NAME, manifest)
    log.info("manifest: %d files, dataset sha256 %s", manifest["num_files"], manifest["dataset_sha256"][:12])
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read ``directory/manifest.json``; a missing or malformed one is a UserError."""
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json(path, what="dataset manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: not a dataset manifest (no 'files' table); rewrite it with `masksam data manifest {directory}`")
    return manifest


@dataclass
class ManifestDiff:
    """Files that differ between a directory and its manifest."""

    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    dataset_sha256: str = ""
    recorded_sha256: str = ""

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.added)

    def summary(self) -> str:
        if self.ok:
            return f"manifest matches: dataset sha256 {self.dataset_sha256}"
        lines = [f"manifest does not match (recorded {self.recorded_sha256[:12]}, now {self.dataset_sha256[:12]}):"]
        lines += [f"  changed: {p}" for p in self.changed]
        lines += [f"  missing: {p}" for p in self.missing]
        lines += [f"  added:   {p}" for p in self.added]
        return "\n".join(lines)


def verify_manifest(directory: str | os.PathLike, progress: bool = True) -> ManifestDiff:
    """Re-hash ``directory`` and report files changed, missing or added since the manifest."""
    root = Path(directory)
    recorded = read_manifest(root)
    rec_files: dict[str, dict] = recorded["files"]
    now_rels = _listed_files(root)
    diff = ManifestDiff(recorded_sha256=str(recorded.get("dataset_sha256", "")))
    current: dict[str, dict] = {}
    for rel in tqdm(now_rels, desc="verifying", unit="file", disable=not progress):
        entry = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
        current[rel] = entry
        if rel not in rec_files:
            diff.added.append(rel)
        elif rec_files[rel].get("sha256") != entry["sha256"] or rec_files[rel].get("bytes") != entry["bytes"]:
            diff.changed.append(rel)
    diff.missing = sorted(set(rec_files) - set(current))
    diff.dataset_sha256 = dataset_hash(current)
    return diff


def test_set_digest(files_by_case: dict[str, list[str | os.PathLike]]) -> str:
    """sha256 identifying a test set by CONTENT: per case (sorted), the name and sha256 of each of
    its files (image channels and reference label). Two evaluations are comparable only when
    this agrees: the same case names with a relabelled reference or a changed scan differ."""
    if not files_by_case:
        raise UserError("the test set holds no cases; nothing to identify")
    digest = hashlib.sha256()
    for case in sorted(files_by_case):
        for path in sorted(Path(p) for p in files_by_case[case]):
            if not path.is_file():
                raise UserError(f"{path}: file of test case '{case}' is missing; cannot identify the test set")
            digest.update(f"{case}\t{path.name}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest()
