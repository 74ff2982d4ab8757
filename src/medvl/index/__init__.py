"""The case index: image and report embeddings with case metadata, and similar-case search.

``build_index(model, dataset, out)`` -> ``open_index(out)`` -> ``search_index(index, model,
image=..., k=10, where="sex = 'F' and age > 60")``. ``out`` is a folder (FAISS + SQLite) or a
``postgresql://`` URL (pgvector). What an index stores (and what it never stores: absolute image
paths, DICOM paths, the data's path) is listed in docs/index-contents.md.
"""

from .backends import open_index as open_index
from .base import Hit as Hit
from .base import Index as Index
from .base import describe_target as describe_target
from .base import shown_location as shown_location
from .build import add_records as add_records
from .build import build_index as build_index
from .cases import Case as Case
from .search import ImageChanged as ImageChanged
from .search import index_model as index_model
from .search import resolve_image as resolve_image
from .search import search_index as search_index
from .where import compile_where as compile_where
