"""The ``/docs`` page's Content-Security-Policy names exactly what the page loads: Swagger UI's
script and stylesheet by URL, its one inline script by hash (CSP Level 3 §2.3.1), no
``'unsafe-inline'`` and no whole CDN."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest

pytestmark = pytest.mark.feature("browser-security-headers")


def directives(policy: str) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for part in policy.split(";"):
        name, *values = part.split()
        parsed[name] = values
    return parsed


async def test_the_docs_csp_pins_every_script_and_style_the_page_uses(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    policy = directives(page.headers["content-security-policy"])

    external = re.findall(r'<script src="([^"]+)"', page.text)
    inline = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    styles = re.findall(r'<link type="text/css" rel="stylesheet" href="([^"]+)"', page.text)
    assert external and inline and styles
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in inline
    ]
    assert sorted(policy["script-src"]) == sorted(external + hashes)
    assert policy["style-src"] == styles
    for name, values in policy.items():
        assert "'unsafe-inline'" not in values, name
        assert "'unsafe-eval'" not in values, name
        for value in values:  # a host alone would allow the whole CDN
            assert not re.fullmatch(r"https://[^/]+/?", value), (name, value)
    assert policy["default-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
