"""Security settings without a cluster: ``raftfast certs``, the TLS and roles flags of
``raftfast-node`` (bad ones exit 2 with one line), the roles file, and the authorizer."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from raftfast.security.roles import METHOD_ROLES, Authorizer, Role, load_roles
from raftfast.server.node_cli import ConfigError, parse_settings

ROOT = Path(__file__).resolve().parents[2]
PEERS = "n1=127.0.0.1:7101,n2=127.0.0.1:7102,n3=127.0.0.1:7103"


def certs(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "raftfast.client.cli", "certs", "--dir", str(tmp / "tls"), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)}
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("certs")
    done = certs(tmp, "--nodes", "n1,n2,n3", "--clients", "admin=admin,app=write,viewer=read")
    assert done.returncode == 0, done.stderr
    return tmp / "tls"


def test_certs_makes_everything_a_tls_node_needs(made):
    for name in ("ca", "peer-ca", "n1", "n1-peer", "admin", "app", "viewer"):
        assert (made / f"{name}.crt").read_text().startswith("-----BEGIN CERTIFICATE")
        assert stat.S_IMODE((made / f"{name}.key").stat().st_mode) == 0o600
    assert load_roles(str(made / "roles.toml")) == {
        "admin": Role.ADMIN,
        "app": Role.WRITE,
        "viewer": Role.READ,
    }
    s = parse_settings(
        [
            "--config", str(made / "n1.toml"), "--id", "n1", "--listen", "127.0.0.1:7001",
            "--peer-listen", "127.0.0.1:7101", "--peers", PEERS, "--data-dir", str(made / "d"),
        ],
        {},
    )  # fmt: skip
    assert s.client_cert_auth and s.peer_tls is not None and s.client_tls is not None
    assert s.peer_address == "127.0.0.1:7101" and s.listen == "127.0.0.1:7001"


def test_certs_refuses_what_it_cannot_make_and_never_overwrites(made, tmp_path):
    again = certs(made.parent, "--nodes", "n1")
    assert again.returncode == 2 and "exists" in again.stderr and "--force" in again.stderr
    for args, words in [
        (("--nodes", "n1", "--clients", "n1=admin"), "both a node and a client"),
        (("--nodes", "n1", "--clients", "x=root"), "read|write|admin"),
        (("--nodes", "n" * 65), "longer than 64"),
        (("--nodes", ""), "at least one"),
        (("--nodes", "n1", "--clients", "app=write,app=admin"), "'app' appears twice"),
        (("--nodes", "n1", "--days", "999999999"), "--days must be in"),  # (a traceback)
        (("--nodes", "n1", "--days", str(2**64)), "--days must be in"),
        (("--nodes", "n1", "--days", "0"), "--days must be in"),
        # Names are file names: none may write over another file or outside --dir.
        (("--nodes", "ca"), "ca.crt would be written twice"),  # (the client CA's)
        (("--nodes", "roles"), "roles.toml would be written twice"),  # (--auth-roles')
        (("--nodes", "peer-ca"), "peer-ca.crt would be written twice"),
        (("--nodes", "n1,n1-peer"), "n1-peer.crt would be written twice"),
        (("--nodes", "n1", "--clients", "ca=admin"), "ca.crt would be written twice"),
        (("--nodes", "n1", "--clients", "../x=admin"), "cannot name files"),
        (("--nodes", "CA"), "CA.crt would be written over ca.crt"),  # (one file on macOS)
        (("--nodes", "n1,N1"), "N1.crt would be written over n1.crt"),
        (("--nodes", "n1", "--clients", "N1=admin"), "both a node and a client"),
        (("--nodes", "a/b"), "cannot name files"),
        (("--nodes", ".."), "cannot name files"),
    ]:
        done = certs(tmp_path, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr
    assert not (tmp_path / "tls").exists()


def _settings(tmp: Path, *extra: str):
    args = ["--id", "n1", "--listen", "127.0.0.1:7001", "--data-dir", str(tmp / "d")]
    return parse_settings([*args, "--peers", PEERS, *extra], {})


def test_certs_add_signs_more_with_the_cas_already_there(tmp_path):
    """A node added to a running TLS cluster (or a dead one replaced under a new id) needs
    certificates from the cluster's CAs: `certs` could only make new CAs."""
    assert certs(tmp_path, "--nodes", "n1", "--clients", "admin=admin").returncode == 0
    tls = tmp_path / "tls"
    cas = {name: (tls / name).read_bytes() for name in ("ca.crt", "ca.key", "peer-ca.crt")}
    done = certs(tmp_path, "--add", "--nodes", "n4", "--clients", "app=write")
    assert done.returncode == 0, done.stderr
    assert cas == {name: (tls / name).read_bytes() for name in cas}  # (the same CAs)
    assert load_roles(str(tls / "roles.toml")) == {"admin": Role.ADMIN, "app": Role.WRITE}
    for leaf, ca in (("n4.crt", "ca.crt"), ("n4-peer.crt", "peer-ca.crt"), ("app.crt", "ca.crt")):
        issuer = x509.load_pem_x509_certificate((tls / ca).read_bytes())
        cert = x509.load_pem_x509_certificate((tls / leaf).read_bytes())
        cert.verify_directly_issued_by(issuer)  # (raises if another CA signed it)
        assert cert.not_valid_after_utc <= issuer.not_valid_after_utc
    assert (tls / "n4.toml").exists()
    for args, words in [
        (("--add", "--nodes", "n4"), "n4.crt exists"),
        (("--add", "--clients", "app=read"), "'app' is in roles.toml already"),
        (("--add",), "name the --nodes or --clients"),
        (("--add", "--nodes", "admin"), "'admin' is a client in roles.toml"),
        (("--add", "--clients", "N4=read"), "'N4' is a node here"),
    ]:
        done = certs(tmp_path, *args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
    done = certs(tmp_path / "elsewhere", "--add", "--nodes", "n5")
    assert done.returncode == 2 and "make the CAs first" in done.stderr


def test_tls_flags_that_cannot_work_are_refused(made, tmp_path):
    cert, key, ca = str(made / "n1.crt"), str(made / "n1.key"), str(made / "ca.crt")
    pcert, pkey, pca = (
        str(made / "n1-peer.crt"),
        str(made / "n1-peer.key"),
        str(made / "peer-ca.crt"),
    )
    sep = ["--peer-listen", "127.0.0.1:7101"]
    roles = tmp_path / "roles.toml"
    roles.write_text('[roles]\nbob = "root"\n')
    fake_ca = tmp_path / "fake-ca.crt"
    fake_ca.write_text("-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n")
    for extra, words in [
        (["--cert-file", cert, *sep], "go together"),
        (["--cert-file", cert, "--key-file", key, "--client-cert-auth", *sep], "--trusted-ca-file"),
        (["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, *sep], "add --client"),
        (["--peer-cert-file", pcert, "--peer-key-file", pkey, *sep], "peer TLS needs"),
        (["--cert-file", cert, "--key-file", key], "--peer-listen"),  # one port for both faces
        (["--auth-roles", str(roles)], "--client-cert-auth"),
        (
            ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
             "--auth-roles", str(roles), *sep],
            "read, write or admin",
        ),
        (["--cert-file", str(tmp_path / "nope.crt"), "--key-file", key, *sep], "cannot read"),
        (["--cert-file", str(roles), "--key-file", key, *sep], "not PEM"),
        # (a CA that only looks like PEM: gRPC said "cannot listen ... (address in use?)",
        # the TCP stream "[X509] PEM lib", exit 1, after the data directory was made)
        (
            ["--cert-file", cert, "--key-file", key, "--trusted-ca-file", str(fake_ca),
             "--client-cert-auth", *sep],
            "CA file .* holds no certificate",
        ),
        (
            ["--peer-cert-file", pcert, "--peer-key-file", pkey, "--peer-trusted-ca-file",
             str(fake_ca), *sep],
            "CA file .* holds no certificate",
        ),
        # (gRPC said "cannot listen ... (address in use?)", exit 1: restarted for ever)
        (["--cert-file", cert, "--key-file", str(made / "n2.key"), *sep], "does not go with"),
        # (n2's certificate: n1 ran, every peer refused it, and nothing said why)
        (
            ["--peer-cert-file", str(made / "n2-peer.crt"), "--peer-key-file",
             str(made / "n2-peer.key"), "--peer-trusted-ca-file", pca, *sep],
            "a certificate for 'n2' .* not for this node 'n1'",
        ),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            _settings(tmp_path, *extra)
    s = _settings(
        tmp_path,
        *sep,
        "--peer-cert-file", pcert, "--peer-key-file", pkey, "--peer-trusted-ca-file", pca,
    )  # fmt: skip
    assert s.peer_tls is not None and s.client_tls is None  # TLS between nodes only
    # A bundle's comments need not be ASCII (OpenSSL and gRPC skip them): taken.
    commented = tmp_path / "commented-ca.crt"
    comment = "# Issuer: Főtanúsítvány\n".encode()
    commented.write_bytes(comment + (made / "peer-ca.crt").read_bytes())
    s = _settings(
        tmp_path,
        *sep,
        "--peer-cert-file", pcert, "--peer-key-file", pkey, "--peer-trusted-ca-file",
        str(commented),
    )  # fmt: skip
    assert s.peer_tls is not None


def test_a_bad_roles_file_is_one_clear_line(tmp_path):
    path = tmp_path / "roles.toml"
    for text, words in [
        ("[roles\n", "bad TOML"),
        ('[users]\nbob = "read"\n', "unknown table"),
        ("roles = 3\n", "a table"),
        ("[roles]\nbob = 1\n", "read, write or admin"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_roles(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        load_roles(str(tmp_path / "missing.toml"))
    path.write_text('[roles]\nBob = "Admin"\n')
    assert load_roles(str(path)) == {"Bob": Role.ADMIN}


def test_a_roles_file_with_no_name_too_deep_or_too_big_is_one_line(made, tmp_path):
    """(An empty name was taken; deep nesting was a RecursionError traceback, exit 1; there was
    no bound at all: --auth-roles /dev/zero was read until memory ran out.)"""
    path = tmp_path / "roles.toml"
    for text, words in [
        ('[roles]\n"" = "admin"\n', "a client name is empty"),
        ('[roles]\n" " = "read"\n', "a client name is empty"),
        ("[roles]\nx = " + "[\n" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ("[roles]\n" + 'a = "read"\n' * 7000, "larger than 65536 bytes"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_roles(str(path))
    with pytest.raises(ValueError, match="larger than 65536 bytes"):
        load_roles("/dev/zero")
    # and at the node's start: exit 2, one line
    path.write_text('[roles]\n"" = "admin"\n')
    tls = [
        "--cert-file", str(made / "n1.crt"), "--key-file", str(made / "n1.key"),
        "--trusted-ca-file", str(made / "ca.crt"), "--client-cert-auth",
        "--peer-listen", "127.0.0.1:7101", "--auth-roles", str(path),
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="a client name is empty"):
        _settings(tmp_path, *tls)


def test_a_peer_ca_that_is_the_client_ca_is_warned_of_once(made, tmp_path, monkeypatch, caplog):
    """docs/security.md: with one CA for both, a client certificate named like a node speaks
    as that node on the peer port. Refused it is not (a test cluster may want it): a WARNING."""
    from raftfast.server import node_cli

    monkeypatch.setattr(node_cli, "_run_serve", lambda settings, machine=None: None)
    copy = tmp_path / "copy-of-ca.crt"
    copy.write_bytes((made / "ca.crt").read_bytes())
    common = [
        "--id", "n1", "--listen", "127.0.0.1:7001", "--peers", PEERS,
        "--cert-file", str(made / "n1.crt"), "--key-file", str(made / "n1.key"),
        "--trusted-ca-file", str(made / "ca.crt"), "--client-cert-auth",
        "--peer-listen", "127.0.0.1:7101", "--peer-cert-file", str(made / "n1-peer.crt"),
        "--peer-key-file", str(made / "n1-peer.key"),
    ]  # fmt: skip
    for n, (peer_ca, warned) in enumerate(
        [(made / "ca.crt", True), (copy, True), (made / "peer-ca.crt", False)]
    ):
        caplog.clear()
        argv = [
            *common,
            "--peer-trusted-ca-file",
            str(peer_ca),
            "--data-dir",
            str(tmp_path / f"d{n}"),
        ]
        assert node_cli.main(argv) == 0
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        lines = [line for line in lines if "--peer-trusted-ca-file" in line]
        assert len(lines) == (1 if warned else 0), (peer_ca, lines)
        if warned:
            assert "is the clients' CA" in lines[0] and "speak as that node" in lines[0]


def test_certs_refuses_bad_hosts_and_says_when_it_cannot_write(tmp_path):
    """(--hosts "a b" wrote a certificate for the DNS name "a b"; a byte that is no character
    showed the cryptography library's advice; --dir naming a file exited 1, "not found".)"""
    for hosts, words in [
        ("a b", "'a b' is neither an IP address nor a host name"),
        (b"\xff", "is neither an IP address nor a host name"),  # (not UTF-8)
        ("bad..name", "'bad..name' is neither"),
        ("-x.example", "is neither"),
        ("x-.example", "is neither"),
        ("a/b", "is neither"),
    ]:
        flag = b"--hosts=" + hosts if isinstance(hosts, bytes) else f"--hosts={hosts}"
        done = certs(tmp_path, "--nodes", "n1", flag)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr
    assert not (tmp_path / "tls").exists()
    (tmp_path / "tls").write_text("a file")
    done = certs(tmp_path, "--nodes", "n1")
    assert done.returncode == 5, done.stderr  # ExitCode.FAILED: a file that cannot be written
    assert (
        done.stderr
        == f"error: cannot write the certificates to {tmp_path / 'tls'}: Not a directory\n"
    )
    hosts = "localhost,*.example.com,node_1.internal,xn--bcher-kva.example,[::1],10.0.0.1"
    done = certs(tmp_path / "ok", "--nodes", "n1", "--hosts", hosts)
    assert done.returncode == 0, done.stderr


class _Context:
    def __init__(self, name: str | None) -> None:
        self.name = name

    def auth_context(self) -> dict:
        return {"x509_common_name": [self.name.encode()]} if self.name else {}


def test_the_authorizer_maps_names_to_roles():
    auth = Authorizer({"viewer": Role.READ, "ops": Role.ADMIN}, checked=True)
    assert auth.refusal(_Context("viewer"), Role.READ, "Get") is None
    assert "has role read; Put needs write" in auth.refusal(_Context("viewer"), Role.WRITE, "Put")
    assert "no role" in auth.refusal(_Context("nobody"), Role.READ, "Get")
    assert "no role" in auth.refusal(_Context(None), Role.READ, "Get")
    assert auth.refusal(_Context("ops"), Role.ADMIN, "MemberRemove") is None
    everyone = Authorizer(None, checked=True)  # --client-cert-auth without --auth-roles
    assert everyone.refusal(_Context("anyone"), Role.ADMIN, "MemberRemove") is None
    # a method nobody listed needs admin
    assert METHOD_ROLES.get("/raftfast.v1.Admin/MemberRemove", Role.ADMIN) == Role.ADMIN
    assert METHOD_ROLES["/raftfast.v1.KV/Put"] == Role.WRITE


def test_every_client_method_has_the_role_the_docs_give_it():
    from raftfast.proto import raftfast_pb2 as pb

    roles = {}
    for service in ("KV", "StateMachine", "Admin"):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            path = f"/raftfast.v1.{service}/{method.name}"
            roles[path] = METHOD_ROLES.get(path, Role.ADMIN)  # (what the interceptor does)
    assert roles["/raftfast.v1.StateMachine/Propose"] == Role.WRITE
    assert roles["/raftfast.v1.StateMachine/Query"] == Role.READ
    writes = {p.rsplit("/", 1)[1] for p, r in roles.items() if r == Role.WRITE}
    reads = {p.rsplit("/", 1)[1] for p, r in roles.items() if r == Role.READ}
    assert writes == {"Put", "Delete", "CompareAndSwap", "Propose"}
    assert reads == {"Get", "Scan", "Status", "Session", "Query", "MemberList", "AlarmList"}
    from raftfast.proto.etcd import rpc_pb2 as etcd_pb

    etcd = {}
    for service in etcd_pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            path = f"/etcdserverpb.{service.name}/{method.name}"
            etcd[path] = METHOD_ROLES.get(path, Role.ADMIN)
    etcd_reads = {p.split(".", 1)[1] for p, r in etcd.items() if r == Role.READ}
    etcd_writes = {p.split(".", 1)[1] for p, r in etcd.items() if r == Role.WRITE}
    assert etcd_reads == {
        "KV/Range",
        "Watch/Watch",
        "Lease/LeaseTimeToLive",
        "Lease/LeaseLeases",
        "Cluster/MemberList",
        "Maintenance/Status",
        "Maintenance/Hash",
        "Maintenance/HashKV",
    }
    assert etcd_writes == {
        "KV/Put",
        "KV/DeleteRange",
        "KV/Txn",
        "KV/Compact",
        "Lease/LeaseGrant",
        "Lease/LeaseRevoke",
        "Lease/LeaseKeepAlive",
    }
    # (no role for a method that does not exist)
    assert set(METHOD_ROLES) <= set(roles) | set(etcd)


def test_certs_says_when_stdout_cannot_take_what_it_wrote(tmp_path):
    """The files are written; the list of them is not: exit 6 (OutputError), not "cannot
    write the certificates" (exit 1: a rerun then found the files and refused)."""
    cmd = [sys.executable, "-m", "raftfast.client.cli", "certs", "--dir", str(tmp_path / "tls")]
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" >/dev/full', "sh", *cmd, "--nodes", "n1"],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 6 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot write what they are to stdout" in done.stderr
    assert (tmp_path / "tls" / "n1.toml").exists()


def test_a_restart_that_leaves_tls_out_is_refused(made, tmp_path):
    # A TLS node restarted with --data-dir alone came back plain: with two such nodes a plain
    # majority served reads and writes to anyone (an operators' hunt). node.json records what
    # the node was started with, and a restart without it is refused unless asked for.
    from raftfast.server.node_cli import load_identity, write_identity

    data = tmp_path / "n1"
    first = [
        "--config", str(made / "n1.toml"), "--id", "n1", "--listen", "127.0.0.1:7001",
        "--peer-listen", "127.0.0.1:7101", "--peers", PEERS, "--data-dir", str(data),
    ]  # fmt: skip
    write_identity(parse_settings(first, {}))
    secured = ["peer_tls", "client_tls", "client_cert_auth", "auth_roles"]
    assert load_identity(str(data))["secured"] == secured
    with pytest.raises(ConfigError, match=", ".join(secured)) as refused:
        parse_settings(["--data-dir", str(data)], {})
    assert "--config" in str(refused.value) and "--drop-tls" in str(refused.value)
    again = parse_settings(["--config", str(made / "n1.toml"), "--data-dir", str(data)], {})
    assert again.peer_tls is not None and again.client_cert_auth and again.auth_roles
    # (the roles left out alone: every certificate would be admin)
    toml = (made / "n1.toml").read_text()
    assert "auth_roles" in toml
    no_roles = tmp_path / "no-roles.toml"
    no_roles.write_text("\n".join(x for x in toml.splitlines() if "auth_roles" not in x))
    with pytest.raises(ConfigError, match="this node was started with auth_roles"):
        parse_settings(["--config", str(no_roles), "--data-dir", str(data)], {})
    # turned off on purpose: started plain, and recorded so
    plain = parse_settings(["--data-dir", str(data), "--drop-tls"], {})
    assert plain.peer_tls is None and plain.client_tls is None
    write_identity(plain)
    assert load_identity(str(data))["secured"] == []
    assert parse_settings(["--data-dir", str(data)], {}).peer_tls is None
    # (a node.json of an older release, without the record, starts as before)
    older = tmp_path / "older"
    write_identity(parse_settings(["--id", "n1", "--peers", PEERS, "--data-dir", str(older)], {}))
    text = (older / "node.json").read_text().replace('"secured": [],', "")
    assert "secured" not in text
    (older / "node.json").write_text(text)
    assert load_identity(str(older))["secured"] == []
