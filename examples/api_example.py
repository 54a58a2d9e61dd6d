"""cachedet from Python: cache features, train heads, predict, evaluate and export.

Runs in under a minute on a CPU: generated shapes and timm's tiny random-weight ``test_resnet``.
For real work pass your COCO/LVIS files and a pretrained backbone (e.g. "resnet50", size 1024).
Usage: python examples/api_example.py [WORKDIR]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

import cachedet
from cachedet.data.synthetic import SyntheticSpec, make_synthetic_dataset

work = Path(sys.argv[1] if len(sys.argv) > 1 else "api-example")
data = make_synthetic_dataset(
    str(work / "data"), SyntheticSpec(num_train=12, num_val=4, max_side=160)
)

# Stage 1: backbone features of 2 augmented views per image into a zarr store.
cachedet.extract(
    cachedet.ExtractConfig(
        annotations=data["train"],
        images=data["images"],
        out=str(work / "cache.zarr"),
        backbone=cachedet.BackboneConfig("test_resnet", weights="random"),
        augment=cachedet.AugmentConfig(size=96),
        views=2,
    ),
    progress=False,
)

# Stage 2: neck and head trained on the cached features only.
run = cachedet.train_heads(
    cachedet.TrainConfig.of(
        out=str(work / "run"),
        cache=str(work / "cache.zarr"),
        head="faster-rcnn",
        epochs=1,
        batch_size=4,
        neck_channels=32,
        max_steps_per_epoch=2,
    ),
    progress=False,
).run

# Inference: paths, PIL images, numpy (H, W, 3) uint8 arrays or (3, H, W) tensors, one or a batch.
model = cachedet.load(run, checkpoint="last", score_threshold=0.01)
val_image = sorted((Path(data["images"]) / "val").iterdir())[0]
one = model.predict(str(val_image))  # one image -> one Detections
batch = model.predict([Image.open(val_image), np.asarray(Image.open(val_image).convert("RGB"))])
box = np.round(one.boxes[0], 1).tolist()
print(
    f"{len(one)} detections; best: {one.names[0]} {one.scores[0]:.3f} at {box} (xyxy, image pixels)"
)
print(f"a batch of {len(batch)}: {[len(d) for d in batch]} detections")

# Stage 3: COCO AP on the validation file (LVIS files are scored with LVISEval as well).
cfg = cachedet.EvalConfig(run=run, annotations=data["val"], images=data["images"])
metrics, detections = cachedet.evaluate(cfg, progress=False)
print(f"box AP {metrics['bbox']['AP']} on {metrics['num_images']} images")

# Export: the whole model as ONNX, preprocessing and categories in model.json beside it.
onnx_path = cachedet.export(run, format="onnx", score_threshold=0.01)
print("exported", onnx_path)
