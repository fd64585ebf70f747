"""The endpoint's security without a server: where the admin key comes from and how it is
checked, what clients send, the TLS file sets, the request-size figure, the benchmark config
keeping the key out of reports, the CLI refusing an exposed server without a key, and the
launcher that keeps secret arguments out of the process list (run on /bin/sh)."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import pytest

from algorithm.errors import ConfigError, InputFileNotFoundError
from algorithm.serving.config import BenchmarkConfig
from algorithm.serving.security import (
    ClientTls,
    GrpcTls,
    admin_headers,
    check_admin_key,
    is_loopback,
    max_request_bytes,
    read_admin_key,
    restriction_args,
)

KEY = secrets.token_hex(16)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),  # a name may resolve anywhere
    ],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_a_weak_or_malformed_key_is_refused_without_echoing_it():
    for bad in ("short", "x" * 15, "has space" * 3, "colon:" * 4, "comma,comma,comma,", None):
        with pytest.raises(ConfigError) as e:
            check_admin_key(bad)
        assert e.value.value == "<hidden>" and "openssl rand" in e.value.hint
        if bad:
            assert bad not in str(e.value)
    assert check_admin_key(KEY) == KEY


def test_the_key_comes_from_a_file_then_the_file_variable_then_the_variable(tmp_path, caplog):
    f = tmp_path / "key"
    f.write_text(KEY + "\n")
    f.chmod(0o600)
    other = tmp_path / "other"
    other.write_text("b" * 32)
    other.chmod(0o600)
    env = {"TRITON_ADMIN_KEY_FILE": str(other), "TRITON_ADMIN_KEY": "c" * 32}
    assert read_admin_key(f, env) == KEY
    assert read_admin_key(None, env) == "b" * 32
    assert read_admin_key(None, {"TRITON_ADMIN_KEY": "c" * 32}) == "c" * 32
    assert read_admin_key(None, {}) is None
    with pytest.raises(InputFileNotFoundError) as e:
        read_admin_key(tmp_path / "missing", {})
    assert "openssl rand" in e.value.hint
    f.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="algorithm.serving.security"):
        assert read_admin_key(f, {}) == KEY
    assert "readable by others" in caplog.text and KEY not in caplog.text


def test_clients_send_the_header_or_the_grpc_metadata_and_the_flags_carry_it():
    assert admin_headers(KEY, "http") == {"admin-key": KEY}
    assert admin_headers(KEY, "grpc") == {"triton-grpc-protocol-admin-key": KEY}
    assert admin_headers(None, "grpc") is None
    http, grpc = restriction_args(("model-repository", "statistics"), "admin-key", KEY)
    assert http == f"--http-restricted-api=model-repository,statistics:admin-key={KEY}"
    assert grpc == f"--grpc-restricted-protocol=model-repository,statistics:admin-key={KEY}"


def test_tls_file_sets_are_checked(tmp_path):
    pem = tmp_path / "a.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(InputFileNotFoundError):
        GrpcTls(str(pem), str(tmp_path / "missing.key")).validate()
    tls = GrpcTls(str(pem), str(pem), str(pem)).validate()
    assert tls.mutual and "--grpc-use-ssl-mutual=true" in tls.server_args()
    assert "--grpc-use-ssl-mutual=true" not in GrpcTls(str(pem), str(pem)).validate().server_args()
    with pytest.raises(ConfigError) as e:
        ClientTls(str(pem), cert_file=str(pem)).validate()
    assert e.value.field == "key_file"
    kwargs = ClientTls(str(pem)).validate().grpc_kwargs()
    assert kwargs["ssl"] is True and kwargs["root_certificates"] == str(pem)


def test_the_largest_request_is_four_int64_inputs_plus_framing():
    assert max_request_bytes(64, 1024) == 64 * 1024 * 4 * 8 + 65536


def test_benchmark_config_names_the_key_file_never_the_key(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("x")
    cfg = BenchmarkConfig(admin_key_file=str(tmp_path / "key"), tls=True, tls_ca_file=str(pem))
    assert cfg.client_tls().ca_file == str(pem.resolve())
    assert "admin_key" not in cfg.to_dict() and cfg.to_dict()["admin_key_file"].endswith("key")
    with pytest.raises(ConfigError) as e:
        BenchmarkConfig(tls_ca_file=str(pem))
    assert e.value.field == "tls"
    with pytest.raises(InputFileNotFoundError):
        BenchmarkConfig(tls=True, tls_ca_file=str(tmp_path / "missing.pem"))


def test_serve_refuses_an_exposed_server_without_a_key(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from algorithm.serving.cli import app

    monkeypatch.delenv("TRITON_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TRITON_ADMIN_KEY_FILE", raising=False)
    (tmp_path / "repo").mkdir()
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "repo"), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "admin_key" in result.output and "TRITON_ADMIN_KEY" in result.output


@pytest.mark.skipif(not shutil.which("sh"), reason="needs /bin/sh")
def test_secret_arguments_reach_the_program_but_not_its_command_line(tmp_path):
    from algorithm.serving.triton.secret_argv import popen_with_secret_args, scrub_secret_args

    secret = f"--flag={KEY}"
    out, go = tmp_path / "seen", tmp_path / "go"
    script = (
        'printf %s "$1" > "$2"; env > "$2.env"; '
        'i=0; while [ ! -e "$3" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done'
    )
    env = {"PATH": os.environ["PATH"], "TRITON_ADMIN_KEY_ELSEWHERE": "x"}
    proc = popen_with_secret_args(
        ["sh", "-c", script, "sh", "--placeholder", str(out), str(go)], {4: secret}, env
    )
    try:
        for _ in range(200):  # bounded: the script writes at once
            if out.exists() and Path(f"{out}.env").exists() and out.stat().st_size:
                break
            time.sleep(0.05)
        assert out.read_text() == secret  # the program got the real argument
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert KEY.encode() not in cmdline and b"--ugt-secret-argument-4" in cmdline
        assert KEY not in Path(f"{out}.env").read_text()  # nor its environment (or children's)
        environ = Path(f"/proc/{proc.pid}/environ")
        assert KEY.encode() in environ.read_bytes()  # owner-only, until scrubbed
        assert scrub_secret_args(proc)
        assert KEY.encode() not in environ.read_bytes()
    finally:
        go.touch()
        proc.wait(15)
    assert proc.returncode == 0


def test_a_refused_trace_kills_nothing_visible_and_names_the_cause(monkeypatch):
    """Where the kernel refuses ptrace (seccomp, Yama >= 2) the start fails loudly: the child
    never runs the program, so the secret is never in anyone's process list."""
    from algorithm.errors import ServerError
    from algorithm.serving.triton import secret_argv

    def refused(then):
        return lambda: os._exit(secret_argv._TRACE_EXIT)  # what a failed PTRACE_TRACEME does

    monkeypatch.setattr(secret_argv, "_trace_me", refused)
    with pytest.raises(ServerError) as e:
        secret_argv.popen_with_secret_args(
            ["sh", "-c", "exit 0", "sh", "x"], {4: "secret"}, {"PATH": os.environ["PATH"]}
        )
    assert "ptrace" in e.value.hint
    with pytest.raises(ValueError):
        secret_argv.popen_with_secret_args(["sh"], {0: "s"}, {})
