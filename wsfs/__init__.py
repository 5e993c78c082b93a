"""wsfs: a notebook's /workspace as a write-back cache over S3-compatible object storage."""

__version__ = "0.1.0"
