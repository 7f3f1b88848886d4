"""The local store: signed entry feeds, sealed content-addressed objects, index.

See :mod:`p2psync.store.store` for the model, :mod:`p2psync.store.objects`
for the sealed object format and :mod:`p2psync.store.files` for durability.
"""

from p2psync.store.objects import Meta, ObjectKind
from p2psync.store.store import BlobPending, InsertResult, Store, StoredEntry

__all__ = ["BlobPending", "InsertResult", "Meta", "ObjectKind", "Store", "StoredEntry"]
