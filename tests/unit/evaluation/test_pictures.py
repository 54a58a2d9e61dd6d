"""Drawn detections (colour by class index, labels inside the image, legend, mask outlines) and eval's charts."""

import numpy as np
import torch
from PIL import Image

from cachedet.core.plots import plot_per_class_ap, plot_pr_curves
from cachedet.evaluation.draw import PALETTE, class_color, draw_detections, mask_outlines


def test_colours_follow_the_class_index_and_labels_stay_inside(tmp_path):
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(tmp_path / "a.png")
    dets = [
        {
            "image_id": 0,
            "category_id": 7,
            "category_name": "red_square",
            "bbox": [70, 0, 9, 9],
            "score": 0.9,
        }
    ]
    out = draw_detections([tmp_path / "a.png"], dets, str(tmp_path / "pics"), category_ids=[7, 3])
    pic = np.asarray(Image.open(out[0]).convert("RGB"))
    assert pic.shape[0] == 60 and pic.shape[1] > 80  # the legend panel on the right
    assert (
        tuple(pic[8, 75]) == class_color(0) == PALETTE[0]
    )  # the box's bottom edge, colour of index 0, not id 7
    label = np.all(pic[:, :80] == PALETTE[0], axis=-1)
    assert (
        label[:, 79].any() and label[0].any()
    )  # the label's background is pushed inside the right and top edges
    legend = pic[:, 80:]
    assert np.all(legend == PALETTE[0], axis=-1).sum() > 20  # the legend's swatch
    assert class_color(len(PALETTE)) == PALETTE[0]


def test_mask_outlines_are_the_boundary():
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 2:7, 2:7] = True
    edge = mask_outlines(m)[0]
    assert edge.sum() == 16 and not edge[4, 4] and edge[2, 4] and not edge[1, 4]


def test_eval_charts_are_pngs(tmp_path):
    rows = [
        {"category_id": 1, "name": "a", "AP": 50.0, "mask_AP": 40.0},
        {"category_id": 2, "name": "b", "AP": None},
    ]
    precision = np.linspace(1, 0, 101)[None, :, None].repeat(10, 0).repeat(2, 2)
    precision[:, :, 1] = -1  # no ground truth of class b
    for path in (
        plot_per_class_ap(rows, str(tmp_path / "ap.png")),
        plot_pr_curves(precision, ["a", "b"], str(tmp_path / "pr.png")),
    ):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300
