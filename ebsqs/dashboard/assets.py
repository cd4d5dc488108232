"""The files shipped in the package (``static/``, ``templates/``): read, never fetched from a
CDN, so the dashboard works in networks without the internet."""

from __future__ import annotations

from importlib import resources
from string import Template

#: The assets a front end serves under ``static/``, with their content types.
STATIC = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}


def static(name: str) -> bytes:
    """The bytes of a static asset.

    Raises:
        KeyError: ``name`` is not one of :data:`STATIC`.
    """
    if name not in STATIC:
        raise KeyError(name)
    return resources.files("ebsqs.dashboard").joinpath("static", name).read_bytes()


def layout(title: str, base: str, body: str) -> str:
    """The standalone page: ``templates/layout.html`` around an (already escaped) body."""
    text = resources.files("ebsqs.dashboard").joinpath("templates", "layout.html").read_text()
    return Template(text).substitute(title=title, base=base, body=body)
