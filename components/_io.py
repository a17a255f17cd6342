"""File helpers every step uses: atomic writes, image reading with clear errors, params.

A step either finishes or leaves its previous outputs intact, so every output is written to a
temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from masksam.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories (a directory target is replaced whole: callers that write a
    directory a user may have chosen go through ``owned_output_dir``, which decides whether it
    may be). A file is never replaced by a directory nor a directory by a file: ``kind`` ("file"
    or "dir") refuses the wrong one before any work, and without it the mismatch is refused at
    the end. The temporary name keeps the target's suffixes so writers that choose a format by
    extension still work, and holds this process's id so a later run can remove it if this one
    is killed (``remove_stale_temps``). An unwritable location is a UserError naming it.
    """
    path = Path(path)
    if kind not in (None, "file", "dir"):
        raise ValueError(f"kind must be 'file', 'dir' or None, got {kind!r}")
    _refuse_kind_mismatch(path, kind)
    tmp = _make_temp_name(path)
    try:
        yield tmp
        if tmp.is_dir():
            _refuse_kind_mismatch(path, "dir")
            if path.exists() or path.is_symlink():  # a folder cannot be renamed over a folder
                old = _temp_sibling(path, "old")
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(tmp, path)
        elif tmp.exists():
            _refuse_kind_mismatch(path, "file")
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree if it exists (a link, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _refuse_kind_mismatch(path: Path, kind: str | None, what: str | None = None) -> None:
    named = f"{what} {path}" if what else str(path)
    if kind == "file" and path.is_dir():
        raise UserError(f"{named} is a folder, but a file is written here; give a file path "
                        f"(e.g. {path / 'report.txt'}) or remove the folder")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{named} is a file, but this step writes a folder there; refusing to "
                        "replace the file: choose a folder path")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> int:
    """Start time of process ``pid`` in clock ticks since boot (Linux; 0 where unknown), so a
    recycled pid is not mistaken for the process that wrote a temporary."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _temp_sibling(path: Path, tag: str) -> Path:
    """``.NAME.HOST-PID-TICKS-TAG.tmpSUFFIXES`` beside ``path`` (does not create it)."""
    suffix = "".join(path.suffixes)
    pid = os.getpid()
    return path.with_name(f".{path.name}.{_host_tag()}-{pid}-{_start_ticks(pid)}-{tag}.tmp{suffix}")


def _make_temp_name(path: Path) -> Path:
    """A fresh, unused temporary name beside ``path``, after creating the parent folders and
    removing temporaries that killed runs left for the same target."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        pid = os.getpid()
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_host_tag()}-{pid}-{_start_ticks(pid)}-",
                                    suffix=f".tmp{''.join(path.suffixes)}", dir=path.parent)
    except OSError as exc:
        where = exc.filename if exc.filename and ".tmp" not in Path(exc.filename).name else path.parent
        raise UserError(f"cannot write {path}: {exc.strerror or exc} ({where}); "
                        "choose a folder you can write to") from exc
    os.close(fd)
    os.unlink(name)
    return Path(name)


def _writer_alive(pid: int, ticks: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not ticks or not _start_ticks(pid) or _start_ticks(pid) == ticks


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by killed runs on this host; return them.

    A temporary is stale when the process named in it is gone (or its pid now belongs to a
    process started later); a live writer's temporary is never touched, nor one written on
    another host (shared filesystems), nor names this module did not make.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.([0-9a-f]{{8}})-(\d+)-(\d+)-[A-Za-z0-9_]+\.tmp")
    removed = []
    host = _host_tag()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path.parent):
            m = pattern.match(entry.name)
            if not m or m.group(1) != host or _writer_alive(int(m.group(2)), int(m.group(3))):
                continue
            stale = Path(entry.path)
            _remove(stale)
            log.info("removed %s, left by an interrupted run (process %s)", stale, m.group(2))
            removed.append(stale)
    return removed


# ----------------------------------------------------------------------------------------------
# Outputs a step owns: replaced only when they are the step's own earlier result
# ----------------------------------------------------------------------------------------------

OUTPUT_MARKER = ".masksam-output.json"


def _overlap(out: Path, inputs: Sequence[str | os.PathLike | None], what: str) -> None:
    """Refuse an output that equals, contains or lies inside an input (symlinks resolved)."""
    out_r = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        in_r = Path(inp).resolve()
        if out_r == in_r or out_r in in_r.parents or in_r in out_r.parents:
            raise UserError(
                f"{what} {out} overlaps the input {inp} (it {_relation(out_r, in_r)}); writing it "
                "could destroy the input: choose an output outside the inputs")


def _relation(out_r: Path, in_r: Path) -> str:
    if out_r == in_r:
        return "is the same folder"
    return "contains it" if out_r in in_r.parents else "lies inside it"


def _check_parent_writable(path: Path, what: str) -> None:
    """Early, best-effort refusal of an output whose folder cannot be made or written (the
    write itself still turns any OSError into a UserError)."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: no write permission in {parent}")


def _marker_step(folder: Path) -> str | None:
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("step") if isinstance(data, dict) else None


def check_output_dir(path: str | os.PathLike, step: str, *,
                     inputs: Sequence[str | os.PathLike | None] = (), force: bool = False,
                     what: str = "output folder") -> Path:
    """Check that ``step`` may (re)place the folder ``path``; raise UserError naming why not.

    Allowed: a folder that does not exist, an empty one, or one holding this step's marker
    (its own earlier output, also as DVC restores it from its cache); any other folder only with
    ``force``. Never allowed, even with ``force``: a file there, or an output that equals,
    contains or lies inside one of ``inputs``. Call it before the expensive work.
    """
    path = Path(path)
    _overlap(path, inputs, what)
    _refuse_kind_mismatch(path, "dir", what)
    _check_parent_writable(path, what)
    if not path.is_dir():
        return path
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not entries or _marker_step(path) == step:
        return path
    if force:
        log.warning("--force: replacing %s (%d entries not written by %s)", path, len(entries), step)
        return path
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    owner = _marker_step(path)
    whose = f"the output of `masksam {owner}`" if owner else f"files `masksam {step}` did not write"
    raise UserError(
        f"{what} {path} holds {whose} ({shown}); refusing to replace it. Choose a new or empty "
        "folder, or pass --force to replace it and everything in it")


@contextlib.contextmanager
def owned_output_dir(path: str | os.PathLike, step: str, *,
                     inputs: Sequence[str | os.PathLike | None] = (), force: bool = False,
                     what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``path`` when the block succeeds.

    ``check_output_dir`` decides first whether ``path`` may be replaced; the new folder gets
    the marker file that lets the next run of ``step`` replace it again.
    """
    path = check_output_dir(path, step, inputs=inputs, force=force, what=what)
    with atomic_path(path, kind="dir") as tmp:
        tmp.mkdir()
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps(
            {"step": step, "written_by": "masksam", "note": "marks a folder masksam may replace "
             "when it reruns this step; delete it to protect the folder"}, indent=2) + "\n")


def ensure_writable_dir(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` and write a scratch file in it now, so an output that cannot be written
    fails before the work, as a UserError naming ``what`` (not a traceback at the end)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".masksam-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"{what} {folder} cannot be written ({exc.strerror or exc}); choose a folder "
                        "you can write to") from exc
    return folder


def check_output_file(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike | None] = (),
                      what: str = "output file") -> Path:
    """Refuse a folder where a file is written, or a file that is or lies inside an input."""
    path = Path(path)
    _overlap(path, inputs, what)
    _refuse_kind_mismatch(path, "file", what)
    _check_parent_writable(path, what)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so memory stays flat (ViT-H exports are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning a missing or malformed file into a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from exc


def image_suffix(path: str | os.PathLike) -> str | None:
    """The image suffix of ``path`` (``.nii.gz`` counts as one), or None."""
    name = str(path).lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def read_image(path: str | os.PathLike, expect_dim: int | None = 3, check: bool = True):
    """Read an image with SimpleITK, running the input checks every reader shares
    (:func:`masksam.components._scan.check_scan_file`: truncation, NaN/inf, NIfTI pixdim 0,
    spacing, dimensionality, one value per voxel); any problem is a UserError naming the file.

    ``check=False`` is for re-reading a file this process has already checked: it keeps only the
    dimensionality check.
    """
    from masksam.components._scan import check_scan_file, read_sitk

    path = Path(path)
    if check:
        return check_scan_file(path, expect_dim)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    image = read_sitk(path)
    if expect_dim is not None and image.GetDimension() != expect_dim:
        raise UserError(
            f"{path}: expected a {expect_dim}D image, got {image.GetDimension()}D "
            f"(size {image.GetSize()})"
        )
    return image


def write_image(image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a SimpleITK image atomically."""
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
