"""`cascade-rcnn serve`: a detector behind an HTTP API (FastAPI on uvicorn), batching across clients, with limits.

    batcher.py  the bounded queue and the one worker thread that runs the model on batches gathered across requests
    app.py      the FastAPI application: routes, reading and limiting uploads, JSON results (`create_app`)

The web packages are an optional extra (`pip install 'cascade-rcnn[serve]'`); importing this package needs none of
them, so the command can say which are missing in one line.
"""

from __future__ import annotations

import importlib

from cascade_rcnn.errors import CascadeRCNNError

SERVE_EXTRA = "pip install 'cascade-rcnn[serve]'"
# Module to import -> the package that provides it. python-multipart is imported as python_multipart since 0.0.13,
# as multipart before.
_REQUIREMENTS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart|multipart": "python-multipart"}


def require_serve_dependencies() -> None:
    """Raise a one-line `CascadeRCNNError` naming the extra when a package the server needs is missing."""
    missing = [package for modules, package in _REQUIREMENTS.items() if not any(map(_importable, modules.split("|")))]
    if missing:
        raise CascadeRCNNError(f"cascade-rcnn serve needs {', '.join(missing)}: {SERVE_EXTRA}")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
