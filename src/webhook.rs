//! The approval webhook: a signed JSON POST to a configured URL each time a request starts to
//! wait for operators, so a chat bot or paging system can call a human.
//!
//! The delivery is a job of the store's durable queue, written in the same transaction as the
//! request, so a request that waits is always announced, and a receiver that is down or slow
//! never holds or loses the request: the job runner retries it with backoff until the receiver
//! answers `2xx`. Deliveries are signed as Standard Webhooks specifies: headers `webhook-id`
//! (the same on every retry, for the receiver to drop duplicates), `webhook-timestamp` (Unix
//! seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `<id>.<timestamp>.<body>` with the shared secret. A receiver should refuse a timestamp more
//! than [`REPLAY_WINDOW`] away from its clock. The body carries what operators see (sensitive
//! tool arguments are already redacted there) and no credential.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use rustls::RootCertStore;
use serde_json::json;

use crate::domain::UnixMillis;
use crate::https_client::{self, HttpsUrl};
use crate::jobs::JobHandler;
use crate::store::{ClaimedJob, GrantRequestRecord, NewJob};

/// The job kind of an approval webhook delivery.
pub const APPROVAL_WEBHOOK_JOB: &str = "webhook.approval";
/// How far from its own clock a receiver should accept `webhook-timestamp`.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(300);
/// The shortest secret accepted: 32 bytes, the HMAC-SHA256 block's half.
pub const MIN_SECRET_BYTES: usize = 32;

/// Where approval webhooks go, and the secret they are signed with.
#[derive(Clone)]
pub struct WebhookConfig {
    pub url: HttpsUrl,
    pub secret: Vec<u8>,
    /// The roots to trust for the receiver's certificate; `None` for the system's bundle.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url.as_str())
            .field("secret", &"[redacted]")
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Reads a webhook secret file: its content without surrounding whitespace, at least
/// [`MIN_SECRET_BYTES`] long.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let secret = text.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "{}: the secret must be at least {MIN_SECRET_BYTES} bytes",
            path.display()
        ));
    }
    Ok(secret)
}

/// The delivery job announcing `request`, which starts to wait now.
pub fn approval_job(request: &GrantRequestRecord, now: UnixMillis) -> NewJob {
    let detail: serde_json::Value =
        serde_json::from_str(&request.detail_json).unwrap_or(serde_json::Value::Null);
    let body = json!({
        "type": "approval.pending",
        "timestamp": now.as_seconds(),
        "data": {
            "lease_id": request.id.as_str(),
            "task_id": request.task_id.as_str(),
            "workload": request.workload_name,
            "scope": request.scope.as_str(),
            "ttl_seconds": request.ttl_seconds,
            "quorum": request.quorum,
            "approver_labels": request.approver_labels,
            "wait_until": request.wait_until.as_seconds(),
            "request_digest": request.request_digest,
            "detail": detail,
        },
    });
    NewJob::new(APPROVAL_WEBHOOK_JOB, body, now)
}

/// Delivers approval webhook jobs.
pub struct WebhookSender {
    url: HttpsUrl,
    key: ring::hmac::Key,
    roots: Arc<RootCertStore>,
}

impl WebhookSender {
    pub fn new(config: &WebhookConfig) -> Result<Self, String> {
        let roots = if config.url.is_plain() {
            RootCertStore::empty()
        } else {
            https_client::roots(config.ca_file.as_deref())?
        };
        Ok(WebhookSender {
            url: config.url.clone(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &config.secret),
            roots: Arc::new(roots),
        })
    }
}

/// The `webhook-signature` value of `body` sent as message `id` at `timestamp`.
pub fn signature(key: &ring::hmac::Key, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(key, &signed);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

#[async_trait]
impl JobHandler for WebhookSender {
    async fn run(&self, job: &ClaimedJob) -> Result<(), String> {
        let body = job.payload.to_string().into_bytes();
        let timestamp = UnixMillis::now().as_seconds();
        let headers = [
            ("webhook-id", job.id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            (
                "webhook-signature",
                signature(&self.key, &job.id, timestamp, &body),
            ),
        ];
        let status = https_client::post_json(&self.url, self.roots.clone(), &headers, body)
            .await
            .map_err(|error| format!("{}: {error}", self.url.as_str()))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{} answered {status}", self.url.as_str()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_id_timestamp_and_body() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7u8; 32]);
        let signed = signature(&key, "job_1", 1_700_000_000, b"{}");
        assert!(signed.starts_with("v1,"));
        let tag = base64::engine::general_purpose::STANDARD
            .decode(&signed[3..])
            .unwrap();
        ring::hmac::verify(&key, b"job_1.1700000000.{}", &tag).expect("verifies");
        assert_ne!(signed, signature(&key, "job_1", 1_700_000_001, b"{}"));
        assert_ne!(signed, signature(&key, "job_2", 1_700_000_000, b"{}"));
        assert_ne!(signed, signature(&key, "job_1", 1_700_000_000, b"[]"));
    }

    #[test]
    fn a_short_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "too short\n").unwrap();
        assert!(
            read_secret(&path)
                .unwrap_err()
                .contains("at least 32 bytes")
        );
        std::fs::write(&path, format!("{}\n", "s".repeat(40))).unwrap();
        assert_eq!(read_secret(&path).unwrap().len(), 40);
    }
}
