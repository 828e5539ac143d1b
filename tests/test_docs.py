"""/docs works on a hospital network without internet access: the page and every asset it
references are served by the service, the browser is told to load nothing from elsewhere, and
the OpenAPI document it renders is valid OpenAPI 3.1."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from openapi_spec_validator.versions.shortcuts import get_spec_version

from triage.api.app import create_app
from triage.settings import Settings

BASE = "http://testserver"
# In CSS: url(...) and @import; in CSS and JS: the source map named on the last line.
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")
_SOURCE_MAP = re.compile(r"[#@]\s*sourceMappingURL=([^\s*]+)")


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "data", "poster", "srcset", "action") and value:
                self.urls.append(value)
            if name.startswith("data-") and value and value.endswith(".json"):
                self.urls.append(value)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    settings = Settings(data_dir=tmp_path_factory.mktemp("var"), redis_url="redis://127.0.0.1:9")
    return TestClient(create_app(settings), base_url=BASE)


def _local(url: str, page: str) -> str:
    absolute = urljoin(page, url)
    parts = urlsplit(absolute)
    assert f"{parts.scheme}://{parts.netloc}" == BASE, f"{page} references outside: {url}"
    return parts.path


def test_docs_page_and_its_assets_come_from_the_service(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = _References()
    parser.feed(page.text)
    assert len(parser.urls) >= 4  # icon, stylesheet, Swagger UI, its start script, the API
    seen = {}
    queue = [(url, f"{BASE}/docs") for url in parser.urls]
    while queue:
        url, referrer = queue.pop()
        path = _local(url, referrer)
        if path in seen:
            continue
        answer = client.get(path)
        assert answer.status_code == 200, f"{path}: {answer.status_code}"
        seen[path] = answer
        text = answer.text if not path.endswith(".png") else ""
        found = [a or b for a, b in _CSS_URL.findall(text)] if path.endswith(".css") else []
        found += _SOURCE_MAP.findall(text[-300:])
        queue += [(u, f"{BASE}{path}") for u in found if not u.startswith("data:")]
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
            "/docs/start.js", "/openapi.json"} <= set(seen)
    # The script that starts the page names no outside address either.
    assert "http" not in seen["/docs/start.js"].text


def test_the_browser_may_load_nothing_from_elsewhere(client: TestClient) -> None:
    policy = client.get("/docs").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'self'"
    assert "http" not in policy and "*" not in policy
    assert "unsafe-inline" not in directives["script-src"]


def test_redoc_is_not_offered_and_unknown_assets_are_not_served(client: TestClient) -> None:
    assert client.get("/redoc").status_code == 404
    assert client.get("/docs/assets/index.html").status_code == 404
    assert client.get("/docs/assets/..%2F..%2Fpackage.json").status_code == 404


def test_openapi_document_is_valid_openapi_3_1(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1.")
    assert get_spec_version(spec).major == "3" and get_spec_version(spec).minor == "1"
    validate(spec)


def test_missing_assets_are_an_honest_503(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:9",
                        web_assets_dir=tmp_path / "nothing")
    answer = TestClient(create_app(settings)).get("/docs/assets/swagger-ui-bundle.js")
    assert answer.status_code == 503
