"""Running models at scale: ONNX export (``medvl.scale.onnx``) for the onnx / onnx-int8 inference
backends of ``medvl.load_model`` (``medvl.models.backends``), which the ``[scale]`` extra installs.
"""

from .onnx import export_onnx as export_onnx
