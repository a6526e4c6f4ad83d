//! PEM text of certificates and keys, for the files and messages that carry them as text.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// PEM of one certificate.
pub fn to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

/// The DER of the first `CERTIFICATE` block of `pem`.
pub fn first_certificate_der(pem: &str) -> Option<Vec<u8>> {
    let (_, rest) = pem.split_once("-----BEGIN CERTIFICATE-----")?;
    let (body, _) = rest.split_once("-----END CERTIFICATE-----")?;
    let body: String = body.split_whitespace().collect();
    STANDARD.decode(body).ok()
}

/// PEM of a PKCS#8 private key.
pub fn key_to_pem(pkcs8: &[u8]) -> String {
    pem_block("PRIVATE KEY", pkcs8)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}
