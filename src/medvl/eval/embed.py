"""The batched encoders live in ``medvl.embed`` (shared by eval, rag, index and serve); these names
are re-exported for imports written against ``medvl.eval.embed``."""

from ..embed import class_embeddings as class_embeddings
from ..embed import embed_images as embed_images
