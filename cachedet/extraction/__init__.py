"""Stage 1: extraction. ``run`` plans views and writes a feature store (``ExtractConfig`` ->
``ExtractResult``); ``shards`` computes and writes one shard of views (local or on dask workers)."""
