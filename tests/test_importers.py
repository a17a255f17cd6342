"""Importers: small fake trees in each public layout convert into a validating raw dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.cli import main
from masksam.components.data.importers import import_dataset
from masksam.components.data.manifest import verify_manifest
from masksam.components.data.validate import validate_dataset
from masksam.errors import UserError

from _data_helpers import case_arrays, image, make_dataset


def _write(arr, path: Path, **geo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image(arr, **geo), str(path))


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _ok(dst: Path) -> dict:
    r = validate_dataset(dst, progress=False)
    assert r.ok, r.format()
    assert verify_manifest(dst, progress=False).ok
    return json.loads((dst / "dataset.json").read_text())


def test_msd_multimodal_4d_split_into_channels(tmp_path):
    src = tmp_path / "Task01_BrainTumour"
    train = []
    for i in (1, 2):
        chans = [image((case_arrays(i)[0] + 1000 * c).astype(np.int16)) for c in range(2)]
        (src / "imagesTr").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.JoinSeries(chans), str(src / "imagesTr" / f"BRATS_{i:03d}.nii.gz"))
        _write(case_arrays(i)[1], src / "labelsTr" / f"BRATS_{i:03d}.nii.gz")
        train.append({"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"})
    (src / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    (src / "imagesTs").mkdir()
    sitk.WriteImage(sitk.JoinSeries([image(case_arrays(9)[0])] * 2), str(src / "imagesTs" / "BRATS_900.nii.gz"))
    (src / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor"},
        "numTraining": 2, "training": train, "test": ["./imagesTs/BRATS_900.nii.gz"]}))
    dst = tmp_path / "out"
    import_dataset("msd", src, dst, progress=False)
    meta = _ok(dst)
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert meta["labels"] == {"background": 0, "edema": 1, "non_enhancing_tumor": 2}
    c1 = _arr(dst / "imagesTr" / "BRATS_002_0001.nii.gz")
    assert np.array_equal(c1, case_arrays(2)[0] + 1000)
    ref = sitk.ReadImage(str(dst / "imagesTr" / "BRATS_002_0000.nii.gz"))
    assert ref.GetSpacing() == pytest.approx((0.8, 0.8, 2.5)) and ref.GetDimension() == 3
    assert (dst / "imagesTs" / "BRATS_900_0001.nii.gz").is_file()


def test_amos_modality_filter(tmp_path):
    src = tmp_path / "amos22"
    for case, folder in (("amos_0001", "Tr"), ("amos_0002", "Va"), ("amos_0540", "Tr")):
        img, lab = case_arrays(int(case[-4:]))
        lab[0, 0, 0] = 15
        _write(img, src / f"images{folder}" / f"{case}.nii.gz")
        _write(lab, src / f"labels{folder}" / f"{case}.nii.gz")
    _write(case_arrays(5)[0], src / "imagesTs" / "amos_0600.nii.gz")
    (src / "dataset.json").write_text(json.dumps({"labels": {"0": "background", **{
        str(i + 1): n for i, n in enumerate(["spleen", "right kidney", "left kidney", "gall bladder", "esophagus",
                                             "liver", "stomach", "arota", "postcava", "pancreas", "right adrenal gland",
                                             "left adrenal gland", "duodenum", "bladder", "prostate/uterus"])}}}))
    ct = tmp_path / "ct"
    import_dataset("amos", src, ct, progress=False)
    meta = _ok(ct)
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 2
    assert sorted(p.name for p in (ct / "labelsTr").iterdir()) == ["amos_0001.nii.gz", "amos_0002.nii.gz"]
    assert len(meta["labels"]) == 16 and meta["labels"]["prostate_uterus"] == 15
    assert not (ct / "imagesTs").exists()
    mr = tmp_path / "mr"
    assert main(["data", "import", "--format", "amos", str(src), str(mr), "--modality", "mr", "--no-progress"]) == 0
    meta = _ok(mr)
    assert meta["channel_names"] == {"0": "MRI"} and meta["numTraining"] == 1
    assert (mr / "imagesTs" / "amos_0600_0000.nii.gz").is_file()


def test_synapse_full_and_transunet_subset(tmp_path):
    src = tmp_path / "Abdomen"
    for n in ("0001", "0005", "0022"):
        img, _ = case_arrays(int(n))
        lab = np.zeros_like(img, np.uint8)
        lab.flat[:14] = np.arange(14)  # every BTCV value 0..13 once
        _write(img, src / "RawData" / "Training" / "img" / f"img{n}.nii.gz")
        _write(lab, src / "RawData" / "Training" / "label" / f"label{n}.nii.gz")
    _write(case_arrays(61)[0], src / "RawData" / "Testing" / "img" / "img0061.nii.gz")
    full = tmp_path / "full"
    import_dataset("synapse", src, full, progress=False)
    meta = _ok(full)
    assert len(meta["labels"]) == 14 and meta["labels"]["portal_vein_and_splenic_vein"] == 10
    assert meta["fixed_test_cases"] == ["case0001", "case0022"]
    assert (full / "imagesTs" / "case0061_0000.nii.gz").is_file()

    sub = tmp_path / "sub8"
    import_dataset("synapse", src / "RawData", sub, subset=8, progress=False)
    meta = _ok(sub)
    assert list(meta["labels"]) == ["background", "aorta", "gallbladder", "left_kidney", "right_kidney", "liver",
                                    "pancreas", "spleen", "stomach"]
    out = _arr(sub / "labelsTr" / "case0005.nii.gz").flat[:14]
    #              BTCV: 0  1  2  3  4  5  6  7  8  9 10 11 12 13
    assert list(out) == [0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0]


def _acdc_patient(root: Path, pid: str, ed: int, es: int, gt: bool = True) -> None:
    pdir = root / pid
    pdir.mkdir(parents=True)
    (pdir / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
    for f in (ed, es):
        img, lab = case_arrays(f)
        lab[lab == 2] = 3
        _write(img, pdir / f"{pid}_frame{f:02d}.nii.gz", spacing=(1.5, 1.5, 10.0))
        if gt:
            _write(lab, pdir / f"{pid}_frame{f:02d}_gt.nii.gz", spacing=(1.5, 1.5, 10.0))
    (pdir / f"{pid}_4d.nii.gz").write_bytes(b"ignored")


def test_acdc_ed_es_and_fixed_test_split(tmp_path):
    src = tmp_path / "ACDC" / "database"
    _acdc_patient(src / "training", "patient001", 1, 12)
    _acdc_patient(src / "training", "patient002", 1, 9)
    _acdc_patient(src / "testing", "patient101", 1, 14)
    dst = tmp_path / "acdc"
    import_dataset("acdc", tmp_path / "ACDC", dst, progress=False)
    meta = _ok(dst)
    assert meta["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert meta["channel_names"] == {"0": "MRI"} and meta["numTraining"] == 6
    assert meta["fixed_test_cases"] == ["patient101_ED", "patient101_ES"]
    assert np.array_equal(_arr(dst / "imagesTr" / "patient001_ES_0000.nii.gz"), case_arrays(12)[0])

    bad = tmp_path / "bad"
    _acdc_patient(bad / "training", "patient003", 1, 5)
    (bad / "training" / "patient003" / "Info.cfg").write_text("Group: NOR\n")
    with pytest.raises(UserError, match="Info.cfg.*'ED"):
        import_dataset("acdc", bad, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_nnunet_copy_and_refusals(tmp_path):
    src = make_dataset(tmp_path / "Dataset001_Tiny", n=2)
    dst = tmp_path / "copy"
    import_dataset("nnunet", src, dst, progress=False)
    meta = _ok(dst)
    assert meta["numTraining"] == 2 and "nnunet" in meta["source"]
    assert (dst / "imagesTr" / "case_001_0000.nii.gz").read_bytes() == (src / "imagesTr" / "case_001_0000.nii.gz").read_bytes()
    # re-import over a dataset replaces it; over other content or inside SRC is refused
    import_dataset("nnunet", src, dst, progress=False)
    with pytest.raises(UserError, match="overlaps"):
        import_dataset("nnunet", src, src / "sub", progress=False)
    with pytest.raises(UserError, match="amos only"):
        import_dataset("nnunet", src, tmp_path / "x", modality="mr", progress=False)
    (src / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(UserError, match="label file is missing"):
        import_dataset("nnunet", src, tmp_path / "y", progress=False)


def test_label_header_noise_snaps_but_real_mismatch_fails(tmp_path):
    src = tmp_path / "Abdomen" / "RawData" / "Training"
    img, lab = case_arrays(1)
    _write(img, src / "img" / "img0001.nii.gz")
    _write(lab, src / "label" / "label0001.nii.gz", spacing=(0.8 * (1 + 3e-3), 0.8, 2.5))
    import_dataset("synapse", tmp_path / "Abdomen", tmp_path / "snapped", progress=False)
    _ok(tmp_path / "snapped")
    _write(lab, src / "label" / "label0001.nii.gz", spacing=(1.6, 0.8, 2.5))
    with pytest.raises(UserError, match=r"(?s)does not validate.*spacing"):
        import_dataset("synapse", tmp_path / "Abdomen", tmp_path / "bad", progress=False)
