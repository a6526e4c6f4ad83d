//! The approval webhook through the real server and a local receiver: a request that starts to
//! wait is announced with a valid signature, the delivery is retried when the receiver first
//! fails, the request waits for operators meanwhile, and sensitive arguments stay out.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use warrant::https_client::HttpsUrl;
use warrant::proto;
use warrant::webhook::WebhookConfig;

use crate::support::*;

const SECRET: &[u8] = b"a webhook secret of at least 32 bytes";
const CARD: &str = "4111111111111111";

/// One delivery as the receiver saw it.
struct Delivery {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then_some(value.trim())
        })
        .unwrap_or_default()
}

/// A receiver on a random loopback port that answers the first `failures` deliveries with 500
/// and the rest with 204, and reports each one.
async fn receiver(failures: usize) -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/warrant", listener.local_addr().unwrap());
    let (sender, deliveries) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut answered = 0;
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            let (head, body) = loop {
                let read = stream.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..read]);
                let text = String::from_utf8_lossy(&request).into_owned();
                match text.split_once("\r\n\r\n") {
                    Some((head, body)) => {
                        let length: usize = header(head, "content-length").parse().unwrap_or(0);
                        if body.len() >= length || read == 0 {
                            break (head.to_owned(), body.to_owned());
                        }
                    }
                    None if read == 0 => break (text, String::new()),
                    None => {}
                }
            };
            let status = if answered < failures {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            answered += 1;
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
            let _ = sender.send(Delivery {
                id: header(&head, "webhook-id").to_owned(),
                timestamp: header(&head, "webhook-timestamp").to_owned(),
                signature: header(&head, "webhook-signature").to_owned(),
                body,
            });
        }
    });
    (url, deliveries)
}

/// Whether `delivery` carries a valid signature under the shared secret.
fn signature_is_valid(delivery: &Delivery) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let Some(tag) = delivery.signature.strip_prefix("v1,") else {
        return false;
    };
    let Ok(tag) = base64::engine::general_purpose::STANDARD.decode(tag) else {
        return false;
    };
    let signed = format!("{}.{}.{}", delivery.id, delivery.timestamp, delivery.body);
    ring::hmac::verify(&key, signed.as_bytes(), &tag).is_ok()
}

async fn next(deliveries: &mut mpsc::UnboundedReceiver<Delivery>, within: Duration) -> Delivery {
    tokio::time::timeout(within, deliveries.recv())
        .await
        .expect("a delivery in time")
        .expect("the receiver runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_is_announced_signed_and_retried_until_the_receiver_takes_it() {
    let (url, mut deliveries) = receiver(1).await;
    let data = TestData::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.approval_webhook = Some(WebhookConfig {
        url: HttpsUrl::parse_allowing_loopback(&url).unwrap(),
        secret: SECRET.to_vec(),
        ca_file: None,
    });
    let app = TestApp::spawn_with(config).await;
    let agent = app.agent("billing-agent").await;
    let task_id = open_task(&agent).await;
    let pending = agent
        .tasks()
        .authorize_tool_call(tool_call(
            &task_id,
            "payments.refund",
            &format!(r#"{{"order_id":"A-1","amount_cents":25000,"card_number":"{CARD}"}}"#),
        ))
        .await
        .unwrap()
        .into_inner()
        .pending
        .expect("a large refund waits for an operator");

    let first = next(&mut deliveries, Duration::from_secs(5)).await;
    assert!(signature_is_valid(&first), "signed with the shared secret");
    let body: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(body["type"], "approval.pending");
    assert_eq!(body["data"]["lease_id"], pending.lease_id.as_str());
    assert_eq!(body["data"]["task_id"], task_id.as_str());
    assert_eq!(body["data"]["workload"], "billing-agent");
    assert_eq!(body["data"]["scope"], "tool:payments.refund");
    assert_eq!(
        body["data"]["detail"]["tool_call"]["arguments"]["card_number"],
        "[redacted]"
    );
    assert!(!first.body.contains(CARD), "no sensitive value leaves");

    // The receiver failed: the request still waits for operators, and the delivery comes again
    // (the same id, for the receiver to drop duplicates), signed for its own timestamp.
    let operator = app.workload("alice", &[proto::Role::Operator]).await;
    let waiting = pending_requests(&app.connect(Some(&operator)).await).await;
    assert_eq!(
        waiting.len(),
        1,
        "a failing webhook does not hold the request"
    );
    let retry = next(&mut deliveries, Duration::from_secs(10)).await;
    assert_eq!(retry.id, first.id);
    assert_eq!(retry.body, first.body);
    assert!(signature_is_valid(&retry));

    // A forged or altered delivery would not verify.
    let altered = Delivery {
        body: first.body.replace("billing-agent", "other-agent"),
        ..first
    };
    assert!(!signature_is_valid(&altered));
    // Taken: no further delivery.
    let again = tokio::time::timeout(Duration::from_secs(3), deliveries.recv()).await;
    assert!(again.is_err(), "a delivered webhook is not sent again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_webhook_nothing_is_queued() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let agent = app.agent("billing-agent").await;
    let task_id = open_task(&agent).await;
    agent
        .tasks()
        .authorize_tool_call(tool_call(
            &task_id,
            "payments.refund",
            r#"{"order_id":"A-1","amount_cents":25000}"#,
        ))
        .await
        .unwrap();
    assert_eq!(count_rows(&data, "jobs").await, 0);
    app.stop().await;
}
