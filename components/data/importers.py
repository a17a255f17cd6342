"""Convert public dataset layouts (AMOS 2022, Synapse/BTCV, ACDC, MSD, nnU-Net) to nnU-Net raw.

Each importer only *finds* cases in its layout and says how to name and relabel them; one
writer copies images (byte-for-byte when already ``.nii.gz`` and 3D, otherwise converted with
SimpleITK; 4D MSD images are split into channels), rewrites labels as uint8 (relabelled where
asked), writes dataset.json, validates the result and writes the manifest. The output folder is
built beside DST and renamed into place only when the whole import succeeded and validated.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from masksam.components._io import check_output_dir, image_suffix, owned_output_dir, read_json, write_json
from masksam.errors import UserError

log = logging.getLogger(__name__)

AMOS_LABELS = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
    "prostate/uterus",
]
BTCV_LABELS = [
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
    "left adrenal gland",
]
# TransUNet's 8 organs, in its order, as BTCV label values
SYNAPSE8 = [("aorta", 8), ("gallbladder", 4), ("left kidney", 3), ("right kidney", 2), ("liver", 6),
            ("pancreas", 11), ("spleen", 1), ("stomach", 7)]
TRANSUNET_TEST = ["0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038"]
ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
GEOMETRY_FIX_RTOL = 1e-2  # label headers this close to the image's get the image's geometry


@dataclass
class CaseSpec:
    """One case to write: source image file(s) (one per channel, or one 4D file) and label."""

    case: str
    images: list[Path]
    label: Path | None = None
    test: bool = False            # unlabelled -> imagesTs


@dataclass
class ImportPlan:
    """What an importer found: cases plus the dataset.json fields it determines."""

    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    cases: list[CaseSpec]
    relabel: dict[int, int] | None = None     # source value -> output value (others -> 0)
    extra: dict = field(default_factory=dict)


def snake(name: str) -> str:
    """'right kidney' -> 'right_kidney', 'prostate/uterus' -> 'prostate_uterus'."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name.strip()).strip("_").lower() or "label"


def _labels_from(names: Sequence[str]) -> dict[str, int]:
    out = {"background": 0}
    for i, n in enumerate(names, start=1):
        key = snake(n)
        out[key if key not in out else f"{key}_{i}"] = i
    return out


def _strip(name: str) -> str:
    suf = image_suffix(name)
    return name[: -len(suf)] if suf else name


def _images_in(folder: Path) -> list[Path]:
    """Image files in ``folder`` (no macOS '._' or other hidden files), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and image_suffix(p.name))


# --------------------------------------------------------------------------------------------
# Layout readers
# --------------------------------------------------------------------------------------------

def plan_nnunet(src: Path) -> ImportPlan:
    """An nnU-Net v2 raw dataset: validated as is, then copied."""
    from masksam.components.data.validate import validate_dataset

    report = validate_dataset(src, progress=False)
    if not report.ok:
        raise UserError(f"{src} is not a valid nnU-Net raw dataset:\n" + "\n".join(f"  {p}" for p in report.errors[:30]))
    meta = report.dataset
    fe = meta["file_ending"]
    n_ch = len(meta["channel_names"])
    cases = [CaseSpec(c.case, [src / "imagesTr" / f"{c.case}_{i:04d}{fe}" for i in range(n_ch)],
                      src / "labelsTr" / f"{c.case}{fe}") for c in report.cases]
    ts = src / "imagesTs"
    ts_cases = sorted({p.name[: -len(fe) - 5] for p in ts.glob(f"*_0000{fe}")}) if ts.is_dir() else []
    cases += [CaseSpec(c, [ts / f"{c}_{i:04d}{fe}" for i in range(n_ch)], test=True) for c in ts_cases]
    extra = {k: v for k, v in meta.items() if k not in ("channel_names", "labels", "numTraining", "file_ending", "name")}
    return ImportPlan(meta.get("name", src.name), dict(meta["channel_names"]), dict(meta["labels"]), cases, extra=extra)


def plan_msd(src: Path) -> ImportPlan:
    """Medical Segmentation Decathlon task folder (TaskXX_Name with dataset.json)."""
    meta = read_json(src / "dataset.json", what="MSD dataset.json")
    modality = meta.get("modality") or meta.get("channel_names")
    if not isinstance(modality, dict) or not modality:
        raise UserError(f"{src / 'dataset.json'}: no 'modality' table (e.g. {{\"0\": \"CT\"}}); is this an MSD task folder?")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise UserError(f"{src / 'dataset.json'}: no 'labels' table")
    if all(str(k).isdigit() for k in raw_labels):          # MSD style: {"0": "background", ...}
        labels = {}
        for k, name in sorted(raw_labels.items(), key=lambda kv: int(kv[0])):
            key = "background" if int(k) == 0 else snake(str(name))
            labels[key if key not in labels else f"{key}_{k}"] = int(k)
    else:                                                   # already name -> int
        labels = {str(k): int(v) for k, v in raw_labels.items()}
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise UserError(f"{src / 'dataset.json'}: no 'training' list of {{\"image\", \"label\"}} entries")
    cases, missing = [], []
    for entry in training:
        img, lab = src / str(entry.get("image", "")), src / str(entry.get("label", ""))
        if Path(img).name.startswith("._"):
            continue
        for f in (img, lab):
            if not f.is_file():
                missing.append(str(f))
        cases.append(CaseSpec(_strip(img.name), [img], lab))
    for entry in meta.get("test", []) or []:
        img = src / str(entry if isinstance(entry, str) else entry.get("image", ""))
        if img.is_file() and not img.name.startswith("._"):
            cases.append(CaseSpec(_strip(img.name), [img], test=True))
    if missing:
        raise UserError(f"{src}: {len(missing)} file(s) listed in dataset.json are missing, e.g. " + ", ".join(missing[:5]))
    channels = {str(k): str(v) for k, v in sorted(modality.items(), key=lambda kv: int(kv[0]))}
    return ImportPlan(str(meta.get("name", src.name)), channels, labels, cases,
                      extra={"description": str(meta.get("description", "")), "licence": str(meta.get("licence", ""))})


def plan_amos(src: Path, modality: str = "ct") -> ImportPlan:
    """AMOS 2022: imagesTr/labelsTr and imagesVa/labelsVa (labelled) plus imagesTs; ids < 500 CT."""
    names = AMOS_LABELS
    meta_path = src / "dataset.json"
    if meta_path.is_file():
        meta = read_json(meta_path, what="AMOS dataset.json")
        lab = meta.get("labels") if isinstance(meta, dict) else None
        if isinstance(lab, dict) and all(str(k).isdigit() for k in lab):
            names = [str(v) for k, v in sorted(lab.items(), key=lambda kv: int(kv[0])) if int(k) > 0]
    if modality not in ("ct", "mr", "all"):
        raise UserError(f"--modality must be ct, mr or all, got {modality!r}")

    def keep(case: str) -> bool:
        m = re.search(r"(\d+)$", case)
        if not m:
            return False
        is_ct = int(m.group(1)) < 500
        return modality == "all" or (modality == "ct") == is_ct

    cases: list[CaseSpec] = []
    for img_dir, lab_dir in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
        for img in _images_in(src / img_dir):
            case = _strip(img.name)
            if not keep(case):
                continue
            lab = next((p for p in _images_in(src / lab_dir) if _strip(p.name) == case), None)
            cases.append(CaseSpec(case, [img], lab, test=lab is None))
    cases += [CaseSpec(_strip(p.name), [p], test=True) for p in _images_in(src / "imagesTs") if keep(_strip(p.name))]
    if not any(not c.test for c in cases):
        raise UserError(f"{src}: no labelled AMOS {modality.upper()} cases found (expected imagesTr/amos_0001.nii.gz "
                        "and labelsTr/amos_0001.nii.gz; CT ids < 500, MR ids >= 500)")
    channel = {"ct": "CT", "mr": "MRI", "all": "nonCT"}[modality]
    extra = {"case_modality": {c.case: ("CT" if int(re.search(r"(\d+)$", c.case).group(1)) < 500 else "MRI") for c in cases}}
    if modality == "all":
        extra["note"] = "CT and MR cases mixed: channel 'nonCT' means per-case z-score normalisation"
    return ImportPlan(f"AMOS2022 ({modality.upper()})", {"0": channel}, _labels_from(names), cases, extra=extra)


def _find_dir(src: Path, rel: str, depth: int = 2) -> Path | None:
    """``src/rel`` or ``src/*/rel`` (up to ``depth`` levels): archives unpack with extra parents."""
    for level in range(depth + 1):
        for cand in sorted(src.glob("/".join(["*"] * level + [rel]))):
            if cand.is_dir():
                return cand
    return None


def plan_synapse(src: Path, subset: int | None = None) -> ImportPlan:
    """Synapse/BTCV: RawData/Training/img/img0001.nii.gz with label/label0001.nii.gz."""
    train = _find_dir(src, "Training/img")
    if train is None:
        raise UserError(f"{src}: no Training/img folder (expected RawData/Training/img/img0001.nii.gz as in the "
                        "Synapse 'Abdomen' RawData archive)")
    label_dir = train.parent / "label"
    cases, unlabelled = [], []
    for img in _images_in(train):
        m = re.match(r"img(\d+)$", _strip(img.name))
        if not m:
            continue
        num = m.group(1)
        lab = next((p for p in _images_in(label_dir) if _strip(p.name) == f"label{num}"), None)
        if lab is None:
            unlabelled.append(img.name)
            continue
        cases.append(CaseSpec(f"case{num}", [img], lab))
    if unlabelled:
        raise UserError(f"{label_dir}: no label for {', '.join(unlabelled[:5])} (expected label{{NNNN}}.nii.gz)")
    if not cases:
        raise UserError(f"{train}: no img{{NNNN}}.nii.gz files found")
    test_dir = _find_dir(src, "Testing/img")
    if test_dir is not None:
        cases += [CaseSpec("case" + _strip(p.name)[3:], [p], test=True) for p in _images_in(test_dir)
                  if re.match(r"img\d+$", _strip(p.name))]
    present = {c.case for c in cases if not c.test}
    fixed = [f"case{n}" for n in TRANSUNET_TEST if f"case{n}" in present]
    if len(fixed) < len(TRANSUNET_TEST):
        log.warning("synapse: %d of the 12 TransUNet test cases are absent", len(TRANSUNET_TEST) - len(fixed))
    extra = {"fixed_test_cases": fixed, "split": "TransUNet (Chen et al. 2021): 18 training, 12 test cases"}
    if subset == 8:
        labels = {"background": 0, **{snake(n): i for i, (n, _) in enumerate(SYNAPSE8, start=1)}}
        relabel = {src_v: i for i, (_, src_v) in enumerate(SYNAPSE8, start=1)}
        return ImportPlan("Synapse (TransUNet 8 organs)", {"0": "CT"}, labels, cases, relabel, extra)
    if subset is not None:
        raise UserError(f"--subset {subset} is not known; the only subset is 8 (TransUNet's organs)")
    return ImportPlan("Synapse/BTCV (13 organs)", {"0": "CT"}, _labels_from(BTCV_LABELS), cases, extra=extra)


def _acdc_info(cfg: Path) -> dict[str, str]:
    info = {}
    for line in cfg.read_text(errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def plan_acdc(src: Path) -> ImportPlan:
    """ACDC: training/patientNNN/patientNNN_frameFF.nii.gz (+ _gt) and Info.cfg with ED and ES."""
    train = _find_dir(src, "training")
    if train is None:
        raise UserError(f"{src}: no training/ folder (expected training/patient001/Info.cfg as in the ACDC archive)")
    cases: list[CaseSpec] = []
    fixed: list[str] = []
    for split_dir, is_test in ((train, False), (_find_dir(src, "testing"), True)):
        if split_dir is None:
            continue
        for pdir in sorted(d for d in split_dir.iterdir() if d.is_dir() and d.name.startswith("patient")):
            cfg = pdir / "Info.cfg"
            if not cfg.is_file():
                raise UserError(f"{cfg}: missing (it gives the ED and ES frame numbers)")
            info = _acdc_info(cfg)
            for phase in ("ED", "ES"):
                if not info.get(phase, "").strip().isdigit():
                    raise UserError(f"{cfg}: no '{phase}: <frame number>' line")
                frame = int(info[phase])
                stem = f"{pdir.name}_frame{frame:02d}"
                img = next((pdir / f"{stem}{s}" for s in (".nii.gz", ".nii") if (pdir / f"{stem}{s}").is_file()), None)
                gt = next((pdir / f"{stem}_gt{s}" for s in (".nii.gz", ".nii") if (pdir / f"{stem}_gt{s}").is_file()), None)
                if img is None:
                    raise UserError(f"{pdir}: {stem}.nii.gz ({phase} frame per Info.cfg) is missing")
                case = f"{pdir.name}_{phase}"
                if gt is None and not is_test:
                    raise UserError(f"{pdir}: {stem}_gt.nii.gz ({phase} ground truth) is missing")
                cases.append(CaseSpec(case, [img], gt, test=gt is None))
                if is_test and gt is not None:
                    fixed.append(case)
    if not cases:
        raise UserError(f"{train}: no patientNNN folders found")
    extra = {"fixed_test_cases": fixed} if fixed else {}
    return ImportPlan("ACDC", {"0": "MRI"}, dict(ACDC_LABELS), cases, extra=extra)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

def _write_channels(spec: CaseSpec, n_channels: int, out_dir: Path) -> list[Path]:
    """Write the case's channel images as {case}_{c:04d}.nii.gz; returns the written paths."""
    import SimpleITK as sitk

    from masksam.components.data.validate import read_header

    written = []
    if len(spec.images) == 1 and n_channels > 1 or len(spec.images) == 1 and _is_4d(spec.images[0]):
        image = _read(spec.images[0])
        if image.GetDimension() != 4:
            raise UserError(f"{spec.images[0]}: dataset.json declares {n_channels} channels, so a 4D image "
                            f"was expected; got {image.GetDimension()}D")
        size = list(image.GetSize())
        if size[3] != n_channels:
            raise UserError(f"{spec.images[0]}: {size[3]} channels in the file, {n_channels} declared")
        for c in range(n_channels):
            ch = sitk.Extract(image, size[:3] + [0], [0, 0, 0, c])
            path = out_dir / f"{spec.case}_{c:04d}.nii.gz"
            sitk.WriteImage(ch, str(path), useCompression=True)
            written.append(path)
        return written
    if len(spec.images) != n_channels:
        raise UserError(f"case {spec.case}: {len(spec.images)} image file(s) for {n_channels} declared channels")
    for c, src in enumerate(spec.images):
        path = out_dir / f"{spec.case}_{c:04d}.nii.gz"
        try:
            header = read_header(src)
        except RuntimeError as exc:
            raise UserError(f"{src}: cannot be read as an image ({str(exc).strip().splitlines()[-1][:200]})") from exc
        if image_suffix(src.name) == ".nii.gz" and header["dim"] == 3:
            shutil.copyfile(src, path)
        else:
            sitk.WriteImage(_read(src), str(path), useCompression=True)
        written.append(path)
    return written


def _is_4d(path: Path) -> bool:
    from masksam.components.data.validate import read_header

    try:
        return read_header(path)["dim"] == 4
    except RuntimeError:
        return False


def _read(path: Path):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot be read as an image ({str(exc).strip().splitlines()[-1][:200]})") from exc


def _write_label(src: Path, ref_image: Path, relabel: dict[int, int] | None, out: Path) -> None:
    """Label as uint8 (relabelled if asked); near-identical geometry snaps to the image's."""
    import SimpleITK as sitk

    from masksam.components.data.validate import geometry_mismatch, read_header

    label = _read(src)
    arr = sitk.GetArrayFromImage(label)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise UserError(f"{src}: label holds non-integer values")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise UserError(f"{src}: label values {int(arr.min())}..{int(arr.max())} do not fit 0..255")
    arr = arr.astype(np.uint8)
    if relabel is not None:
        lut = np.zeros(256, np.uint8)
        for k, v in relabel.items():
            lut[k] = v
        arr = lut[arr]
    out_img = sitk.GetImageFromArray(arr)
    out_img.CopyInformation(label)
    img_h = read_header(ref_image)
    lab_h = read_header(src)
    if img_h["dim"] == 3 and geometry_mismatch(img_h, lab_h) and tuple(img_h["size"]) == tuple(lab_h["size"]):
        close = all(abs(a - b) <= GEOMETRY_FIX_RTOL * max(1.0, abs(a), abs(b))
                    for key in ("spacing", "origin", "direction") for a, b in zip(img_h[key], lab_h[key]))
        if close:
            log.warning("%s: header differs slightly from its image; using the image's geometry", src)
            out_img.SetSpacing(img_h["spacing"])
            out_img.SetOrigin(img_h["origin"])
            out_img.SetDirection(img_h["direction"])
    sitk.WriteImage(out_img, str(out), useCompression=True)


def import_dataset(
    fmt: str, src: str | os.PathLike, dst: str | os.PathLike, modality: str | None = None,
    subset: int | None = None, progress: bool = True, force: bool = False,
) -> str:
    """Convert the dataset at ``src`` (layout ``fmt``) into an nnU-Net raw dataset at ``dst``.

    Returns a one-paragraph summary. The result is validated before it replaces ``dst``, which
    must be new, empty or a dataset an earlier `masksam data` run wrote (``force``: any folder
    outside ``src``).
    """
    from masksam.components.data.manifest import write_manifest
    from masksam.components.data.validate import validate_dataset

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"SRC {src}: folder not found")
    if modality is not None and fmt != "amos":
        raise UserError(f"--modality applies to --format amos only (got --format {fmt})")
    if subset is not None and fmt != "synapse":
        raise UserError(f"--subset applies to --format synapse only (got --format {fmt})")
    check_output_dir(dst, "data", inputs=(src,), force=force, what="DST")
    if fmt == "nnunet":
        plan = plan_nnunet(src)
    elif fmt == "msd":
        plan = plan_msd(src)
    elif fmt == "amos":
        plan = plan_amos(src, modality or "ct")
    elif fmt == "synapse":
        plan = plan_synapse(src, subset)
    elif fmt == "acdc":
        plan = plan_acdc(src)
    else:
        raise UserError(f"unknown format {fmt!r}; choose nnunet, msd, amos, synapse or acdc")
    seen: set[str] = set()
    for c in plan.cases:
        if c.case in seen:
            raise UserError(f"{src}: two source cases map to the case id {c.case!r}")
        seen.add(c.case)

    n_ch = len(plan.channel_names)
    train = [c for c in plan.cases if not c.test]
    with owned_output_dir(dst, "data", inputs=(src,), force=force, what="DST") as tmp:
        for sub in ("imagesTr", "labelsTr"):
            (tmp / sub).mkdir()
        if any(c.test for c in plan.cases):
            (tmp / "imagesTs").mkdir()
        for spec in tqdm(plan.cases, desc=f"import {fmt}", unit="case", disable=not progress):
            out_dir = tmp / ("imagesTs" if spec.test else "imagesTr")
            written = _write_channels(spec, n_ch, out_dir)
            if not spec.test:
                _write_label(spec.label, written[0], plan.relabel, tmp / "labelsTr" / f"{spec.case}.nii.gz")
        meta = {
            "name": plan.name,
            "channel_names": plan.channel_names,
            "labels": plan.labels,
            "numTraining": len(train),
            "file_ending": ".nii.gz",
            **{k: v for k, v in plan.extra.items() if v not in ("", None)},
        }
        meta["source"] = f"masksam data import --format {fmt}" + (f" --modality {modality}" if modality else "") + \
            (f" --subset {subset}" if subset else "") + f" from {src.resolve()}"
        write_json(tmp / "dataset.json", meta)
        report = validate_dataset(tmp, progress=False)
        if not report.ok:
            raise UserError(f"the import of {src} does not validate (nothing was written to {dst}):\n"
                            + "\n".join(f"  {p}" for p in report.errors[:30]))
        for w in report.warnings:
            log.warning("%s", w)
        manifest = write_manifest(tmp, progress=False)
    n_test = len(plan.cases) - len(train)
    return (f"{dst}: {len(train)} training case(s)" + (f", {n_test} unlabelled test case(s)" if n_test else "")
            + f", {len(plan.labels) - 1} foreground labels, dataset sha256 {manifest['dataset_sha256'][:12]}")
