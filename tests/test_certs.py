"""Consortium credentials: a CA that really signs the server certificate, node keys Flower accepts."""

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from typer.testing import CliRunner

from fedgen.certs import load_certs, make_certs
from fedgen.cli import app
from fedgen.errors import FedgenError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("c") / "certs", sites=2, hosts=["coord.example.org", "10.1.2.3"])


def test_the_server_certificate_is_signed_by_the_ca_for_every_host(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "coord.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    key = load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_a_tls_client_pinning_the_ca_completes_a_handshake_with_the_server(certs):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    client_ctx = ssl.create_default_context(cafile=certs.ca_cert)
    left, right = socket.socketpair()
    with left, right:
        accepted = {}

        def serve():
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                accepted["version"] = tls.version()

        thread = threading.Thread(target=serve)
        thread.start()
        with client_ctx.wrap_socket(left, server_hostname="127.0.0.1") as tls:
            peer = tls.getpeercert()
        thread.join(timeout=10)
    assert accepted["version"] in ("TLSv1.2", "TLSv1.3")
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]


def test_site_keys_are_openssh_ecdsa_p384_pairs_and_listed_as_authorised(certs):
    lines = certs.public_keys()
    assert len(lines) == 2
    for site, line in enumerate(lines, start=1):
        assert line.startswith("ecdsa-sha2-nistp384 ")
        assert line.endswith(f" site-{site}")
        assert certs.site_public_key(site).read_text().strip() == line
        private = load_ssh_private_key(certs.site_private_key(site).read_bytes(), None)
        assert isinstance(private.curve, ec.SECP384R1)
        public = load_ssh_public_key(line.encode())
        assert public.public_numbers() == private.public_key().public_numbers()


def test_private_keys_are_readable_by_their_owner_only(certs):
    for path in (certs.ca_key, certs.server_key, certs.site_private_key(1), certs.site_private_key(2)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_non_empty_folder_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FedgenError, match="is not empty"):
        make_certs(out, sites=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["certs"]  # no temporary folder left behind


def test_a_bad_host_writes_nothing(tmp_path):
    with pytest.raises(FedgenError, match="'bad host'"):
        make_certs(tmp_path / "certs", sites=1, hosts=["bad host"])
    assert list(tmp_path.iterdir()) == []


def test_the_coordinator_needs_its_pair_the_ca_and_the_key_list(certs, tmp_path):
    assert load_certs(certs.root).authorized_keys == certs.authorized_keys
    with pytest.raises(FedgenError, match="lacks ca.crt, server.crt, server.key, authorized-keys"):
        load_certs(tmp_path)


def test_the_certs_command_writes_the_folder_once():
    runner = CliRunner()
    with runner.isolated_filesystem():
        first = runner.invoke(app, ["certs", "out", "--sites", "3", "--host", "10.0.0.9"])
        assert first.exit_code == 0, first.output
        assert len(load_certs("out").public_keys()) == 3
        again = runner.invoke(app, ["certs", "out", "--sites", "3"])
        assert again.exit_code == 1
        assert "out is not empty" in again.output
