//! The broker's outbound HTTPS requests (HTTP/1.1, rustls with ring): fetching an external
//! issuer's JWKS for the `jwt` attestor, and delivering webhooks. Small on purpose: one request
//! per connection, a bounded body, a deadline, and the roots the operator chose, so a slow or
//! hostile endpoint cannot hold the broker or feed it a huge document.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// The whole request (connect, handshake, response) must finish within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read to a webhook delivery (only its status matters).
const MAX_WEBHOOK_ANSWER_BYTES: usize = 64 * 1024;
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
    /// Plain HTTP: only ever to this host's loopback address.
    plain: bool,
}

impl HttpsUrl {
    pub fn parse(text: &str) -> Result<HttpsUrl, String> {
        let rest = text
            .strip_prefix("https://")
            .ok_or("must be an https:// URL")?;
        Self::parse_rest(text, rest, false)
    }

    /// An `https://` URL, or an `http://` one to the loopback address (a receiver on this
    /// host, where nothing crosses a network).
    pub fn parse_allowing_loopback(text: &str) -> Result<HttpsUrl, String> {
        match text.strip_prefix("http://") {
            None => Self::parse(text),
            Some(rest) => {
                let url = Self::parse_rest(text, rest, true)?;
                let is_loopback = url.host == "localhost"
                    || url
                        .host
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !is_loopback {
                    return Err(
                        "must be an https:// URL (http:// only to the loopback address)".into(),
                    );
                }
                Ok(url)
            }
        }
    }

    fn parse_rest(text: &str, rest: &str, plain: bool) -> Result<HttpsUrl, String> {
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
            None if plain => (authority, 80),
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
            plain,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether requests go in plain HTTP (to the loopback address only).
    pub fn is_plain(&self) -> bool {
        self.plain
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
    let request = hyper::Request::get(url.path.as_str())
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|error| error.to_string())?;
    let (status, body) = send(url, roots, request, MAX_JWKS_BYTES).await?;
    if status != hyper::StatusCode::OK {
        return Err(format!("answered {status}"));
    }
    Ok(body)
}

/// POSTs the JSON `body` to `url` with `headers`, trusting `roots`; the answer's status.
pub async fn post_json(
    url: &HttpsUrl,
    roots: Arc<RootCertStore>,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<hyper::StatusCode, String> {
    let mut request = hyper::Request::post(url.path.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|error| error.to_string())?;
    let (status, _) = send(url, roots, request, MAX_WEBHOOK_ANSWER_BYTES).await?;
    Ok(status)
}

/// Sends `request` to `url` on a new connection, within [`REQUEST_TIMEOUT`]; the answer's
/// status and body (at most `max_body` bytes).
async fn send(
    url: &HttpsUrl,
    roots: Arc<RootCertStore>,
    mut request: hyper::Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(hyper::StatusCode, Vec<u8>), String> {
    let host =
        hyper::header::HeaderValue::from_str(&url.host).map_err(|error| error.to_string())?;
    request.headers_mut().insert(hyper::header::HOST, host);
    tokio::time::timeout(REQUEST_TIMEOUT, send_within(url, roots, request, max_body))
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

async fn send_within(
    url: &HttpsUrl,
    roots: Arc<RootCertStore>,
    request: hyper::Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(hyper::StatusCode, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect((url.host.trim_matches(['[', ']']), url.port))
        .await
        .map_err(|error| format!("connect: {error}"))?;
    if url.plain {
        return exchange(TokioIo::new(tcp), request, max_body).await;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| error.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = ServerName::try_from(url.host.clone()).map_err(|error| error.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|error| format!("TLS: {error}"))?;
    exchange(TokioIo::new(tls), request, max_body).await
}

/// One HTTP/1.1 request and its answer on the connection `io`.
async fn exchange<Io>(
    io: TokioIo<Io>,
    request: hyper::Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(hyper::StatusCode, Vec<u8>), String>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|error| format!("body: {error}"))?;
    Ok((status, body.to_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_goes_to_the_loopback_address_only() {
        for allowed in [
            "http://127.0.0.1:8080/hooks",
            "http://localhost/hooks",
            "http://[::1]:9000/",
            "https://hooks.example.com/warrant",
        ] {
            assert!(
                HttpsUrl::parse_allowing_loopback(allowed).is_ok(),
                "{allowed}"
            );
        }
        for refused in [
            "http://hooks.example.com/warrant",
            "http://10.0.0.1/hooks",
            "ftp://127.0.0.1/",
        ] {
            assert!(
                HttpsUrl::parse_allowing_loopback(refused).is_err(),
                "{refused}"
            );
        }
        assert!(
            HttpsUrl::parse("http://127.0.0.1/").is_err(),
            "JWKS stay on HTTPS"
        );
    }
}
