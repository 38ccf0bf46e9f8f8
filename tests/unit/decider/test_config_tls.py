"""decider.config.tls: certificate files checked at start, re-read on change, client identities."""

from __future__ import annotations

import os
import shutil
import ssl

import pytest
from tls_certs import CA, common_name

from decider.config.tls import CertificateFiles, ClientTLS, TLSSettings, peer_identities
from decider.errors import ConfigError


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path / "ca")


def settings_for(pair, *, mutual: bool = False, **extra) -> TLSSettings:
    return TLSSettings(
        cert_file=str(pair.cert_file),
        key_file=str(pair.key_file),
        client_ca_file=str(pair.ca_file) if mutual else "",
        **extra,
    )


def test_good_files_load(ca):
    files = CertificateFiles(settings_for(ca.server_pair(), mutual=True))
    assert files.generation == 0
    assert files.refresh() is False


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda p, tmp: p.cert_file.unlink(),
            "server.tls.cert_file: {cert}: cannot read: No such file",
        ),
        (
            lambda p, tmp: p.key_file.write_text("not a key\n"),
            "server.tls.key_file: {key}: not a PEM private key",
        ),
        (
            lambda p, tmp: p.cert_file.write_text("junk\n"),
            "server.tls.cert_file: {cert}: not a PEM certificate",
        ),
        (lambda p, tmp: p.key_file.write_text(""), "server.tls.key_file: {key}: the file is empty"),
        (
            lambda p, tmp: (p.key_file.unlink(), p.key_file.mkdir()),
            "server.tls.key_file: {key}: cannot read: Is a directory",
        ),
        (
            lambda p, tmp: p.key_file.write_text(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
            ),
            "server.tls.key_file: {key}: the key is encrypted",
        ),
    ],
)
def test_a_bad_file_is_a_config_error_naming_it(ca, tmp_path, break_it, message):
    pair = ca.server_pair()
    break_it(pair, tmp_path)
    with pytest.raises(ConfigError) as err:
        CertificateFiles(settings_for(pair))
    assert message.format(cert=pair.cert_file, key=pair.key_file) in str(err.value)


def test_a_key_that_does_not_match_its_certificate_names_both_files(ca):
    server = ca.server_pair()
    other = ca.issue("other", stem="other")
    settings = TLSSettings(cert_file=str(server.cert_file), key_file=str(other.key_file))
    with pytest.raises(ConfigError) as err:
        CertificateFiles(settings)
    assert str(err.value) == (
        f"server.tls.key_file: {other.key_file}: the key does not match the certificate in "
        f"{server.cert_file}"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_key_is_named(ca):
    pair = ca.server_pair()
    pair.key_file.chmod(0)
    with pytest.raises(ConfigError, match=f"{pair.key_file}: cannot read: Permission denied"):
        CertificateFiles(settings_for(pair))


def test_a_bad_client_ca_is_named(ca, tmp_path):
    pair = ca.server_pair()
    bad = tmp_path / "ca.pem"
    bad.write_text("nothing here\n")
    settings = TLSSettings(
        cert_file=str(pair.cert_file), key_file=str(pair.key_file), client_ca_file=str(bad)
    )
    with pytest.raises(ConfigError, match=f"server.tls.client_ca_file: {bad}: not a PEM"):
        CertificateFiles(settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            TLSSettings(cert_file="c"),
            "server.tls.cert_file is set, so server.tls.key_file must be too",
        ),
        (
            TLSSettings(key_file="k"),
            "server.tls.key_file is set, so server.tls.cert_file must be too",
        ),
        (TLSSettings(client_ca_file="ca"), "server.tls.client_ca_file needs server.tls.cert_file"),
        (
            TLSSettings(cert_file="c", key_file="k", admin_client_names=("ops",)),
            "server.tls.admin_client_names needs mTLS",
        ),
    ],
)
def test_combinations_of_keys_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        settings.check()


def rotate(ca, pair, name):
    """Writes a new certificate and key over `pair`'s files, as cert-manager would."""
    fresh = ca.issue(name, dns=("localhost",), ips=("127.0.0.1",), stem=f"next-{name}")
    shutil.copyfile(fresh.cert_file, pair.cert_file)
    shutil.copyfile(fresh.key_file, pair.key_file)


def test_a_rotation_on_disk_is_picked_up_once(ca):
    pair = ca.server_pair()
    files = CertificateFiles(settings_for(pair))
    rotate(ca, pair, "rotated")
    assert files.refresh() is True
    assert files.generation == 1
    assert common_name(files._material.cert) == "rotated"
    assert files.refresh() is False


def test_a_half_written_rotation_keeps_the_old_certificate(ca, caplog):
    pair = ca.server_pair()
    files = CertificateFiles(settings_for(pair))
    fresh = ca.issue("half", stem="half")
    shutil.copyfile(fresh.cert_file, pair.cert_file)  # the key is still the old one
    assert files.refresh() is False
    assert files.refresh() is False
    assert common_name(files._material.cert) == "decider.test"
    failures = [r for r in caplog.records if "TLS reload failed" in r.getMessage()]
    assert len(failures) == 1, "logged once per rotation, not per connection"
    shutil.copyfile(fresh.key_file, pair.key_file)
    assert files.refresh() is True
    assert common_name(files._material.cert) == "half"


def test_touching_the_files_is_not_a_rotation(ca):
    pair = ca.server_pair()
    files = CertificateFiles(settings_for(pair))
    os.utime(pair.cert_file, ns=(1, 1))
    assert files.refresh() is False
    assert files.generation == 0


def test_a_requested_reload_reads_the_files_now(ca):
    pair = ca.server_pair()
    files = CertificateFiles(settings_for(pair))
    stat = pair.cert_file.stat()
    rotate(ca, pair, "sighup")
    # Same mtime and size would hide a change from refresh(); a request does not look.
    os.utime(pair.cert_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    files.request_reload()
    assert common_name(files._material.cert) == "sighup"


def test_the_ssl_context_serves_the_current_certificate(ca):
    pair = ca.server_pair()
    files = CertificateFiles(settings_for(pair, mutual=True))
    context = files.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.sni_callback is not None
    rotate(ca, pair, "next")
    files.refresh()
    assert files._current_ssl_context() is not context


def test_peer_identities_are_subject_common_name_and_sans():
    auth = {
        "transport_security_type": [b"ssl"],
        "x509_subject": [b"CN=gw-1,O=Example"],
        "x509_common_name": [b"gw-1"],
        "x509_subject_alternative_name": [b"gw.example", b"spiffe://x/gw"],
    }
    assert peer_identities(auth) == {"CN=gw-1,O=Example", "gw-1", "gw.example", "spiffe://x/gw"}
    assert peer_identities({"transport_security_type": [b"ssl"]}) == frozenset()


def test_client_tls_is_off_until_asked_for_and_names_unreadable_files(tmp_path):
    assert not ClientTLS().active
    assert ClientTLS(server_name="decider.test").active
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=f"--tls-ca-file: {missing}: cannot read"):
        ClientTLS(ca_file=str(missing)).channel_credentials()
    with pytest.raises(ConfigError, match="--tls-cert-file and --tls-key-file go together"):
        ClientTLS(cert_file="c").channel_credentials()


def test_a_key_path_that_cannot_be_read_is_named_even_for_root(ca, tmp_path):
    # The permission test above cannot run as root; a directory fails to read for anyone.
    pair = ca.server_pair()
    directory = tmp_path / "key.pem"
    directory.mkdir()
    settings = TLSSettings(cert_file=str(pair.cert_file), key_file=str(directory))
    with pytest.raises(ConfigError, match=f"server.tls.key_file: {directory}: cannot read: "):
        CertificateFiles(settings)
