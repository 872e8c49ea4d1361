"""TLS material for the tests: a trustme CA, two server certificates, client contexts.

``TLSFiles.create(directory)`` makes a throwaway CA and two leaf certificates
for ``127.0.0.1`` and ``localhost`` (the second one lets a test tell which
certificate a server presents after a reload), and writes them as PEM files
for the clients that read files (curl, mpop, the ``--tls-cert`` flag):

* ``ca_pem``: the CA certificate (``--cacert``, ``--tls-trust-file``);
* ``cert_pem``/``key_pem`` and ``cert2_pem``/``key2_pem``: chain and key of
  each leaf (``tls_cert``/``tls_key``).

``server_context(n)`` is a server-side ``SSLContext`` holding leaf *n*;
``client_context()`` verifies against the CA (hostname checks on);
``der(n)`` is leaf *n* in DER, to compare with ``getpeercert(True)``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["HOST", "TLSFiles"]

#: Where every test server listens; the certificates name it (an IP SAN).
HOST = "127.0.0.1"


@dataclass(frozen=True)
class TLSFiles:
    """A CA, two server certificates signed by it, and their PEM files."""

    ca: trustme.CA
    leaves: tuple[trustme.LeafCert, trustme.LeafCert]
    directory: Path

    @classmethod
    def create(cls, directory: Path) -> TLSFiles:
        """Make the CA and both leaves, and write the PEM files into *directory*."""
        ca = trustme.CA(organization_name="pop3proto test CA")
        leaves = (
            ca.issue_cert(HOST, "localhost", organization_unit_name="first"),
            ca.issue_cert(HOST, "localhost", organization_unit_name="second"),
        )
        files = cls(ca, leaves, directory)
        ca.cert_pem.write_to_path(str(files.ca_pem))
        for n in (1, 2):
            leaf = leaves[n - 1]
            leaf.private_key_pem.write_to_path(str(files.key_path(n)))
            with open(files.cert_path(n), "wb") as f:
                for blob in leaf.cert_chain_pems:
                    f.write(blob.bytes())
        return files

    # -- paths

    @property
    def ca_pem(self) -> Path:
        """The CA certificate (PEM)."""
        return self.directory / "ca.pem"

    def cert_path(self, n: int = 1) -> Path:
        """Leaf *n*'s certificate chain (PEM)."""
        return self.directory / f"server{n}.pem"

    def key_path(self, n: int = 1) -> Path:
        """Leaf *n*'s private key (PEM)."""
        return self.directory / f"server{n}.key"

    @property
    def cert_pem(self) -> Path:
        return self.cert_path(1)

    @property
    def key_pem(self) -> Path:
        return self.key_path(1)

    @property
    def cert2_pem(self) -> Path:
        return self.cert_path(2)

    @property
    def key2_pem(self) -> Path:
        return self.key_path(2)

    # -- contexts and certificates

    def server_context(self, n: int = 1) -> ssl.SSLContext:
        """A fresh server-side context presenting leaf *n*."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaves[n - 1].configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks host names."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx

    def der(self, n: int = 1) -> bytes:
        """Leaf *n*'s certificate in DER (what ``getpeercert(binary_form=True)`` gives)."""
        pem = self.leaves[n - 1].cert_chain_pems[0].bytes().decode("ascii")
        return ssl.PEM_cert_to_DER_cert(pem)
