"""The COCO detection archives (export-formats.md §3, §5)."""
