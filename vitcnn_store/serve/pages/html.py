"""The page frame and small HTML builders of the explorer (server-rendered, escaped).

Every page is one HTML document with the package's own stylesheet and script
(``/static/...``): no CDN, no web font, so it works inside clusters without
internet. Text from the store (names, ids, attributes) is always escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["esc", "link", "page", "qs", "table", "url"]


def esc(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def url(*parts: Any, **query: Any) -> str:
    """A URL path from ``parts`` (each percent-encoded) and a query string.

    Examples
    --------
    >>> url("runs", "vit", "layers", "blocks.0", page=2)
    '/runs/vit/layers/blocks.0?page=2'
    """
    path = "/" + "/".join(quote(str(p), safe="") for p in parts)
    return path + qs(**query)


def qs(**query: Any) -> str:
    """``?k=v&...`` of the non-None values (empty when none)."""
    kept = {k: v for k, v in query.items() if v is not None}
    return "?" + urlencode(kept) if kept else ""


def link(href: str, text: Any, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<a href="{esc(href)}"{c}>{esc(text)}</a>'


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "") -> str:
    """A table; cells are raw HTML (escape text before)."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def page(title: str, crumbs: Sequence[tuple[str, str]], body: str, data: Any = None) -> str:
    """A whole page: breadcrumbs (``(href, text)``, the last one is this page), the body,
    and optional JSON ``data`` for the page's script (``<script type="application/json">``)."""
    nav = " / ".join(link(h, t) for h, t in crumbs[:-1])
    here = esc(crumbs[-1][1]) if crumbs else ""
    payload = ""
    if data is not None:
        text = json.dumps(data, allow_nan=False).replace("</", "<\\/")
        payload = f'<script type="application/json" id="page-data">{text}</script>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)} · vitcnn explorer</title>"
        '<link rel="stylesheet" href="/static/explorer.css">'
        '<link rel="icon" href="data:,">'
        f'</head><body><header><a class="home" href="/">vitcnn explorer</a> '
        f"<nav>{nav}{' / ' if nav else ''}<b>{here}</b></nav></header>"
        f"<main><h1>{esc(title)}</h1>{body}</main>{payload}"
        '<script src="/static/explorer.js"></script></body></html>'
    )
