"""Mask heads: the mask branch, mask targets in every feed, mask AP (COCO and LVIS), predict's RLE masks."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import edit_json, small_config, to_lvis
from pycocotools import mask as mask_utils
from torchvision.ops import roi_align

from cachedet.api import evaluate
from cachedet.cache.dataset import CachedViews, InMemoryViews
from cachedet.cache.feature_crop import crop_batch
from cachedet.cache.store import FeatureStore
from cachedet.core.errors import CachedetError
from cachedet.core.structures import FeatureSpec
from cachedet.data.coco import load_detection_dataset
from cachedet.data.masks import decode_segmentation, mask_to_canvas, rle_json
from cachedet.data.online import OnlineViews
from cachedet.data.views import AugmentConfig, plan_view, transform_boxes
from cachedet.engine.train import TrainConfig, train
from cachedet.evaluation.predictor import Predictor
from cachedet.evaluation.scoring import coco_evaluate, lvis_evaluate
from cachedet.extraction.run import extract
from cachedet.models.detector import DetectorConfig, build_detector

LIGHT = {
    "box_convs": 0,
    "box_fcs": 2,
    "box_representation": 64,
    "rois_per_image": 32,
    "proposals_per_image": 50,
    "mask_convs": 1,
    "mask_channels": 16,
}


def mask_config(out: str, **settings) -> TrainConfig:
    """The module's light Mask R-CNN run: 1 epoch at batch 4, a 16-channel neck, the LIGHT heads,
    1 warm-up step; ``settings`` (flat TrainConfig names) override or add."""
    light = dict(masks=True, epochs=1, batch_size=4, neck_channels=16, warmup_steps=1)
    return TrainConfig.of(out=out, **{**light, "detector_options": dict(LIGHT), **settings})


def masks_as_detections(data: dict, shift: int = 0) -> list[dict]:
    """The ground truth as results: box and RLE mask of every object (the mask moved ``shift`` px right)."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    out = []
    for a in data["annotations"]:
        h, w = sizes[a["image_id"]]
        m = decode_segmentation(a["segmentation"], h, w, None).astype(bool)
        m = np.roll(m, shift, axis=1)
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": list(a["bbox"]),
                "score": 0.9,
                "segmentation": rle_json(m),
            }
        )
    return out


@pytest.fixture(scope="module")
def val_data(synthetic):
    return json.load(open(synthetic["val"]))


def test_ground_truth_masks_score_mask_ap_100_on_coco_and_lvis(val_data, tmp_path):
    perfect = masks_as_detections(val_data)
    assert coco_evaluate(val_data, perfect, "segm")["summary"]["AP"] == pytest.approx(100.0)
    shifted = masks_as_detections(val_data, shift=4)  # same boxes, masks moved: only mask AP drops
    assert coco_evaluate(val_data, shifted, "segm")["summary"]["AP"] < 90.0
    assert coco_evaluate(val_data, shifted, "bbox")["summary"]["AP"] == pytest.approx(100.0)
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(to_lvis(val_data)))
    lvis = lvis_evaluate(str(path), perfect, "segm")["summary"]
    assert lvis["AP"] == pytest.approx(100.0) and {"APr", "APc", "APf"} <= lvis.keys()
    assert lvis_evaluate(str(path), shifted, "segm")["summary"]["AP"] < 90.0


SPECS = (FeatureSpec("c3", 16, 8), FeatureSpec("c4", 24, 16), FeatureSpec("c5", 32, 32))


@pytest.mark.parametrize(
    "neck,head", [("fpn", "faster-rcnn"), ("fpn", "cascade"), ("nasfpn", "cascade")]
)
def test_mask_branch_trains_and_predicts_masks(neck, head):
    torch.manual_seed(0)
    det = build_detector(
        DetectorConfig(
            num_classes=3,
            canvas=64,
            in_specs=SPECS,
            neck=neck,
            head=head,
            neck_channels=16,
            masks=True,
            options={**LIGHT, "nasfpn_repeats": 1},
        )
    )
    feats = {
        "c3": torch.randn(2, 16, 8, 8),
        "c4": torch.randn(2, 24, 4, 4),
        "c5": torch.randn(2, 32, 2, 2),
    }
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40] = 1
    masks[1, 32:60, 20:50] = 1
    target = {
        "boxes": torch.tensor([[10.0, 8, 40, 30], [20, 32, 50, 60]]),
        "labels": torch.tensor([0, 2]),
        "masks": masks,
    }
    losses = det(feats, [target, target])
    assert (
        set(losses) == set(det.loss_names)
        and "loss_mask" in losses
        and torch.isfinite(losses["loss_mask"])
    )
    losses["loss_mask"].backward()
    assert det.head.mask_branch.predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    out = det.predict(feats)
    for d in out:
        assert (
            d["masks"].shape == (len(d["boxes"]), 1, 28, 28)
            and 0 <= d["masks"].min()
            and d["masks"].max() <= 1
        )
    with pytest.raises(CachedetError, match="retinanet"):
        build_detector(
            DetectorConfig(num_classes=3, canvas=64, in_specs=SPECS, head="retinanet", masks=True)
        )


@pytest.fixture(scope="module")
def mask_store(synthetic, tmp_path_factory):
    cfg = small_config(synthetic, str(tmp_path_factory.mktemp("masks") / "s.zarr"), views=2)
    extract(cfg, progress=False)
    return cfg


@pytest.mark.parametrize("feed", [CachedViews, InMemoryViews])
def test_feeds_carry_the_stored_masks_and_crops_cut_them(feed, mask_store):
    store = FeatureStore(mask_store.out)
    samples = list(feed(mask_store.out, views_per_epoch=2, masks=True))
    assert len(samples) == store.num_views
    for s in samples:
        assert len(s["masks"]) == len(s["boxes"])
        np.testing.assert_array_equal(s["masks"].numpy(), store.masks(s["view"]))
    assert "masks" not in next(iter(feed(mask_store.out)))  # off unless asked for
    batch = {
        "inputs": {
            k: torch.stack([s["features"][k] for s in samples[:4]]) for k in samples[0]["features"]
        },
        "targets": [{k: s[k] for k in ("boxes", "labels", "masks")} for s in samples[:4]],
    }
    cropped = crop_batch(batch, store.specs, 0.5, np.random.default_rng(3))
    (h, w), offsets = cropped["image_sizes"][0], cropped["crop_offsets"]
    for t, full, (y0, x0) in zip(cropped["targets"], batch["targets"], offsets):
        keep = [i for i, b in enumerate(full["boxes"]) if _box_kept(b, y0, x0, h, w)]
        assert len(t["boxes"]) == len(keep)
        assert torch.equal(t["masks"], full["masks"][keep][:, y0 : y0 + h, x0 : x0 + w])


def _box_kept(box, y0, x0, h, w) -> bool:
    x1, y1, x2, y2 = box.tolist()
    return min(x2, x0 + w) - max(x1, x0) >= 1 and min(y2, y0 + h) - max(y1, y0) >= 1


def test_online_masks_equal_the_cached_masks_of_the_same_view(mask_store):
    ds = load_detection_dataset(mask_store.annotations, mask_store.images)
    online = OnlineViews(ds, mask_store.augment, (0, 0, 0), (1, 1, 1), masks=True)
    store = FeatureStore(mask_store.out)
    first_views = {
        (int(store.meta["image_id"][v]), int(store.meta["view_index"][v])): v
        for v in range(store.num_views)
    }
    for i, rec in enumerate(ds.images):
        item = online[i]  # epoch 0 draws view index 0, the view the cache stores first
        np.testing.assert_array_equal(item["masks"].numpy(), store.masks(first_views[(rec.id, 0)]))


def test_predicted_masks_map_back_onto_the_image_masks(synthetic):
    """Ground-truth canvas masks, resampled to 28x28 inside their boxes (Mask R-CNN's target), pasted
    back by the predictor overlap the annotated masks, through flipped, scaled and cropped views."""
    ds = load_detection_dataset(synthetic["val"], synthetic["images"])
    ious = []
    for k, rec in enumerate(ds.images):
        for cfg in (
            AugmentConfig(size=160, augment=False),
            AugmentConfig(size=160, seed=k, scale_range=(1.0, 1.6)),
        ):
            p = plan_view(cfg, rec.id, 0, rec.height, rec.width)
            boxes, _, ids = transform_boxes(p, rec.boxes, rec.labels, rec.ann_ids)
            for box, ann_id in zip(boxes, ids.tolist()):
                i = list(rec.ann_ids).index(ann_id)
                source = decode_segmentation(rec.segmentations[i], rec.height, rec.width, None)
                canvas = torch.from_numpy(mask_to_canvas(p, source)).float()[None, None]
                if (box[2] - box[0]) * (box[3] - box[1]) < 64 or not (
                    (box >= 0.5).all() and (box <= 159.5).all()
                ):
                    continue  # tiny, or cut by the crop (a cut mask cannot come back whole)
                probs = roi_align(
                    canvas, [torch.from_numpy(box)[None]], (28, 28), 1.0, 2, aligned=False
                )
                pasted = next(Predictor._image_masks(p, torch.from_numpy(box)[None], probs))
                inter = (pasted & (source > 0)).sum()
                ious.append(inter / ((pasted | (source > 0)).sum()))
    assert len(ious) > 10 and np.mean(ious) > 0.85 and min(ious) > 0.6


@pytest.fixture(scope="module")
def mask_run(mask_store, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("maskrun") / "run")
    train(
        mask_config(
            out=run,
            cache=mask_store.out,
        ),
        progress=False,
    )
    return run


def test_train_masks_then_eval_box_and_mask_ap_on_coco_and_lvis(mask_run, synthetic, cli, tmp_path):
    records = [json.loads(line) for line in open(os.path.join(mask_run, "metrics.jsonl"))]
    assert all("loss_mask" in r and np.isfinite(r["loss_mask"]) for r in records)
    r = cli(
        "eval",
        "--run",
        mask_run,
        "--annotations",
        synthetic["val"],
        "--images",
        synthetic["images"],
        "--train-annotations",
        synthetic["train"],
        "--out",
        tmp_path / "m.json",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    assert "box and mask AP" in r.stdout and "mask AP" in r.stdout
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"AP", "AP50", "APs"} <= m["segm"].keys() and m["mask_by_size"].keys() == {
        "APs",
        "APm",
        "APl",
    }
    assert all("mask_AP" in row for row in m["per_class"]) and all(
        "mask_AP" in row for row in m["by_train_count"]
    )
    dets = json.loads((tmp_path / "m.detections.json").read_text())
    assert dets and all("segmentation" in d for d in dets)
    # the same detections, scored by pycocotools directly
    assert m["segm"]["AP"] == pytest.approx(
        coco_evaluate(json.load(open(synthetic["val"])), dets, "segm")["summary"]["AP"]
    )
    lvis_path = os.path.join(synthetic["images"], "lvis_val.json")
    with open(lvis_path, "w") as f:
        json.dump(to_lvis(json.load(open(synthetic["val"]))), f)
    metrics, _ = evaluate(mask_run, lvis_path, synthetic["images"], progress=False)
    assert {"APr", "APc", "APf"} <= metrics["lvis_segm"].keys() and {
        "APr",
        "APc",
        "APf",
    } <= metrics["lvis_bbox"].keys()


def test_cascade_mask_run_evaluates_from_a_val_cache(mask_store, synthetic, tmp_path):
    run = str(tmp_path / "cascade")
    train(
        mask_config(
            out=run,
            cache=mask_store.out,
            head="cascade",
        ),
        progress=False,
    )
    val = small_config(
        synthetic,
        str(tmp_path / "val.zarr"),
        annotations=synthetic["val"],
        views=1,
        augment=AugmentConfig(size=96, augment=False),
    )
    extract(val, progress=False)
    metrics, dets = evaluate(run, synthetic["val"], cache=val.out, progress=False)
    assert metrics["source"] == "cache" and "segm" in metrics and dets and "segmentation" in dets[0]
    h, w = next(
        (im["height"], im["width"])
        for im in json.load(open(synthetic["val"]))["images"]
        if im["id"] == dets[0]["image_id"]
    )
    assert dets[0]["segmentation"]["size"] == [h, w]


def test_predict_writes_rle_masks_and_draws_them(mask_run, synthetic, cli, tmp_path):
    val_dir = os.path.join(synthetic["images"], "val")
    r = cli(
        "predict",
        val_dir,
        "--run",
        mask_run,
        "--out",
        tmp_path / "dets.json",
        "--draw",
        tmp_path / "pics",
        "--score-threshold",
        0.0,
    )
    assert r.exit_code == 0, r.output
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert dets and all(set(d["segmentation"]) == {"size", "counts"} for d in dets)
    m = mask_utils.decode(
        {
            "size": dets[0]["segmentation"]["size"],
            "counts": dets[0]["segmentation"]["counts"].encode(),
        }
    )
    assert m.shape == tuple(dets[0]["segmentation"]["size"])
    drawn = [f for _, _, files in os.walk(tmp_path / "pics") for f in files]  # mirrors val/
    assert len(drawn) == len(os.listdir(val_dir))


def test_masks_without_segmentation_train_boxes_with_a_notice(dataset_copy, tmp_path):
    edit_json(dataset_copy["train"], lambda d: [a.pop("segmentation") for a in d["annotations"]])
    cfg = small_config(dataset_copy, str(tmp_path / "boxes.zarr"), views=1)
    extract(cfg, progress=False)
    run = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="masks are off, this run trains boxes only"):
        train(
            mask_config(
                out=run,
                cache=cfg.out,
            ),
            progress=False,
        )
    assert not torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=False)["run"][
        "detector"
    ]["masks"]
    assert all(
        "loss_mask" not in json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))
    )


def test_resuming_with_another_masks_setting_is_refused(mask_run, mask_store):
    with pytest.raises(
        CachedetError, match="other settings than given \\(detector.masks: run True, given False\\)"
    ):
        train(
            mask_config(
                out=mask_run,
                cache=mask_store.out,
                masks=False,
                epochs=2,
                resume=True,
            ),
            progress=False,
        )


@pytest.mark.parametrize("trainable", [False, True], ids=["online", "fine-tuned"])
def test_online_and_fine_tuned_regimes_train_masks(synthetic, tmp_path, trainable):
    run = str(tmp_path / "run")
    train(
        mask_config(
            out=run,
            online=True,
            annotations=synthetic["train"],
            images=synthetic["images"],
            backbone="test_resnet",
            weights="random",
            size=96,
            backbone_trainable=trainable,
            max_steps_per_epoch=2,
        ),
        progress=False,
    )
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(records) == 2 and all(np.isfinite(r["loss_mask"]) for r in records)


def test_a_detection_in_the_canvas_padding_is_dropped_with_its_mask(mask_run):
    predictor = Predictor(mask_run, need_backbone=False)
    p = plan_view(
        AugmentConfig(size=96, augment=False), 7, 0, 40, 96
    )  # a wide image: rows 40.. of the canvas are padding
    det = {
        "boxes": torch.tensor([[10.0, 5, 30, 30], [10, 60, 30, 90]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
        "masks": torch.ones(2, 1, 28, 28),
    }
    results = predictor._to_results([p], [det])
    assert len(results) == 1 and results[0]["category_id"] == predictor.categories.to_id(1)
    mask = mask_utils.decode(
        {"size": [40, 96], "counts": results[0]["segmentation"]["counts"].encode()}
    )
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 5, 29)  # the box, filled


def test_the_mask_branch_leaves_the_box_parts_initialised_as_without_it():
    cfg = DetectorConfig(
        num_classes=3, canvas=64, in_specs=SPECS, neck_channels=16, options=dict(LIGHT)
    )
    states = []
    for masks in (False, True):
        torch.manual_seed(0)
        states.append(build_detector(replace(cfg, masks=masks)).state_dict())
    boxes, with_masks = states
    assert set(boxes) < set(with_masks) and any("mask" in k for k in set(with_masks) - set(boxes))
    for k, v in boxes.items():
        assert torch.equal(v, with_masks[k]), k
