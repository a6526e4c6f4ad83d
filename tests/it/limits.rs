//! Cheap clients cannot wear the broker down: bounded strings, a cap on revocation streams per
//! caller, and a header-read timeout on the HTTP listener.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tonic::Code;
use warrant::proto;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_introspection_audience_longer_than_its_bound_is_refused_naming_the_field() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let refused = app
        .admin()
        .await
        .tokens()
        .introspect(proto::IntrospectRequest {
            token: "x".into(),
            audience: format!("https://{}.test", "a".repeat(60 * 1024)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with("audience:"),
        "{}",
        refused.message()
    );
    let trail = app
        .admin()
        .await
        .admin()
        .query_audit(proto::QueryAuditRequest {
            r#type: "token.introspected".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(trail.is_empty(), "nothing of the refused call was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_holds_a_bounded_number_of_revocation_streams() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let api = app.resource_server("crm-api", &[CRM]).await;
    let connection = app.connect(Some(&api)).await;
    let mut streams = Vec::new();
    for _ in 0..16 {
        let stream = connection
            .tokens()
            .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
            .await
            .expect("within the cap")
            .into_inner();
        streams.push(stream);
    }
    let refused = connection
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "{}",
        refused.message()
    );

    let other = app.resource_server("other-api", &[CRM]).await;
    app.connect(Some(&other))
        .await
        .tokens()
        .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
        .await
        .expect("another caller has its own slots");

    streams.pop();
    let freed = eventually(Duration::from_secs(5), || {
        let mut tokens = connection.tokens();
        async move {
            tokens
                .watch_revocations(proto::WatchRevocationsRequest { cursor: 0 })
                .await
                .is_ok()
        }
    })
    .await;
    assert!(freed, "a closed stream gives its slot back");
}

/// A client that opens a connection and sends headers a byte at a time (slowloris) is cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_that_never_finishes_its_headers_is_disconnected() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let addr = app.http_addr;
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let started = Instant::now();
        let mut buffer = [0u8; 256];
        let _ = stream.read(&mut buffer);
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        closed_after < Duration::from_secs(15),
        "the connection was held for {closed_after:?}"
    );
}
