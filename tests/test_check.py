"""`dicom-auth-proxy check` against the az stand-in and the fake upstream, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import free_port

OTHER_AUDIENCE_WARNING = (
    "https://management.azure.com is not the DICOM service's audience (https://dicom.healthcareapis.azure.com)"
)


def check(env, *flags: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", *flags], env=env, capture_output=True, text=True, timeout=60
    )


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Step name -> its whole line."""
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith(("ok  ", "FAIL", "warn")):
            found[line[6:].split(":", 1)[0]] = line
    return found


def test_everything_passes_with_a_good_setup(proxy_env, upstream, ca_bundle, az):
    result = check(proxy_env, "--upstream", upstream.url, "--ca-bundle", str(ca_bundle))
    assert result.returncode == 0, result.stdout
    found = lines(result)
    assert list(found) == [
        "az found",
        "signed in",
        "audience",
        "identity",
        "expiry",
        "upstream reachable",
        "upstream accepts the token",
    ]
    assert all(line.startswith("ok  ") for line in found.values())
    assert str(az.directory / "az") in found["az found"]
    assert "radiologist@example.org in tenant tenant-one" in found["identity"]
    assert f"GET {upstream.url}/v2/studies?limit=1 answered 200" in found["upstream accepts the token"]
    assert result.stdout.rstrip().endswith("all checks passed")
    assert az.issued_tokens()[0].split(".")[1] not in result.stdout + result.stderr


def test_logged_out(proxy_env, upstream, ca_bundle, az):
    az.configure(mode="logged_out")
    result = check(proxy_env, "--upstream", upstream.url, "--ca-bundle", str(ca_bundle))
    assert result.returncode == 1
    found = lines(result)
    assert found["signed in"].startswith("FAIL") and "fix: run 'az login'" in found["signed in"]
    assert found["upstream reachable"].startswith("ok")
    assert "upstream accepts the token" not in found
    assert "get_token_info" not in result.stdout + result.stderr, "azure-identity's own warning repeats the finding"


def test_az_missing(proxy_env, upstream, ca_bundle, tmp_path):
    result = check(dict(proxy_env, PATH=str(tmp_path)), "--upstream", upstream.url, "--ca-bundle", str(ca_bundle))
    assert result.returncode == 1
    assert "install the Azure CLI" in lines(result)["az found"]


def test_wrong_audience_is_named(proxy_env, upstream, ca_bundle, az):
    az.configure(audience="https://management.azure.com")
    result = check(proxy_env, "--upstream", upstream.url, "--ca-bundle", str(ca_bundle))
    assert result.returncode == 1
    found = lines(result)
    assert found["audience"].startswith("FAIL  audience: the token is for https://management.azure.com")
    assert "dicom.healthcareapis" not in found["signed in"], "signed in must not claim the DICOM audience"
    assert "401, wrong audience" in found["upstream accepts the token"]
    assert "--audience https://dicom.healthcareapis.azure.com" in found["upstream accepts the token"]


def test_an_audience_that_is_not_the_dicom_services_is_a_warning_not_ok(proxy_env, upstream, ca_bundle, az):
    """A real az always returns the audience asked for, so the step compares with the DICOM audience instead."""
    result = check(
        proxy_env,
        "--upstream",
        upstream.url,
        "--ca-bundle",
        str(ca_bundle),
        "--audience",
        "https://management.azure.com",
    )
    found = lines(result)
    assert found["audience"].startswith(f"warn  audience: {OTHER_AUDIENCE_WARNING}")
    # The fake service, like the real one, refuses a management token: that step fails, the audience only warns.
    assert result.stdout.rstrip().endswith("1 check(s) failed, 1 warning")


def test_a_proxy_with_another_audience_warns_at_start_up(start_proxy):
    proxy = start_proxy("--audience", "https://management.azure.com")
    warnings = [line for line in proxy.output().splitlines() if OTHER_AUDIENCE_WARNING in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], proxy.output()


def test_az_printing_something_that_is_not_json(proxy_env, upstream, ca_bundle, az):
    az.configure(mode="garbage")
    result = check(proxy_env, "--upstream", upstream.url, "--ca-bundle", str(ca_bundle))
    assert result.returncode == 1
    line = lines(result)["signed in"]
    assert line.startswith('FAIL  signed in: az printed something that is not a token: "this is not json"')
    assert "az upgrade" in line and "az login" not in line


def test_missing_role_is_told_apart_from_a_bad_token(proxy_env, upstream, ca_bundle):
    upstream.refuse_with = 403
    result = check(proxy_env, "--upstream", upstream.url, "--ca-bundle", str(ca_bundle))
    assert result.returncode == 1
    line = lines(result)["upstream accepts the token"]
    assert "403, the identity has no DICOM role" in line and "DICOM Data Reader" in line


def test_untrusted_tls_and_unreachable_upstreams(proxy_env, upstream, ca_bundle):
    untrusted = check(proxy_env, "--upstream", upstream.url)
    assert untrusted.returncode == 1
    assert "--ca-bundle" in lines(untrusted)["upstream reachable"]
    down = check(proxy_env, "--upstream", f"https://127.0.0.1:{free_port()}", "--ca-bundle", str(ca_bundle))
    assert down.returncode == 1
    assert lines(down)["upstream reachable"].startswith("FAIL")
    assert "Traceback" not in untrusted.stderr + down.stderr


@pytest.mark.parametrize(
    ("upstream", "probe"),
    [
        (
            "https://ws-svc.dicom.azurehealthcareapis.com",
            "https://ws-svc.dicom.azurehealthcareapis.com/v2/studies?limit=1",
        ),
        (
            "https://ws-svc.dicom.azurehealthcareapis.com/v1",
            "https://ws-svc.dicom.azurehealthcareapis.com/v1/studies?limit=1",
        ),
        ("http://127.0.0.1:8042/dicom-web", "http://127.0.0.1:8042/dicom-web/studies?limit=1"),
    ],
)
def test_check_probes_the_base_a_viewer_uses(upstream, probe):
    from yarl import URL

    from proxy.check import probe_url
    from proxy.settings import Settings

    assert probe_url(Settings(upstream=URL(upstream))) == probe


def test_a_blank_credential_message_does_not_break_the_diagnosis():
    from proxy.tokens import first_line

    assert first_line("  \n") == "unknown error"
    assert first_line("ERROR: Please run 'az login'.\nMore at https://aka.ms/...") == "ERROR: Please run 'az login'."
