"""TLS material for a deployment: a private CA and a server certificate signed by it.

The files are written with :mod:`cryptography` into a folder the caller owns;
private keys are readable by their owner only (mode ``0600``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.deploy import DeployError

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
"""Names a local deployment's server certificate is valid for."""

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class TlsFiles:
    """Where a deployment's TLS files are.

    Parameters
    ----------
    ca_cert : Path
        The CA certificate (PEM); clients trust the server through it.
    ca_key : Path
        The CA's private key (PEM, mode ``0600``); signs server certificates.
    server_cert : Path
        The server certificate (PEM) with the hosts as subject alternative names.
    server_key : Path
        The server's private key (PEM, mode ``0600``).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        """The standard file names inside ``folder``."""
        return cls(
            folder / "ca.crt", folder / "ca.key", folder / "server.crt", folder / "server.key"
        )

    def exist(self) -> bool:
        """Whether all four files are present."""
        return all(p.is_file() for p in (self.ca_cert, self.ca_key, self.server_cert, self.server_key))


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that only the owner can ever read it.

    The file is created with mode ``0600`` (an existing file is replaced), so
    the key is never readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOSTNAME.match(host):
                raise DeployError(f"tls: {host!r} is not a host name or IP address") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(folder: Path, *, days: int = 365) -> TlsFiles:
    """Create a CA key and a self-signed CA certificate in ``folder``.

    Parameters
    ----------
    folder : Path
        Where ``ca.crt`` and ``ca.key`` go; created if missing.
    days : int, default 365
        Validity of the CA certificate.

    Returns
    -------
    TlsFiles
        The standard file names in ``folder`` (server files not yet written).
    """
    files = TlsFiles.in_folder(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    name = _name("fedge deployment CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(files.ca_key, _pem_key(key))
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def issue_server_cert(
    files: TlsFiles, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = 365
) -> TlsFiles:
    """Sign a server certificate for ``hosts`` with the CA in ``files``.

    Parameters
    ----------
    files : TlsFiles
        A CA made by :func:`create_ca` (or any EC/RSA CA in the same layout).
    hosts : sequence of str, default ``("127.0.0.1", "localhost", "::1")``
        IP addresses and DNS names clients use to reach the SuperLink; each
        becomes a subject alternative name.
    days : int, default 365
        Validity of the server certificate.

    Returns
    -------
    TlsFiles
        ``files``, now with the server certificate and key written.
    """
    if not hosts:
        raise DeployError("tls: at least one host name or address is needed for the certificate")
    try:
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise DeployError(f"tls: cannot read the CA in {files.ca_cert.parent}: {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"tls: {files.ca_key} is not an EC private key")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(files.server_key, _pem_key(key))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def ensure_tls(folder: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> TlsFiles:
    """The deployment's TLS files in ``folder``, created on first use.

    An existing CA is reused (clients that trust it keep working); the server
    certificate is issued anew when missing or when it lacks one of ``hosts``.
    """
    files = TlsFiles.in_folder(folder)
    if not (files.ca_cert.is_file() and files.ca_key.is_file()):
        create_ca(folder)
    if not files.server_cert.is_file() or not files.server_key.is_file() or not _covers(
        files.server_cert, hosts
    ):
        issue_server_cert(files, hosts)
    return files


def _covers(cert_path: Path, hosts: Sequence[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    names = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    names |= set(san.get_values_for_type(x509.DNSName))
    return all(str(ipaddress.ip_address(h)) in names if _is_ip(h) else h in names for h in hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
