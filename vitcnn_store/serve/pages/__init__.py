"""The explorer: server-rendered pages of a store, from ``/``.

Runs → a run (provenance, images, layers with statistics, analyses) → a layer
(channels with their top images) → a channel (top images with where it
fires) → an image (attention per layer and head from a clicked query patch,
the CLS map, localization maps) → analyses (CKA heatmaps that click through
to both layers, attention distance against depth with its uniform baseline,
probe and skip curves with baselines and caveats). Every view has a stable
URL; pictures are PNGs drawn on request and cached
(:mod:`~vitcnn_store.serve.pages.pictures`). The stylesheet and script are
files of this package served at ``/static/``: no CDN, no web fonts.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.pages import analyses, images, pictures, views

__all__ = ["STATIC", "router"]

#: The package's static files: name → media type (nothing else is served from /static/).
STATIC = {"explorer.css": "text/css", "explorer.js": "text/javascript"}

router = APIRouter(include_in_schema=False)
router.include_router(views.router)
router.include_router(images.router)
router.include_router(analyses.router)
router.include_router(pictures.router)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise ApiError(404, f"no static file {name!r}")
    body = (files(__package__) / "static" / name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})
