"""TLS for both faces of a node, built from PEM files: gRPC credentials for the client port and
the peer port, ``ssl`` contexts for the TCP replication stream, and the authenticated identity
(the certificate's common name) of whoever is calling.

Peers always authenticate both ways: each presents its certificate and checks the other's
against the peer CA (``--peer-trusted-ca-file``). Clients are checked only with
``--client-cert-auth`` (against ``--trusted-ca-file``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import grpc

__all__ = ["TLSFiles", "caller_name", "channel_credentials", "read_pem"]


@dataclass(frozen=True)
class TLSFiles:
    """A CA bundle to trust and, optionally, our own certificate and its key (PEM files).

    On a client (``Client(..., tls=TLSFiles("ca.crt", "alice.crt", "alice.key"))``): the CA
    that signed the nodes' certificates, and the client certificate if the cluster asks for
    one. On a node: what it presents and whom it trusts, for one face (clients or peers).
    """

    ca_file: str | None = None  # None: the system's CAs (a client), no client check (a node)
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a certificate needs its key, and a key its certificate")

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, certificate, key) as bytes; ValueError naming the file that cannot be read."""
        ca = read_pem(self.ca_file, "CA") if self.ca_file else None
        if ca is not None:
            # (a CA that only looks like PEM: gRPC said the port was in use, the TCP stream
            # "[X509] PEM lib", neither naming the file)
            try:
                # (the PEM blocks are ASCII; text around them, a bundle's comments, may not be;
                # a bare context: not the system's CAs loaded at every call)
                pem = ca.decode("ascii", errors="ignore")
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"the CA file {self.ca_file} holds no certificate that can be read: "
                    f"{getattr(exc, 'reason', None) or exc}"
                ) from None
        cert = read_pem(self.cert_file, "certificate") if self.cert_file else None
        key = read_pem(self.key_file, "key") if self.key_file else None
        if cert is not None and key is not None:
            # (gRPC itself only says it cannot listen, or a client waits out its deadline)
            try:
                ssl.create_default_context().load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"the key {self.key_file} does not go with the certificate "
                    f"{self.cert_file}: {getattr(exc, 'reason', None) or exc}"
                ) from None
        return ca, cert, key

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        ca, cert, key = self.read()
        if cert is None or key is None:
            raise ValueError("a TLS server needs a certificate and its key")
        if require_client_auth and ca is None:
            raise ValueError("checking client certificates needs the CA that signs them")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=require_client_auth
        )

    def server_context(self) -> ssl.SSLContext:
        """For a TLS listener that requires the other side's certificate, signed by our CA."""
        if self.cert_file is None or self.key_file is None or self.ca_file is None:
            raise ValueError("a TLS server that checks its callers needs a certificate, key, CA")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca_file)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For dialling a TLS listener: checks its certificate (and name), presents ours."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file is not None and self.key_file is not None:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


# A PEM file's size, at most: a CA bundle of every public root is ~220 KB. (Not only regular
# files: `--cacert <(vault read ...)` is a pipe; /dev/zero in its place is read this far.)
MAX_PEM_BYTES = 16 * 1024 * 1024


def read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"the {what} file {path} is bigger than {MAX_PEM_BYTES} bytes")
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} file {path} is not PEM")
    return data


def certificate_name(cert_file: str) -> str | None:
    """The subject's common name of the PEM certificate in ``cert_file`` (as gRPC reports a
    caller's: ``caller_name``)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(read_pem(cert_file, "certificate"))
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def channel_credentials(files: TLSFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(ca, key, cert)


def caller_name(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the caller's certificate, if the connection checked one."""
    try:
        names = context.auth_context().get("x509_common_name")
    except Exception:  # noqa: BLE001 - a context without auth data (plain connection)
        return None
    return names[0].decode("utf-8", "replace") if names else None
