"""Label maps that open by name: the .seg.nrrd read back by slicerio (3D Slicer's own reader),
the colour table and the ITK-SNAP label file."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from masksam.components._viewer_files import (ITKSNAP_LABELS, SLICER_COLOUR_TABLE, label_colour, write_label_tables,
                                              write_seg_nrrd)

LABELS = {"background": 0, "liver": 1, "spleen": 2, "left kidney": 3}


def _labels_image() -> sitk.Image:
    array = np.zeros((6, 10, 12), np.uint8)
    array[1:3, 2:5, 3:7] = 1
    array[4, 6:9, 8:11] = 2  # label 3 (left kidney) is absent from this case
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def test_seg_nrrd_reads_back_in_slicerio_with_names_values_and_colours(tmp_path):
    import slicerio

    image = _labels_image()
    path = write_seg_nrrd(image, LABELS, tmp_path / "case.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(seg) == ["liver", "spleen", "left kidney"]
    liver = slicerio.segment_from_name(seg, "liver")
    assert liver["labelValue"] == 1
    assert np.allclose(liver["color"], np.array(label_colour(1)) / 255, atol=1e-5)
    assert slicerio.segment_from_name(seg, "spleen")["extent"] == [8, 10, 6, 8, 4, 4]
    # the voxels and the geometry are the prediction's, unchanged
    back = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.allclose(back.GetOrigin(), image.GetOrigin())
    assert np.allclose(back.GetDirection(), image.GetDirection())
    assert not list(tmp_path.glob(".*"))  # no temporary left behind


def test_seg_nrrd_needs_its_suffix(tmp_path):
    with pytest.raises(ValueError, match="seg.nrrd"):
        write_seg_nrrd(_labels_image(), LABELS, tmp_path / "case.nrrd")


def test_colour_table_and_itksnap_file_name_every_structure(tmp_path):
    ctbl, snap = write_label_tables(LABELS, tmp_path)
    assert (ctbl.name, snap.name) == (SLICER_COLOUR_TABLE, ITKSNAP_LABELS)
    rows = [line.split() for line in ctbl.read_text().splitlines() if not line.startswith("#")]
    assert [(int(r[0]), r[1]) for r in rows] == [(0, "background"), (1, "liver"), (2, "spleen"),
                                                   (3, "left_kidney")]
    assert tuple(int(v) for v in rows[2][2:5]) == label_colour(2)
    text = snap.read_text()
    assert '"left kidney"' in text and '"Clear Label"' in text
    line = next(line for line in text.splitlines() if '"spleen"' in line).split()
    assert int(line[0]) == 2 and tuple(int(v) for v in line[1:4]) == label_colour(2)
