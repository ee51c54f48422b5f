"""The alkey asyncio example: a FastAPI application that caches JSON responses.

Run it with ``uvicorn --factory fastapi_app:create_app``; see :mod:`fastapi_app.main`.
"""

from __future__ import annotations

from fastapi_app.main import create_app

__all__ = ["create_app"]
