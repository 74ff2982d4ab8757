"""medvl: train, evaluate, explain and serve medical vision-language models, offline on a CPU.

The public names below are imported on first use (PEP 562), so ``import medvl`` and the start of the
``medvl`` command stay cheap, and Ctrl-C while the command starts never lands inside torch's import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import CaptionConfig as CaptionConfig
    from .data import Dataset as Dataset
    from .data import Record as Record
    from .data import load_captions as load_captions
    from .data import load_dataset as load_dataset
    from .errors import DataError as DataError
    from .errors import InputError as InputError
    from .errors import MedvlError as MedvlError
    from .errors import ModelError as ModelError
    from .eval import linear_probe as linear_probe
    from .eval import retrieval as retrieval
    from .eval import zero_shot as zero_shot
    from .models import DualEncoder as DualEncoder
    from .models import create_model as create_model
    from .models import list_models as list_models
    from .models import load_model as load_model
    from .train.loop import TrainConfig as TrainConfig
    from .train.loop import train as train

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "CaptionConfig": ".data", "Dataset": ".data", "Record": ".data", "load_captions": ".data",
    "load_dataset": ".data",
    "DataError": ".errors", "InputError": ".errors", "MedvlError": ".errors", "ModelError": ".errors",
    "linear_probe": ".eval", "retrieval": ".eval", "zero_shot": ".eval",
    "DualEncoder": ".models", "create_model": ".models", "list_models": ".models", "load_model": ".models",
    "TrainConfig": ".train.loop", "train": ".train.loop",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a subpackage: medvl.eval, medvl.clinical, ...
        raise AttributeError(f"module 'medvl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """``medvl.train`` is the training function, as the names above promise. Importing the subpackage
    ``medvl.train`` would bind the name to the subpackage (the import system sets it on its parent): that one
    binding is dropped, ``medvl.train.loop`` and the rest still import as usual."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
