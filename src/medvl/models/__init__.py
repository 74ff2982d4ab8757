"""Models: configs, the registry, encoders, the dual encoder and its losses."""

from .config import ImageConfig as ImageConfig
from .config import ModelConfig as ModelConfig
from .config import TextConfig as TextConfig
from .dual import DualEncoder as DualEncoder
from .registry import create_model as create_model
from .registry import get_config as get_config
from .registry import list_models as list_models
from .registry import load_model as load_model
from .registry import resolve_model as resolve_model
