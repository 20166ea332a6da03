"""``raftfast certs``: a development CA and every certificate a TLS cluster needs, in one go.

::

    raftfast certs --dir tls --nodes n1,n2,n3 --clients admin=admin,app=write,viewer=read

writes into ``tls/`` (keys 0600, nothing overwritten without ``--force``):

* ``ca.crt``, ``ca.key``: the client-facing CA. It signs each node's client-port certificate
  (``n1.crt``) and each client certificate (``admin.crt``); clients trust it (``--cacert``).
* ``peer-ca.crt``, ``peer-ca.key``: the peer CA, apart from the client one, so that no client
  certificate can ever pose as a node. It signs each node's peer certificate (``n1-peer.crt``).
* ``roles.toml``: the ``--clients`` roles (``--auth-roles``);
* ``n1.toml``...: a ``raftfast-node --config`` file per node with all of the above.

A certificate's common name is its node id or client name; node certificates name every
``--hosts`` entry (default: localhost, 127.0.0.1, ::1) as the hosts they serve. For production,
use your own PKI: these are EC P-256 keys, signed by a CA that sits on disk beside them.

``--add`` signs certificates for more nodes or clients with the CAs already in ``--dir`` (a
node added to a running cluster, a dead one replaced under a new id, a new application);
new clients join ``roles.toml``, which the nodes read when they start.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftfast.limits import check_node_id

__all__ = ["add_arguments", "main"]

ROLES = ("read", "write", "admin")
_CN_MAX = 64  # X.509's upper bound for a common name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="tls", help="where to write the files (default: tls)")
    p.add_argument("--nodes", metavar="ID,...", help="node ids (each gets two certificates)")
    p.add_argument(
        "--clients",
        metavar="NAME=ROLE,...",
        help="client certificates and their roles: read, write or admin (default: admin=admin, "
        "none with --add)",
    )
    p.add_argument(
        "--hosts",
        default="localhost,127.0.0.1,::1",
        metavar="HOST,...",
        help="names and addresses the nodes serve on (default: localhost,127.0.0.1,::1)",
    )
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "--add",
        action="store_true",
        help="sign more nodes' or clients' certificates with the CAs already in --dir",
    )


MAX_DAYS = 365 * 1000  # (past year 9999 a date cannot be written)


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{what}: name at least one")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: a name appears twice")
    for name in names:
        if len(name) > _CN_MAX:
            raise ValueError(f"{what}: {name[:40]!r}... is longer than {_CN_MAX} characters")
    return names


def _check_file_name(name: str, what: str) -> None:
    """Nodes and clients name their files here: a name that is a path would write elsewhere."""
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{what}: {name[:40]!r} cannot name files (a '/' or '\\', '.' or '..')")


class _Files(dict):
    """The files to write, by name: one name twice (a node called "ca" or "roles", a node
    "a-peer" beside a node "a"; "CA" and "ca" too, one file where case does not count, as on
    macOS) is refused, not one file silently written over another."""

    def __setitem__(self, name: str, data: bytes) -> None:
        for taken in self:
            if name.casefold() == taken.casefold():
                what = "twice" if name == taken else f"over {taken} (case does not count)"
                raise ValueError(
                    f"{name} would be written {what}: rename the node or client it belongs to "
                    "(ca, peer-ca and roles are taken; a node NAME also writes NAME-peer.*)"
                )
        super().__setitem__(name, data)


def _clients(text: str) -> dict[str, str]:
    out = {}
    for item in _names(text, "--clients"):
        name, sep, role = item.partition("=")
        name, role = name.strip(), role.strip().lower()
        if not sep or not name or role not in ROLES:
            raise ValueError(f"--clients: {item!r} is not NAME=read|write|admin")
        if name in out:  # (admin=admin,admin=read: which did they mean?)
            raise ValueError(f"--clients: {name!r} appears twice")
        out[name] = role
    return out


# A DNS name as a certificate may hold it: ASCII labels of letters, digits, '-' (and '_',
# which some internal names use), 1 to 63 characters; a wildcard '*.' only first.
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")  # (_names bounds its length)


def _hosts(text: str) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in _names(text, "--hosts"):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            continue
        except ValueError:
            pass
        if not _DNS_NAME.fullmatch(host):
            raise ValueError(
                f"--hosts: {host[:40]!r} is neither an IP address nor a host name (ASCII "
                "letters, digits, '-' between dots; a name in another script in its xn-- form)"
            )
        out.append(x509.DNSName(host))
    return out


class _Issuer:
    """A self-signed CA that signs leaf certificates: a new one, or (``loaded``) one on disk."""

    def __init__(self, name: str, days: int) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.now = datetime.datetime.now(datetime.UTC)
        self.days = days
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, self.key.public_key(), days)
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @classmethod
    def loaded(cls, directory: Path, name: str, days: int) -> _Issuer:
        """The CA ``name``.crt and ``name``.key in ``directory`` (ValueError if they cannot
        be read, or do not match)."""
        issuer = cls.__new__(cls)
        try:
            issuer.cert = x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes())
            key = serialization.load_pem_private_key(
                (directory / f"{name}.key").read_bytes(), password=None
            )
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"--add: cannot read the CA {directory / name}.crt/.key ({exc}); make the CAs "
                "first (raftfast certs without --add)"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != issuer.cert.public_key().public_numbers()
        ):
            raise ValueError(f"--add: {directory / name}.key is not the key of {name}.crt")
        issuer.key = key
        issuer.now = datetime.datetime.now(datetime.UTC)
        issuer.days = days
        end = issuer.cert.not_valid_after_utc
        if issuer.now + datetime.timedelta(days=days) > end:  # (a leaf outlives its CA: invalid)
            issuer.days = max((end - issuer.now).days, 0)
            if issuer.days < 1:
                raise ValueError(f"--add: the CA {name}.crt has expired, or ends within a day")
        return issuer

    def _builder(self, subject: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))  # clocks differ a little
            .not_valid_after(self.now + datetime.timedelta(days=days))
        )

    def sign(
        self, common_name: str, hosts: list[x509.GeneralName] | None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A key and a certificate for ``common_name``: a node's (serving ``hosts``, and a
        client of its peers) or, without ``hosts``, a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if hosts:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            self._builder(subject, key.public_key(), self.days)
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(args: argparse.Namespace, say: Callable[[str], None] = print) -> int:
    """Write the files, then ``say`` what was written, line by line; returns 0 (ValueError
    with one line for bad arguments or files that exist)."""
    if args.add and args.nodes is None and args.clients is None:
        raise ValueError("--add: name the --nodes or --clients to add")
    if not args.add and args.nodes is None:
        raise ValueError("--nodes: name the cluster's nodes (ID,...)")
    nodes = _names(args.nodes, "--nodes") if args.nodes is not None else []
    for node in nodes:
        check_node_id(node)
        _check_file_name(node, "--nodes")
    if args.clients is not None:
        clients = _clients(args.clients)
    else:
        clients = {} if args.add else _clients("admin=admin")
    for client in clients:
        _check_file_name(client, "--clients")
    clash = {n.casefold() for n in nodes} & {c.casefold() for c in clients}
    if clash:
        raise ValueError(f"{sorted(clash)[0]!r} is both a node and a client: name them apart")
    hosts = _hosts(args.hosts)
    if not 1 <= args.days <= MAX_DAYS:
        raise ValueError(f"--days must be in [1, {MAX_DAYS}] (a certificate ends by 9999)")
    out = Path(args.dir)
    files = _Files()
    roles: dict[str, str] = {}
    if args.add:
        client_ca = _Issuer.loaded(out, "ca", args.days)
        peer_ca = _Issuer.loaded(out, "peer-ca", args.days)
        roles = _roles_in(out / "roles.toml")
        taken = sorted(set(roles) & set(clients))
        if taken and not args.force:
            raise ValueError(f"--add: {taken[0]!r} is in roles.toml already (--force replaces)")
        # (a node's certificate comes from the client CA too: a node named as a client is
        # that client, admin say; a client named as a node poses as it on the client port)
        known_nodes = {p.name.removesuffix("-peer.crt").casefold() for p in out.glob("*-peer.crt")}
        known_clients = {name.casefold() for name in roles}
        for node in nodes:
            if node.casefold() in known_clients:
                raise ValueError(f"--add: {node!r} is a client in roles.toml: name the node apart")
        for client in clients:
            if client.casefold() in known_nodes:
                raise ValueError(f"--add: {client!r} is a node here: name the client apart")
    else:
        client_ca = _Issuer("raftfast client CA", args.days)
        peer_ca = _Issuer("raftfast peer CA", args.days)
        files["ca.crt"], files["ca.key"] = _pem_cert(client_ca.cert), _pem_key(client_ca.key)
        files["peer-ca.crt"] = _pem_cert(peer_ca.cert)
        files["peer-ca.key"] = _pem_key(peer_ca.key)
    for name in clients:
        key, cert = client_ca.sign(name, None)
        files[f"{name}.crt"], files[f"{name}.key"] = _pem_cert(cert), _pem_key(key)
    if clients or not args.add:
        roles.update(clients)
        files["roles.toml"] = (
            "# Client certificate common name = read | write | admin (raftfast-node "
            "--auth-roles)\n[roles]\n"
            + "".join(
                f"{_toml_string(name)} = {_toml_string(role)}\n" for name, role in roles.items()
            )
        ).encode()
    where = out.resolve()
    for node in nodes:
        key, cert = client_ca.sign(node, hosts)
        files[f"{node}.crt"], files[f"{node}.key"] = _pem_cert(cert), _pem_key(key)
        key, cert = peer_ca.sign(node, hosts)
        files[f"{node}-peer.crt"], files[f"{node}-peer.key"] = _pem_cert(cert), _pem_key(key)
        settings = {
            "cert_file": where / f"{node}.crt",
            "key_file": where / f"{node}.key",
            "trusted_ca_file": where / "ca.crt",
            "peer_cert_file": where / f"{node}-peer.crt",
            "peer_key_file": where / f"{node}-peer.key",
            "peer_trusted_ca_file": where / "peer-ca.crt",
            "auth_roles": where / "roles.toml",
        }
        files[f"{node}.toml"] = (
            f"# TLS settings of node {node} (raftfast-node --config)\n"
            + "".join(f"{k} = {_toml_string(str(v))}\n" for k, v in settings.items())
            + "client_cert_auth = true\n"
        ).encode()
    if not args.force:  # (with --add, roles.toml is read above and written whole again)
        existing = [n for n in files if (out / n).exists() and not (args.add and n == "roles.toml")]
        if existing:
            raise ValueError(f"{out / existing[0]} exists (--force overwrites)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # (a file of that name: mkdir's "File exists" says it ill)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out)) from None
    for name, data in files.items():
        path = out / name
        mode = 0o600 if name.endswith(".key") else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
    say(f"wrote {len(files)} files to {out}/:")
    if not args.add:
        say("  CAs: ca.crt (clients and nodes' client port), peer-ca.crt (peers only)")
    if nodes:
        say(f"  nodes: {', '.join(f'{n}.crt {n}-peer.crt {n}.toml' for n in nodes)}")
    if clients:
        say(f"  clients: {', '.join(f'{c}.crt ({r})' for c, r in clients.items())}; roles.toml")
    if nodes:
        first = nodes[0]
        say(f"start a node:  raftfast-node --config {out}/{first}.toml --id {first} ...")
    if clients:
        some = next(iter(clients))
        say(
            f"use a client:  raftfast --cacert {out}/ca.crt --cert {out}/{some}.crt "
            f"--key {out}/{some}.key ..."
        )
    if args.add and clients:
        say("the nodes read roles.toml when they start: restart them one by one to let them in")
    return 0


def _roles_in(path: Path) -> dict[str, str]:
    """The roles of ``path`` (a roles.toml ``raftfast certs`` wrote), in order."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("roles", {})
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--add: cannot read {path} ({exc})") from None
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.lower() in ROLES for k, v in table.items()
    ):
        raise ValueError(f"--add: {path} holds roles other than read, write or admin")
    return {name: role.lower() for name, role in table.items()}  # (as the nodes read them)
