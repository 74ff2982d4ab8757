"""Atomic file writes: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging folder into place; the old target survives until the rename."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{staging.name[-8:]}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically; NaN/inf become null so the file stays valid JSON."""
    return atomic_write_bytes(path, json.dumps(_finite(data), indent=2).encode("utf-8") + b"\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
