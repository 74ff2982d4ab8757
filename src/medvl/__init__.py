"""medvl: train, evaluate, explain and serve medical vision-language models, offline on a CPU."""

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
