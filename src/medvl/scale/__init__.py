"""Running models faster on a CPU: inference backends and ONNX export.

``medvl.load_model(dir, backend=...)`` picks one of ``BACKENDS`` (``medvl.scale.backends``); the ONNX
ones run the towers written by ``export_onnx`` (``medvl.scale.onnx``, ``medvl export onnx``) with
onnxruntime, which the ``[scale]`` extra installs.
"""

from .backends import BACKENDS as BACKENDS
from .backends import load_backend as load_backend
from .onnx import export_onnx as export_onnx
