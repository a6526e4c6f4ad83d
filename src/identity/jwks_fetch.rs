//! Fetches an external issuer's JWKS over HTTPS (HTTP/1.1, rustls with ring), for the `jwt`
//! attestor. Small on purpose: one GET, a bounded body, a deadline, and the roots the operator
//! chose, so a slow or hostile endpoint cannot hold the attestor or feed it a huge document.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// The whole fetch (connect, handshake, response) must finish within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Where the system's CA bundle usually is, when the configuration names none.
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// An `https://host[:port]/path` URL, checked when the configuration loads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    host: String,
    port: u16,
    path: String,
    text: String,
}

impl HttpsUrl {
    pub fn parse(text: &str) -> Result<HttpsUrl, String> {
        let rest = text
            .strip_prefix("https://")
            .ok_or("must be an https:// URL")?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        if authority.contains('@') || path.contains('#') || path.chars().any(char::is_whitespace) {
            return Err("must be a plain https://host[:port]/path URL".into());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| format!("port '{port}' is not a number"))?,
            ),
            None => (authority, 443),
        };
        if host.is_empty() {
            return Err("names no host".into());
        }
        Ok(HttpsUrl {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// The roots to trust: the PEM file `ca_file`, or the system's bundle.
pub fn roots(ca_file: Option<&std::path::Path>) -> Result<RootCertStore, String> {
    let path = match ca_file {
        Some(path) => path.to_owned(),
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(std::path::PathBuf::from)
            .find(|path| path.exists())
            .ok_or("no system CA bundle found: set jwks_ca_file")?,
    };
    let pem = std::fs::read(&path).map_err(|error| format!("{}: {error}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        let certificate = certificate.map_err(|error| format!("{}: {error}", path.display()))?;
        roots
            .add(certificate)
            .map_err(|error| format!("{}: {error}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(roots)
}

/// GETs `url`, trusting `roots`; the body of a `200` answer.
pub async fn fetch(url: &HttpsUrl, roots: Arc<RootCertStore>) -> Result<Vec<u8>, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_within(url, roots))
        .await
        .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?
}

async fn fetch_within(url: &HttpsUrl, roots: Arc<RootCertStore>) -> Result<Vec<u8>, String> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = ServerName::try_from(url.host.clone()).map_err(|error| error.to_string())?;
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|error| format!("TLS: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::get(url.path.as_str())
        .header(hyper::header::HOST, url.host.as_str())
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|error| format!("body: {error}"))?;
    Ok(body.to_bytes().to_vec())
}
