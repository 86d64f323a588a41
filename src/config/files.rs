//! Files named by the settings: credentials and CA bundles, each read bounded.

use std::fs;
use std::io::Read;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::Secret;

/// Far above any HMAC key; smaller than any file mistaken for one.
pub(super) const MAX_SECRET_FILE: u64 = 64 * 1024;
/// Far above a full public CA bundle (about 250 KiB).
const MAX_CA_FILE: u64 = 16 * 1024 * 1024;

/// Reads at most `limit` bytes: a path set to the wrong file (`/dev/zero`, a disk image) fails
/// instead of exhausting memory.
fn read_bounded(file: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read {}: {e}", file.display());
    let mut bytes = Vec::new();
    fs::File::open(file)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(cannot_read)?;
    if bytes.len() as u64 > limit {
        return Err(format!("{} is larger than {limit} bytes", file.display()));
    }
    Ok(bytes)
}

pub(super) fn read_certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    read_ca_file(file).and_then(|pem| parse_certificates(file, &pem))
}

/// The bytes of a CA bundle, bounded.
pub fn read_ca_file(file: &Path) -> Result<Vec<u8>, String> {
    read_bounded(file, MAX_CA_FILE)
}

/// The CA certificates of `file`'s PEM, each checked to be usable as a trust anchor.
pub fn parse_certificates(file: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", file.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            file.display()
        ));
    }
    // PEM can wrap anything: check that each block decodes as a trust anchor now, while the
    // key and the file can still be named.
    let mut store = rustls::RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        store.add(certificate.clone()).map_err(|e| {
            format!(
                "{}: certificate {} cannot be used as a CA: {e}",
                file.display(),
                index + 1
            )
        })?;
    }
    Ok(certificates)
}

pub(super) fn read_secret(file: &Path) -> Result<Secret, String> {
    read_credential(file).map(Secret::new)
}

pub(super) fn read_key_id(file: &Path) -> Result<String, String> {
    read_credential(file).map(|bytes| String::from_utf8(bytes).expect("checked UTF-8"))
}

/// A credential file's text: UTF-8, one trailing line ending dropped, not empty.
pub fn read_credential(file: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = read_bounded(file, MAX_SECRET_FILE)?;
    // `echo` and `kubectl create secret --from-file` often leave one line ending.
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if std::str::from_utf8(&bytes).is_err() {
        return Err(format!("{} is not valid UTF-8", file.display()));
    }
    if bytes.is_empty() {
        return Err(format!("{} is empty", file.display()));
    }
    Ok(bytes)
}
