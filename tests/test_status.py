"""The status page (`/-/`) and `/-/status.json` of a running proxy, over HTTP and in headless Chromium (issue 14)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from proxy.status import format_bytes, format_duration, format_expires_in

from .conftest import needs, raw_exchange, wait_for
from .upstream import token_claims

KEY = "k3y-for-the-status-tests-0123456789"
WITH_KEY = {"X-Dicom-Proxy-Key": KEY}
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO_SCREENSHOT = Path(__file__).parent.parent / "docs" / "status-page.png"


def ready(proxy) -> None:  # noqa: ANN001
    """Wait for the first token (/-/ready needs no key)."""
    wait_for(
        lambda: requests.get(f"{proxy.url}/-/ready", timeout=10).status_code == 200, timeout=20, what="the first token"
    )


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "access-key"
    path.write_text(KEY + "\n")
    return path


def directives(csp: str) -> dict[str, str]:
    return {part.split()[0]: " ".join(part.split()[1:]) for part in csp.split(";") if part.strip()}


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Plain HTTP -------------------------------------------------------------------------------------------


def test_the_json_says_who_what_where_and_counts(start_proxy, az, upstream):
    proxy = start_proxy()
    ready(proxy)
    assert requests.get(f"{proxy.url}/echo/v2/studies", timeout=10).status_code == 200
    assert requests.post(f"{proxy.url}/echo/up", data=b"u" * 5000, timeout=10).status_code == 200
    assert requests.get(f"{proxy.url}/echo/x", headers={"Host": "evil.example"}, timeout=10).status_code == 421

    response = requests.get(f"{proxy.url}/-/status.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    status = response.json()
    assert status["state"] == "ready"
    assert status["identity"] == {"user": "radiologist@example.org", "tenant": "tenant-one"}
    assert 3000 < status["token"]["expires_in_seconds"] <= 3600
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", status["token"]["expires_at"])
    assert status["problem"] is None
    assert (status["credential"], status["upstream"]) == ("cli", upstream.url)
    assert status["audience"] == "https://dicom.healthcareapis.azure.com"
    assert status["base_url"] == f"http://127.0.0.1:{proxy.port}/v2"
    assert (status["access_key_required"], status["read_only"], status["cors_origins"]) == (False, False, [])
    counters = status["counters"]
    assert counters["requests"]["2xx"] >= 3  # two forwarded, and /-/ready
    assert counters["requests"]["4xx"] == 1
    assert counters["received_bytes"] >= 5000
    assert counters["sent_bytes"] > 0
    assert counters["token_acquisitions"] == {"ok": 1, "error": 0}
    assert counters["upstream_errors"] == {"connect": 0, "tls": 0, "timeout": 0, "reset": 0}
    assert counters["in_flight"] == 1  # this request itself
    recent = [(entry["method"], entry["path"], entry["status"]) for entry in status["recent"]]
    # The refused one (a wrong Host) is counted but not listed: a hostile page must not fill the list.
    assert recent == [("POST", "/echo/up", 200), ("GET", "/echo/v2/studies", 200)]
    assert all(re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]) for entry in status["recent"])
    assert all(0 <= entry["seconds"] < 10 for entry in status["recent"])

    # The base URL follows the allowed Host the client used.
    other = requests.get(f"{proxy.url}/-/status.json", headers={"Host": f"localhost:{proxy.port}"}, timeout=10)
    assert other.json()["base_url"] == f"http://localhost:{proxy.port}/v2"


def test_the_list_keeps_the_last_50_requests_and_leaves_out_the_proxys_own(start_proxy, upstream):
    proxy = start_proxy()
    with requests.Session() as session:
        for number in range(55):
            assert session.get(f"{proxy.url}/echo/n/{number}", timeout=10).status_code == 200
        for _ in range(3):
            session.get(f"{proxy.url}/-/status.json", timeout=10)
            session.get(f"{proxy.url}/-/health", timeout=10)
        recent = session.get(f"{proxy.url}/-/status.json", timeout=10).json()["recent"]
    assert [entry["path"] for entry in recent] == [f"/echo/n/{number}" for number in range(54, 4, -1)]


def test_without_a_token_both_say_why_and_what_to_do(start_proxy, az, upstream):
    az.configure(mode="logged_out")
    proxy = start_proxy()
    wait_for(lambda: "retrying in" in proxy.output(), what="the failure")
    status = requests.get(f"{proxy.url}/-/status.json", timeout=10).json()
    assert (status["state"], status["identity"], status["token"]) == ("no_token", None, None)
    assert status["problem"]["error"] == "token_unavailable"
    assert "Please run 'az login'" in status["problem"]["detail"]
    assert "az login" in status["problem"]["hint"]
    assert status["counters"]["token_acquisitions"]["error"] >= 1
    page = requests.get(f"{proxy.url}/-/", timeout=10).text
    assert "No token" in page and "none held" in page
    assert "Hint: Sign in with &#x27;az login&#x27;" in page


def test_a_refused_token_is_shown_with_who_it_speaks_for(start_proxy, az, upstream):
    az.configure(audience="https://management.azure.com")  # what a wrong --audience gives
    proxy = start_proxy()
    with requests.Session() as session:
        for number in range(3):
            assert session.get(f"{proxy.url}/echo/{number}", timeout=10).status_code == 401
        status = session.get(f"{proxy.url}/-/status.json", timeout=10).json()
        page = session.get(f"{proxy.url}/-/", timeout=10).text
    assert status["state"] == "refused"
    assert status["identity"] == {"user": "radiologist@example.org", "tenant": "tenant-one"}
    assert status["problem"]["error"] == "token_refused" and "--audience" in status["problem"]["hint"]
    assert [entry["status"] for entry in status["recent"]] == [401, 401, 401]
    assert "The service refuses the token" in page and "--audience" in page


def test_a_service_that_refuses_the_forwarded_requests_turns_the_page_from_green(start_proxy, az, upstream):
    proxy = start_proxy()
    ready(proxy)
    with requests.Session() as session:
        assert session.get(f"{proxy.url}/echo/fine", timeout=10).status_code == 200
        assert session.get(f"{proxy.url}/-/status.json", timeout=10).json()["refusals"] is None
        upstream.refuse_with = 403  # an identity without a DICOM role (or without one on this partition)
        for number in range(3):
            assert session.get(f"{proxy.url}/echo/{number}", timeout=10).status_code == 403
        status = session.get(f"{proxy.url}/-/status.json", timeout=10).json()
        page = session.get(f"{proxy.url}/-/", timeout=10).text
        upstream.refuse_with = None
        assert session.get(f"{proxy.url}/echo/fine-again", timeout=10).status_code == 200
        after = session.get(f"{proxy.url}/-/status.json", timeout=10).json()
    newest_refusal = status["recent"][0]
    assert status["state"] == "denied"
    assert status["refusals"] == {
        "newest": True,
        "count": 3,
        "of": 4,
        "last_status": 403,
        "last_time": newest_refusal["time"],
        "text": f"The service refused 3 of the last 4 forwarded requests "
        f"(the last with 403 at {newest_refusal['time'][11:19]} UTC).",
    }
    assert "Signed in · the service refuses requests" in page
    assert 'class="pill bad"' in page
    assert "The service refused 3 of the last 4 forwarded requests (the last with 403 at" in page
    assert '<div class="warning" data-f="refusals">' in page, "shown, not hidden"
    assert "no DICOM role" in page
    # Accepted again: green, but the refusals among the recent requests are still told.
    assert after["state"] == "ready"
    assert after["refusals"]["newest"] is False and after["refusals"]["count"] == 3


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (16_500, "16.1 KiB"), (5 * 1024**3, "5.00 GiB")],
)
def test_byte_counts_read_like_the_page_script_writes_them(count, text):
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0012, "1.2 ms"), (0.25, "250 ms"), (2.5, "2.50 s")],
)
def test_durations_read_like_the_page_script_writes_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "expired"), (59, "in 59 s"), (3599, "in 59 min"), (7500, "in 2 h 5 min")],
)
def test_expiry_reads_like_the_page_script_writes_it(seconds, text):
    assert format_expires_in(seconds) == text


def test_the_page_has_a_strict_csp_that_allows_exactly_its_inline_script_and_style(start_proxy, upstream):
    proxy = start_proxy()
    response = requests.get(f"{proxy.url}/-/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    page = response.text
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style([^>]*)>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert scripts[0][0] == "" and styles[0][0] == "", "inline only: no src, no attributes"
    csp = directives(response.headers["Content-Security-Policy"])
    assert csp == {
        "default-src": "'none'",
        "script-src": sha256(scripts[0][1]),
        "style-src": sha256(styles[0][1]),
        "connect-src": "'self'",
        "img-src": "'self' data:",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    # Nothing the CSP would block anyway: no style attributes, event handlers or resources elsewhere.
    assert not re.search(r"\sstyle=|\son[a-z]+=", page)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in styles[0][1]
    json_csp = directives(requests.get(f"{proxy.url}/-/status.json", timeout=10).headers["Content-Security-Policy"])
    assert json_csp == {"default-src": "'none'", "frame-ancestors": "'none'"}


def test_neither_answer_shows_the_token_the_key_or_a_query(start_proxy, az, upstream, key_file):
    proxy = start_proxy("--access-key-file", str(key_file))
    ready(proxy)
    secret_query = "/echo/v2/studies?PatientName=SECRET&PatientID=SECRET-ID"
    assert requests.get(f"{proxy.url}{secret_query}", headers=WITH_KEY, timeout=10).status_code == 200
    page = requests.get(f"{proxy.url}/-/", headers=WITH_KEY, timeout=10)
    # The Basic password works too, with any user name.
    snapshot = requests.get(f"{proxy.url}/-/status.json", auth=("anyone", KEY), timeout=10)
    assert (page.status_code, snapshot.status_code) == (200, 200)
    token = az.issued_tokens()[0]
    for text in (page.text, snapshot.text):
        assert "/echo/v2/studies" in text
        assert "SECRET" not in text and "PatientName" not in text
        assert KEY not in text
        for part in token.split("."):
            assert part not in text
    # Where the key goes, with a placeholder instead of it.
    assert "X-Dicom-Proxy-Key: &lt;access key&gt;" in page.text
    assert "password of HTTP Basic" in page.text
    assert "&quot;X-Dicom-Proxy-Key&quot;: &quot;&lt;access key&gt;&quot;" in page.text  # the dicomweb-client snippet
    status = snapshot.json()
    assert (status["access_key_required"], status["access_key_header"]) == (True, "X-Dicom-Proxy-Key")


def test_paths_are_escaped_never_markup(start_proxy, upstream):
    proxy = start_proxy()
    # Raw bytes, so that no client re-encodes them; and a percent-encoded one, which aiohttp decodes.
    raw = b"GET /echo/<script>alert(1)</script> HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert raw_exchange(proxy.port, raw).startswith(b"HTTP/1.1 200")
    encoded = "/echo/%3Cimg%20src=x%20onerror=alert(2)%3E%22'&amp;"
    head = f"GET {encoded} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    assert raw_exchange(proxy.port, head.encode()).startswith(b"HTTP/1.1 200")
    page = requests.get(f"{proxy.url}/-/", timeout=10).text
    assert "/echo/&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "/echo/&lt;img src=x onerror=alert(2)&gt;&quot;&#x27;&amp;amp;" in page
    assert "<script>alert" not in page and "<img" not in page
    assert page.count("<script>") == 1
    recent = requests.get(f"{proxy.url}/-/status.json", timeout=10).json()["recent"]
    assert [entry["path"] for entry in recent] == [
        "/echo/<img src=x onerror=alert(2)>\"'&amp;",
        "/echo/<script>alert(1)</script>",
    ]


def test_the_same_host_key_and_origin_rules_as_every_path(start_proxy, upstream, key_file):
    proxy = start_proxy("--access-key-file", str(key_file))
    for path in ("/-/", "/-/status.json"):
        missing = requests.get(f"{proxy.url}{path}", timeout=10)
        assert missing.status_code == 401
        assert missing.json()["error"] == "access_key_required"
        assert missing.headers["WWW-Authenticate"] == 'Basic realm="dicom-auth-proxy"'
        assert requests.get(f"{proxy.url}{path}", auth=("", "wrong-key-0123456789"), timeout=10).status_code == 401
        wrong_host = requests.get(f"{proxy.url}{path}", headers={"Host": "evil.example", **WITH_KEY}, timeout=10)
        assert wrong_host.status_code == 421
        assert wrong_host.json()["error"] == "host_not_allowed"
        cross_site = requests.get(
            f"{proxy.url}{path}", headers={"Sec-Fetch-Site": "cross-site", **WITH_KEY}, timeout=10
        )
        assert cross_site.status_code == 403
        assert requests.get(f"{proxy.url}{path}", headers=WITH_KEY, timeout=10).status_code == 200
    assert KEY not in proxy.output()
    # Other /-/ paths are still no local endpoint, and never forwarded.
    unknown = requests.get(f"{proxy.url}/-/studies", headers=WITH_KEY, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    assert "/-/ (status page)" in unknown.json()["hint"]
    assert upstream.seen == []


def test_without_a_key_a_wrong_host_still_gets_421(start_proxy, upstream):
    proxy = start_proxy()
    for path in ("/-/", "/-/status.json"):
        assert requests.get(f"{proxy.url}{path}", headers={"Host": "rebound.example:80"}, timeout=10).status_code == 421
        assert requests.get(f"{proxy.url}{path}", headers={"Host": "localhost"}, timeout=10).status_code == 200


def test_the_banner_gives_the_status_page_url(start_proxy, upstream):
    proxy = start_proxy()
    wait_for(lambda: "status page:" in proxy.output(), what="the banner")
    assert f"status page: http://127.0.0.1:{proxy.port}/-/" in proxy.output()


def test_the_client_settings_carry_this_proxys_base_url(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", "http://localhost:3000")
    page = requests.get(f"{proxy.url}/-/", timeout=10).text
    base = f"http://127.0.0.1:{proxy.port}/v2"
    for snippet in (
        f"qidoRoot: &#x27;{base}&#x27;",
        f"wadoRoot: &#x27;{base}&#x27;",
        f"wadoUriRoot: &#x27;{base}&#x27;",
        f"$dicom:rs --url &quot;{base}&quot;",
        f"dicomWebEndpoint=&quot;{base}&quot;",
        f"DICOMwebClient(url=&quot;{base}&quot;)",
        f"&#x27;{base}/studies?limit=10&#x27;",
    ):
        assert snippet in page
    assert "Allowed origins now: http://localhost:3000." in page
    assert "http://127.0.0.1:3000 is not http://localhost:3000" in page
    assert "&lt;access key&gt;" not in page, "no key, no placeholder"


# In a real browser ------------------------------------------------------------------------------------


def _webdriver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, javascript: bool = True):  # noqa: ANN202
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    needs(
        not missing,
        f"{' and '.join(missing)} not found: the browser tests need Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver)",
    )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.selenium_manager import SeleniumManager
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)

    def no_downloads(self, args):  # noqa: ANN001, ANN202
        raise AssertionError(f"Selenium Manager would look for (and may download) a browser or driver: {args}")

    # The driver path is given, so Selenium never runs its manager; this makes sure of it.
    monkeypatch.setattr(SeleniumManager, "binary_paths", no_downloads)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-proxy-server",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(argument)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    return webdriver.Chrome(service=service, options=options)


@pytest.fixture
def browser(tmp_path, monkeypatch):  # noqa: ANN201
    driver = _webdriver(tmp_path, monkeypatch)
    yield driver
    driver.quit()


@pytest.fixture
def browser_without_javascript(tmp_path, monkeypatch):  # noqa: ANN201
    driver = _webdriver(tmp_path, monkeypatch, javascript=False)
    yield driver
    driver.quit()


# The cells of the newest row of the recent requests, read at once (the live refresh rebuilds the rows).
FIRST_ROW = """return Array.from(document.querySelector('[data-f="recent"] tr').cells, (cell) => cell.textContent);"""


def make_some_traffic(proxy) -> None:  # noqa: ANN001
    """What a viewer's first minute looks like: a search, a study's series, a miss, a refused Host."""
    with requests.Session() as session:
        session.get(f"{proxy.url}/v2/studies?PatientName=DOE*", timeout=10)
        session.get(f"{proxy.url}/v2/studies/1.2.840.113619.2.55.3.604688119/series", timeout=10)
        session.get(f"{proxy.url}/v2/studies/1.2.840.113619.2.55.3.604688119/series/1.3/metadata", timeout=10)
        session.get(f"{proxy.url}/v2/studies", headers={"Host": "viewer.example:3000"}, timeout=10)
        session.get(f"{proxy.url}/echo/v2/studies/1.2.3?includefield=all", timeout=10)


def test_a_person_sees_identity_expiry_base_url_and_live_requests(browser, start_proxy, az, upstream, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proxy = start_proxy()
    # Waiting on the log rather than polling /-/ready keeps its 503s out of the counters in the picture.
    wait_for(lambda: "token acquired" in proxy.output(), timeout=20, what="the first token")
    make_some_traffic(proxy)
    origin = proxy.url

    browser.get_log("performance")  # what the browser did before: its own new-tab page
    browser.get(f"{origin}/-/")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert browser.title == "dicom-auth-proxy status"
    assert browser.find_element(By.CSS_SELECTOR, '[data-f="state"]').text == "Signed in · token valid"
    assert browser.find_element(By.CSS_SELECTOR, '[data-f="user"]').text == "radiologist@example.org"
    assert browser.find_element(By.CSS_SELECTOR, '[data-f="tenant"]').text == "tenant-one"
    expiry = browser.find_element(By.CSS_SELECTOR, '[data-f="expiry"]').text
    expires = datetime.fromtimestamp(token_claims(az.issued_tokens()[0])["exp"], UTC)
    shown = re.fullmatch(r"expires (.+) UTC \(in (\d+) min\)", expiry)
    assert shown and shown.group(1) == expires.strftime("%Y-%m-%d %H:%M:%S"), expiry
    assert 0 < int(shown.group(2)) <= 60, expiry
    assert browser.find_element(By.ID, "base-url").text == f"{origin}/v2"
    assert "qidoRoot: '" + f"{origin}/v2'" in text, "the OHIF block is open and filled in"
    # The live refresh replaces the rows, so they are read in one script call, never as stale elements.
    live = WebDriverWait(browser, 30)
    first = browser.execute_script(FIRST_ROW)
    assert first[1:4] == ["GET", "/echo/v2/studies/1.2.3", "200"]
    assert "includefield" not in text and "DOE" not in text

    # Live refresh: the script has run and a request made now appears without a reload.
    live.until(lambda driver: driver.find_element(By.CSS_SELECTOR, '[data-f="live"]').text.startswith("Live:"))
    browser.execute_script("window.notReloaded = true")
    assert requests.get(f"{origin}/echo/v2/studies/4.5.6/series", timeout=10).status_code == 200
    live.until(lambda driver: driver.execute_script(FIRST_ROW)[2] == "/echo/v2/studies/4.5.6/series")
    assert browser.execute_script("return window.notReloaded") is True
    assert browser.find_element(By.CSS_SELECTOR, '[data-f="live"]').text.startswith("Live: updated")

    # The whole page as a picture, for people (and the README).
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False}
    )
    screenshot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 30_000, "a blank page compresses to almost nothing"
    # UPDATE_STATUS_SCREENSHOT=1 refreshes the README's picture; otherwise a test run leaves the repo alone.
    if os.environ.get("UPDATE_STATUS_SCREENSHOT"):
        REPO_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, REPO_SCREENSHOT)

    # The page asked nothing of any other origin, and the browser refused nothing it asked.
    requested: list[tuple[str, str]] = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            requested.append((params.get("documentURL", ""), params["request"]["url"]))
    urls = [url for _, url in requested]
    assert f"{origin}/-/" in urls and f"{origin}/-/status.json" in urls
    mine = (f"{origin}/", "data:", "about:")
    strangers = [url for document, url in requested if document.startswith(origin) and not url.startswith(mine)]
    assert strangers == [], "the page asked another origin"
    elsewhere = [url for url in urls if url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith(mine)]
    assert elsewhere == [], "the browser reached out while showing the page"
    console = browser.get_log("browser")
    assert not [entry for entry in console if "Content Security Policy" in entry["message"]], console
    assert not [entry for entry in console if entry["level"] == "SEVERE"], console


def test_without_javascript_everything_but_live_refresh_is_there(
    browser_without_javascript, start_proxy, upstream, key_file
):
    from selenium.webdriver.common.by import By

    browser = browser_without_javascript
    proxy = start_proxy("--access-key-file", str(key_file))
    ready(proxy)
    requests.get(f"{proxy.url}/echo/v2/studies/7.8.9", headers=WITH_KEY, timeout=10)
    # A browser asked for the key would prompt; the URL's user info answers that prompt here.
    browser.get(f"http://user:{KEY}@127.0.0.1:{proxy.port}/-/")
    assert browser.find_element(By.CSS_SELECTOR, '[data-f="user"]').text == "radiologist@example.org"
    assert browser.find_element(By.ID, "base-url").text == f"{proxy.url}/v2"
    assert "/echo/v2/studies/7.8.9" in browser.find_element(By.CSS_SELECTOR, '[data-f="recent"]').text
    assert browser.find_element(By.CSS_SELECTOR, '[data-f="live"]').text == "Reload the page for fresh numbers."
    assert "X-Dicom-Proxy-Key" in browser.find_element(By.CSS_SELECTOR, ".keynote").text
    assert not browser.find_elements(By.CSS_SELECTOR, "button.copy")
    assert KEY not in browser.page_source
