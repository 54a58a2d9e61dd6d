"""Images and annotations: COCO/LVIS reading, decoding, views (LSJ), Copy-Paste, masks, synthetic data."""
