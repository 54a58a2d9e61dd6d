"""The feature cache: the zarr store format (header, layout, writer/reader) and datasets over it."""
