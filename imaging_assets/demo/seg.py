"""DICOM SEG writing for the demo cohort (highdicom), made byte-deterministic.

highdicom stamps ``InstanceCreationDate/Time`` (and ``ContentDate/Time`` when not given) with the
current time and draws a random ``DimensionOrganizationUID``; :func:`build_seg` overwrites all of them
with caller-supplied values so that a seed always gives the same bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


def build_seg(
    ct_datasets: Sequence[Dataset],
    masks: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    dimension_organization_uid: str,
    series_number: int,
    content_date: str,
    content_time: str,
    manufacturer: str,
    implementation_class_uid: str,
) -> Dataset:
    """Build a BINARY DICOM SEG with one segment per (non-overlapping) mask.

    Parameters
    ----------
    ct_datasets : sequence of pydicom.dataset.Dataset
        Source image slices in the order of the masks' first axis.
    masks : sequence of numpy.ndarray
        ``(slices, rows, columns)`` boolean masks, one per segment (segment numbers 1..n in order).
    labels : sequence of str
        Segment labels.
    series_instance_uid, sop_instance_uid, dimension_organization_uid : str
        Deterministic UIDs for the new object.
    series_number : int
    content_date, content_time : str
        DICOM DA / TM strings used for content, series and instance-creation date/time.
    manufacturer : str
    implementation_class_uid : str
        File meta ImplementationClassUID.

    Returns
    -------
    highdicom.seg.Segmentation
        The segmentation dataset, ready for ``save_as``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if len(masks) != len(labels):
        raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
    labelmap = np.zeros(masks[0].shape, dtype=np.uint8)
    for n, m in enumerate(masks, start=1):
        if np.any(labelmap[m]):
            raise ValueError(f"segment {n} overlaps another segment")
        labelmap[m] = n
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, label in enumerate(labels, start=1)
    ]
    hd_logger = logging.getLogger("highdicom")
    previous_level = hd_logger.level
    if hd_logger.getEffectiveLevel() < logging.WARNING:
        hd_logger.setLevel(logging.WARNING)  # highdicom logs every copied module at INFO
    try:
        seg = _segmentation(hd, ct_datasets, labelmap, descriptions, series_instance_uid,
                            series_number, sop_instance_uid, manufacturer)
    finally:
        hd_logger.setLevel(previous_level)
    # Determinism: replace everything highdicom derived from the clock or a random UID.
    seg.InstanceCreationDate = content_date
    seg.InstanceCreationTime = content_time
    seg.ContentDate = content_date
    seg.ContentTime = content_time
    seg.SeriesDate = content_date
    seg.SeriesTime = content_time
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_organization_uid
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dimension_organization_uid
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{content_date}{content_time}"
    seg.file_meta.ImplementationClassUID = implementation_class_uid
    seg.file_meta.ImplementationVersionName = "IA_DEMO_1"
    return seg


def _segmentation(
    hd: Any,
    ct_datasets: Sequence[Dataset],
    labelmap: np.ndarray,
    descriptions: list[Any],
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    manufacturer: str,
) -> Dataset:
    return hd.seg.Segmentation(
        source_images=list(ct_datasets),
        pixel_array=labelmap,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="Demo contouring",
        software_versions="1",
        device_serial_number="DEMO-0001",
        content_label="LESIONS",
        content_description="Lesion segmentation",
        omit_empty_frames=True,
    )
