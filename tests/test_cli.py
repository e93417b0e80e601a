"""The CLI as a user runs it (`python -m proxy`): every bad value is one line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

UPSTREAM = ["--upstream", "https://ws.example"]
FAKE_PEM = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


def run_cli(argv: list[str], environ: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real entry point in its own process; a value that is wrongly accepted starts serving, hence the timeout."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), **environ}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


# (argv, environment, config file text, what the one line must say)
BAD_VALUES = [
    # host:port, one parser for --listen, --dimse-listen and --move-destination
    (["--listen", "127.0.0.1:²"], {}, None, "--listen: expected HOST:PORT"),
    (["--listen", "127.0.0.1:١٨٠٩٩"], {}, None, "--listen: expected HOST:PORT"),
    (["--listen", "[::1:8080"], {}, None, "--listen: expected HOST:PORT"),
    (["--listen", "bad host:8080"], {}, None, "--listen: 'bad host' is not a host name or IP address"),
    (["--dimse-listen", "127.0.0.1:١١١١٢"], {}, None, "--dimse-listen: expected HOST:PORT"),
    ([], {"DICOM_PROXY_MOVE_DESTINATIONS": "A=[::1"}, None, "--move-destination: expected HOST:PORT"),
    ([], {"DICOM_PROXY_MOVE_DESTINATIONS": "A=pacs:١٠٤"}, None, "--move-destination: expected HOST:PORT"),
    ([], {"DICOM_PROXY_LISTEN": "127.0.0.1:0x50"}, None, "--listen: expected HOST:PORT"),
    # numbers: one parser for every numeric option, from a flag, the environment or the file
    (["--rewrite-limit", "1e305"], {}, None, "--rewrite-limit: must be more than 0 and at most"),
    (["--read-timeout", "nan"], {}, None, "--read-timeout: expected a number"),
    (["--connect-timeout", "inf"], {}, None, "--connect-timeout: expected a number"),
    (["--connect-timeout", "-1"], {}, None, "--connect-timeout: must be more than 0"),
    (["--shutdown-grace", "1e400"], {}, None, "--shutdown-grace: must be more than 0 and at most"),
    (["--read-timeout", "١٠"], {}, None, "--read-timeout: expected a number"),
    (["--workers", "١"], {}, None, "--workers: expected a whole number"),
    (["--workers", "abc"], {}, None, "--workers: expected a whole number, got 'abc'"),
    ([], {"DICOM_PROXY_WORKERS": "99999999999999999999999"}, None, "--workers: expected 1 to 64"),
    ([], {"DICOM_PROXY_READ_TIMEOUT": "1e305"}, None, "--read-timeout: must be more than 0 and at most"),
    ([], {}, "read_timeout = nan\n", "--read-timeout: expected a number"),
    ([], {}, "shutdown_grace = -inf\n", "--shutdown-grace: must be more than 0"),
    ([], {}, "connect_timeout = inf\n", "--connect-timeout: must be more than 0 and at most"),
    ([], {}, "workers = 1.5\n", "key workers must be a whole number"),
    ([], {}, "rewrite_limit_mib = 1e305\n", "--rewrite-limit: must be more than 0 and at most"),
    # URLs: one parser for --upstream, --audience, --cors-origin and HTTPS_PROXY
    (["--cors-origin", "http://[::1"], {}, None, "--cors-origin: 'http://[::1' is not a URL"),
    ([], {"DICOM_PROXY_CORS_ORIGINS": "http://[::1"}, None, "--cors-origin: 'http://[::1' is not a URL"),
    ([], {}, 'cors_origins = ["http://[::1"]\n', "--cors-origin: 'http://[::1' is not a URL"),
    (["--audience", "https://[x"], {}, None, "--audience: 'https://[x' is not a URL"),
    ([], {"HTTPS_PROXY": "http://[::1"}, None, "HTTPS_PROXY: 'http://[::1' is not a URL"),
    ([], {"HTTPS_PROXY": "http://user:secret-password@[::1"}, None, "HTTPS_PROXY: 'http://***@[::1' is not a URL"),
    # a file that looks like PEM but holds no certificate
    (["--ca-bundle", "{fake_pem}"], {}, None, "--ca-bundle: {fake_pem} holds no certificate that can be loaded"),
]


@pytest.mark.parametrize(("argv", "environ", "config", "message"), BAD_VALUES)
def test_every_bad_value_is_one_line_and_exit_code_2(argv, environ, config, message, tmp_path):
    fake_pem = tmp_path / "fake.pem"
    fake_pem.write_text(FAKE_PEM)
    argv = [arg.format(fake_pem=fake_pem) for arg in argv]
    if config is not None:
        (tmp_path / "proxy.toml").write_text(config)
        argv = ["--config", str(tmp_path / "proxy.toml"), *argv]
    result = run_cli([*UPSTREAM, *argv], environ, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("dicom-auth-proxy: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert message.format(fake_pem=fake_pem) in result.stderr
    assert "secret-password" not in result.stderr


def test_the_license_is_an_spdx_expression_that_the_build_backend_understands():
    """A `license = { text = ... }` table stops building with setuptools after 2027-02-18; a string needs >= 77."""
    import tomllib

    from packaging.licenses import canonicalize_license_expression
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    license_text = project["project"]["license"]
    assert isinstance(license_text, str), "an SPDX string, not a table"
    assert canonicalize_license_expression(license_text) == license_text
    backend = next(Requirement(item) for item in project["build-system"]["requires"] if item.startswith("setuptools"))
    floor = min(Version(spec.version) for spec in backend.specifier if spec.operator == ">=")
    assert floor >= Version("77"), "setuptools reads an SPDX license string from version 77 on"
    assert not any(item.startswith("License ::") for item in project["project"].get("classifiers", []))
