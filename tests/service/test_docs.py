"""``/docs`` and ``/redoc`` load nothing from the Internet: every script, stylesheet and icon they reference is
served by the app itself (before, Swagger UI came from a public CDN and the page was blank offline)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.settings import Settings


def _get_all(root: Path, paths: list[str]) -> dict[str, httpx.Response]:
    app = create_app(Settings(model_repository=str(root)))

    async def fetch() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client:
            answers = {path: await client.get(path) for path in paths}
            for page in list(answers.values()):
                for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
                    answers[asset] = await client.get(asset)
            return answers

    return asyncio.run(fetch())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_use_local_assets_only(tmp_path: Path, page: str) -> None:
    answers = _get_all(tmp_path, [page])
    html = answers[page]
    assert html.status_code == 200, html.text
    assert "cdn." not in html.text and "fonts.googleapis" not in html.text and "https://" not in html.text
    assets = [path for path in answers if path != page]
    assert any(path.endswith(".js") for path in assets), html.text
    for path in assets:
        assert path.startswith("/"), f"{page} loads {path} from elsewhere"
        assert answers[path].status_code == 200 and answers[path].content, path
