"""storage: the only place that touches the disk — blob files, the metadata database,
uploads, and the in-memory tier.

Everything above calls the interfaces here (`metadata.Metadata`, `blobs.BlobStore`,
`uploads.Uploads`); no caller holds a SQLite handle or a file descriptor it did not ask
this folder for. It imports nothing from `api/`, `cache/` or `upstream/`.
"""
