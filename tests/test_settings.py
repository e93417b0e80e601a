"""Settings: precedence of the sources, validation, and the CLI's one-line errors. Nothing is served here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from yarl import URL

from proxy.cli import load_settings, main, parser
from proxy.settings import Settings

HERE = Path(__file__).parent
PRIORITY = str(HERE / "data" / "priority.toml")
EXAMPLE = str(HERE.parent / "config" / "dicom-auth-proxy.example.toml")


def settings_from(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    return load_settings(parser().parse_args(["serve", *argv]), environ or {})


def test_each_source_wins_over_the_ones_below_it():
    environ = {
        "DICOM_PROXY_CONFIG": PRIORITY,
        "DICOM_PROXY_LISTEN": "127.0.0.1:9002",
        "DICOM_PROXY_TENANT": "env-tenant",
    }
    settings = settings_from(["--tenant", "flag-tenant"], environ)
    assert settings.tenant == "flag-tenant"  # flag > env
    assert settings.listen_port == 9002  # env > file
    assert settings.credential == "managed-identity"  # file > default
    assert settings.upstream == URL("https://file-ws-file.dicom.azurehealthcareapis.com")
    assert settings.allowed_hosts[-1] == "from-file.example"
    assert settings.audience == "https://dicom.healthcareapis.azure.com"  # default
    assert settings.read_timeout == 300.0


def test_the_config_flag_beats_the_config_variable(tmp_path):
    other = tmp_path / "other.toml"
    other.write_text('upstream = "https://other-ws.dicom.azurehealthcareapis.com"\n')
    settings = settings_from(["--config", str(other)], {"DICOM_PROXY_CONFIG": PRIORITY})
    assert settings.upstream.host == "other-ws.dicom.azurehealthcareapis.com"


def test_lists_and_booleans_from_the_environment():
    settings = settings_from(
        ["--upstream", "https://ws.dicom.azurehealthcareapis.com/v2/"],
        {
            "DICOM_PROXY_READ_ONLY": "yes",
            "DICOM_PROXY_ALLOWED_HOSTS": "dicom-proxy, Viewer.Local",
            "DICOM_PROXY_CORS_ORIGINS": "https://viewer.example.org/",
        },
    )
    assert settings.read_only is True
    assert settings.allowed_hosts == ("localhost", "127.0.0.1", "[::1]", "dicom-proxy", "viewer.local")
    assert settings.cors_origins == ("https://viewer.example.org",)
    assert str(settings.upstream) == "https://ws.dicom.azurehealthcareapis.com/v2"


def test_the_example_config_file_is_valid():
    settings = settings_from(["--config", EXAMPLE])
    assert settings.upstream.host == "myworkspace-mydicom.dicom.azurehealthcareapis.com"
    assert (settings.listen_host, settings.listen_port, settings.credential) == ("127.0.0.1", 8080, "cli")


def test_the_access_key_is_kept_out_of_the_settings_repr(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("correct-horse-battery-staple\n")
    settings = settings_from(
        ["--upstream", "https://ws.example", "--listen", "0.0.0.0:8080", "--access-key-file", str(key_file)]
    )
    assert settings.access_key == "correct-horse-battery-staple"
    assert "correct-horse" not in repr(settings)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "--upstream: required"),
        (["--upstream", "ftp://ws.example"], {}, "--upstream: 'ftp://ws.example' must be an https:// URL"),
        (["--upstream", "http://ws.example"], {}, "plain http to another machine"),
        (["--upstream", "https://user:pw@ws.example"], {}, "must not carry credentials"),
        (["--upstream", "https://ws.example", "--listen", "8080"], {}, "--listen: expected HOST:PORT"),
        (["--upstream", "https://ws.example", "--listen", "127.0.0.1:99999"], {}, "outside 1-65535"),
        (
            ["--upstream", "https://ws.example", "--listen", "0.0.0.0:8080"],
            {},
            "reachable from other machines",
        ),
        (
            ["--upstream", "https://ws.example", "--ca-bundle", "/nonexistent.pem"],
            {},
            "--ca-bundle: cannot read /nonexistent.pem: No such file or directory",
        ),
        (["--upstream", "https://ws.example", "--ca-bundle", "/"], {}, "--ca-bundle: cannot read /: Is a directory"),
        (["--upstream", "https://ws.example", "--audience", "dicom"], {}, "--audience"),
        (["--upstream", "https://ws.example", "--tenant", "bad tenant!"], {}, "--tenant"),
        (["--upstream", "https://ws.example", "--cors-origin", "viewer"], {}, "--cors-origin"),
        (
            ["--upstream", "https://ws.example", "--read-timeout", "0"],
            {},
            "--read-timeout: must be more than 0",
        ),
        (["--upstream", "https://ws.example"], {"DICOM_PROXY_READ_ONLY": "maybe"}, "DICOM_PROXY_READ_ONLY"),
        (["--upstream", "https://ws.example"], {"DICOM_PROXY_ACCESS_KEY": "short"}, "shorter than 16"),
        (["--upstream", "https://ws.example"], {"HTTPS_PROXY": "socks5://p:1080"}, "HTTPS_PROXY"),
        (["--config", "/nonexistent.toml"], {}, "--config: cannot read /nonexistent.toml"),
        (["--upstream", "https://ws.example", "--workers", "0"], {}, "--workers: expected 1 to 64, got '0'"),
        (["--upstream", "https://ws.example"], {"DICOM_PROXY_WORKERS": "two"}, "--workers: expected a whole number"),
        (
            ["--upstream", "https://ws.example", "--dimse-listen", "0.0.0.0:11112"],
            {},
            "--dimse-listen: 0.0.0.0 is reachable from other machines; list the calling AE titles allowed",
        ),
        (["--upstream", "https://ws.example", "--dimse-listen", "11112"], {}, "--dimse-listen: expected HOST:PORT"),
        (["--upstream", "https://ws.example", "--dimse-aet", "A" * 17], {}, "--dimse-aet: 'AAAAAAAAAAAAAAAAA' is not"),
        (["--upstream", "https://ws.example", "--dimse-allow", "PACS@pacs.example"], {}, "is not an IP address"),
        (["--upstream", "https://ws.example", "--move-destination", "WS:11113"], {}, "expected AET=HOST:PORT"),
        (
            ["--upstream", "https://ws.example", "--dimse-listen", "127.0.0.1:11112", "--workers", "2"],
            {},
            "the DIMSE gateway runs in one process",
        ),
    ],
)
def test_bad_values_give_one_line_and_exit_code_2(argv, environ, message, capsys, monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *argv]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith("dicom-auth-proxy: error: ")
    assert message in error


def test_the_dimse_options_from_each_source():
    settings = settings_from(
        ["--upstream", "https://ws.example", "--dimse-listen", "0.0.0.0:11112", "--dimse-allow", "CT1@192.0.2.10"],
        {"DICOM_PROXY_DIMSE_ALLOW": "IGNORED", "DICOM_PROXY_MOVE_DESTINATIONS": "WS=ws.local:104, PACS=[::1]:11113"},
    )
    assert settings.dimse_listen == ("0.0.0.0", 11112) and settings.dimse_aet == "DICOMPROXY"
    assert settings.dimse_allow == (("CT1", "192.0.2.10"),)  # the flag beats the environment
    assert settings.move_destinations == (("WS", "ws.local", 104), ("PACS", "::1", 11113))
    assert settings_from(["--upstream", "https://ws.example"]).dimse_listen is None
    assert str(settings.upstream_dicomweb) == "https://ws.example/v2"
    assert str(settings_from(["--upstream", "http://127.0.0.1:8042/dicom-web"]).upstream_dicomweb).endswith(
        "/dicom-web"
    )


def test_a_ca_bundle_without_certificates_is_refused(tmp_path, capsys):
    not_pem = tmp_path / "key.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a binary, not PEM")
    assert main(["serve", "--upstream", "https://ws.example", "--ca-bundle", str(not_pem)]) == 2
    assert "holds no PEM certificate" in capsys.readouterr().err


def test_bad_config_files_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text("upstream = \n")
    assert main(["serve", "--config", str(broken)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('upstream = "https://ws.example"\nupstrem = "typo"\n')
    assert main(["serve", "--config", str(unknown)]) == 2
    assert "unknown key(s) upstrem" in capsys.readouterr().err
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text('upstream = "https://ws.example"\nread_only = "yes"\n')
    assert main(["serve", "--config", str(wrong_type)]) == 2
    assert "key read_only must be true or false" in capsys.readouterr().err


def test_https_proxy_is_chosen_once_and_no_proxy_is_honoured():
    https = {"HTTPS_PROXY": "http://corporate-proxy:3128"}
    settings = settings_from(["--upstream", "https://ws.example"], https)
    assert settings.upstream_proxy == URL("http://corporate-proxy:3128")
    bypassed = settings_from(["--upstream", "https://ws.example"], {**https, "NO_PROXY": ".example"})
    assert bypassed.upstream_proxy is None


def test_python_dash_m_and_the_console_script_agree():
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "ftp://x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("dicom-auth-proxy: error: --upstream")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--read-timeout", "nan"], "--read-timeout: expected a number, got 'nan'"),
        (["--connect-timeout", "nan"], "--connect-timeout: expected a number"),
        (["--shutdown-grace", "inf"], "--shutdown-grace: expected a number"),
        (["--rewrite-limit", "nan"], "--rewrite-limit: expected a number"),
    ],
)
def test_numbers_that_are_not_finite_are_refused_in_one_line(argv, message, capsys):
    assert main(["serve", "--upstream", "https://ws.example", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"dicom-auth-proxy: error: {message}")
    assert error.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--credential", "foo"], "argument --credential: invalid choice: 'foo'"),
        (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_argparse_errors_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--upstream", "https://ws.example", *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("dicom-auth-proxy")
    assert message in error
    assert error.count("\n") == 1, error


def test_the_readme_table_and_the_example_file_list_exactly_the_options_there_are():
    import re
    from pathlib import Path

    from proxy.settings import CONFIG_ENV, CONFIG_FLAG, OPTIONS, default_text

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    table = readme.split("| flag | environment | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    flags = {re.match(r"\| `(--[a-z-]+)", row).group(1) for row in rows}
    assert flags == {option.flag for option in OPTIONS if option.flag} | {CONFIG_FLAG}
    assert set(re.findall(r"DICOM_PROXY_[A-Z_]+", table)) == {option.env for option in OPTIONS} | {CONFIG_ENV}
    for option in OPTIONS:
        row = next((row for row in rows if row.startswith((f"| `{option.flag} ", f"| `{option.flag}`"))), "")
        if option.flag and default_text(option):
            cells = re.split(r"(?<!\\)\|", row)  # a `\|` inside a cell is not a column
            assert default_text(option) in cells[3].replace("`", ""), (option.flag, row)

    example = (root / "config" / "dicom-auth-proxy.example.toml").read_text()
    keys = set(re.findall(r"^#? ?([a-z_]+) = ", example, flags=re.MULTILINE))
    # The key itself belongs in the environment or a file of its own, never in the example.
    assert keys == {option.name for option in OPTIONS} - {"access_key"}


def test_options_given_in_mib_become_bytes_from_each_source(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('upstream = "https://ws-svc.dicom.azurehealthcareapis.com"\nrewrite_limit_mib = 0.5\n')
    settings = settings_from(["--config", str(config), "--read-ahead-mib", "3"])
    assert settings.read_ahead == 3 * 1024 * 1024
    assert settings.rewrite_limit == 512 * 1024
    from_environment = settings_from(["--config", str(config)], {"DICOM_PROXY_READ_AHEAD_MIB": "0"})
    assert from_environment.read_ahead == 0
    assert settings_from(["--config", str(config)]).read_ahead == 128 * 1024 * 1024
