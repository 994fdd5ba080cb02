"""Confusion-matrix metrics: exact values, absent classes excluded, never NaN."""

import numpy as np
import pytest
import torch

from train_enhanced_adaptivestream import confusion_matrix, format_table, summarize


def test_confusion_matrix_counts_and_drops_ignored_pixels():
    target = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    cm = confusion_matrix(pred, target, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_miou_excludes_classes_absent_from_target_and_prediction():
    seg_cm = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 never appears
    cls_cm = np.array([[2, 0], [1, 1]])
    scores = summarize(seg_cm, cls_cm)
    assert scores["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert scores["pixel_acc"] == pytest.approx(5 / 6)
    assert scores["cls_acc"] == pytest.approx(3 / 4)
    f1_0, f1_1 = 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5
    assert scores["cls_f1"] == pytest.approx((f1_0 + f1_1) / 2)


def test_empty_confusion_matrix_gives_zero_not_nan():
    scores = summarize(np.zeros((3, 3), int), np.zeros((2, 2), int))
    assert scores == {"miou": 0.0, "pixel_acc": 0.0, "cls_acc": 0.0, "cls_f1": 0.0}


def test_table_names_every_class_and_marks_absent_ones():
    table = format_table("seg", np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]]), ["bg", "face", "hat"], "IoU")
    lines = table.splitlines()
    assert lines[2].split()[:2] == ["bg", "4"] and lines[2].split()[-1] == "0.750"
    assert lines[4].split() == ["hat", "0", "-", "-", "-"]


def test_confusion_matrix_has_no_data_dependent_shape_so_no_host_sync():
    """Boolean indexing (nonzero) and bincount size their output from the data: on CUDA both wait for the GPU."""
    from torch.profiler import ProfilerActivity, profile

    target = torch.tensor([0, 0, 1, 1, 255, 2, 7])  # 7: out of range, dropped like the ignored 255
    pred = torch.tensor([0, 1, 1, 1, 0, 0, 2])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cm = confusion_matrix(pred, target, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    names = {e.name for e in prof.events()}
    assert not names & {"aten::nonzero", "aten::bincount", "aten::masked_select"}, names
