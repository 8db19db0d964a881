"""Where the stores keep their state: a metadata database (SQLite or PostgreSQL) and a blob store (a folder or
an S3 bucket), both chosen by URL."""
from .blobs import (
           BlobExistsError,
           BlobNotFoundError,
           BlobStore,
           FileBlobStore,
           S3BlobStore,
           open_blob_store,
)
from .database import Database, Migration, StorageUnavailableError, open_database

__all__ = ["BlobExistsError", "BlobNotFoundError", "BlobStore", "Database", "FileBlobStore", "Migration",
           "S3BlobStore", "StorageUnavailableError", "open_blob_store", "open_database"]
