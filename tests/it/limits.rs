//! Cheap clients cannot wear the broker down: bounded strings, a cap on revocation streams per
//! caller, per-caller rate and concurrency limits, and a header-read timeout on the HTTP
//! listener.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tonic::Code;
use warrant::caller_limits::CallerLimitSettings;
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
            ..Default::default()
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

/// A caller over its rate is refused with RESOURCE_EXHAUSTED naming the setting, on gRPC and on
/// HTTP introspection, and counted; other callers keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_is_refused_while_others_are_served() {
    let data = TestData::new(Backend::Sqlite).await;
    let mut config = data.config();
    // Ten calls, then one every 100 s: nothing refills during the test.
    config.caller_limits = CallerLimitSettings {
        rate_per_second: 1,
        burst: 10,
        concurrency: 128,
    };
    let app = TestApp::spawn_with(config).await;
    let busy = app.agent("busy-agent").await;
    let quiet = app.agent("quiet-agent").await;
    let unknown_task = || complete_request("0198c1f0-0000-7000-8000-000000000000");
    for call in 0..10 {
        let answer = busy.tasks().complete_task(unknown_task()).await;
        assert_ne!(
            answer.err().map(|status| status.code()),
            Some(Code::ResourceExhausted),
            "call {call} is within the burst"
        );
    }
    let refused = busy
        .tasks()
        .complete_task(unknown_task())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("limits.caller_rate"),
        "{}",
        refused.message()
    );
    let served = quiet
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await;
    assert!(served.is_ok(), "another caller is unaffected: {served:?}");

    let api = app.resource_server("crm-api", &[CRM]).await;
    let addr = app.http_addr;
    let statuses = tokio::task::spawn_blocking(move || {
        (0..11)
            .map(|_| http_introspect(addr, Some(&api), "token=x").0)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        statuses[..10].iter().all(|status| *status == 200),
        "{statuses:?}"
    );
    assert_eq!(statuses[10], 429, "{statuses:?}");

    let metrics = http_get(app.http_addr, "/metrics").1;
    assert!(
        metrics.contains(r#"warrant_calls_limited_total{limit="rate"} 2"#),
        "{metrics}"
    );
}

/// A caller with more calls in flight than its concurrency limit has the excess refused at
/// once, and is served again when its calls finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_concurrency_has_the_excess_refused() {
    let data = TestData::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.caller_limits = CallerLimitSettings {
        rate_per_second: 1_000_000,
        burst: 1_000_000,
        concurrency: 2,
    };
    let app = TestApp::spawn_with(config).await;
    let agent = app.agent("parallel-agent").await;
    let calls = (0..40).map(|_| {
        let mut tasks = agent.tasks();
        async move { tasks.begin_task(begin(&["crm.contacts:read"])).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let refused: Vec<_> = answers
        .iter()
        .filter_map(|answer| answer.as_ref().err())
        .collect();
    assert!(!refused.is_empty(), "40 calls at once, 2 allowed in flight");
    assert!(refused.len() < 40, "the first calls were admitted");
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("limits.caller_concurrency"),
            "{status:?}"
        );
    }
    let after = agent
        .tasks()
        .begin_task(begin(&["crm.contacts:read"]))
        .await;
    assert!(
        after.is_ok(),
        "served again once the calls finished: {after:?}"
    );
}

/// Attestation needs no identity, so it is limited by where it comes from: a flood of made-up
/// join tokens from one address is cut off with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_attestations_from_one_address_is_cut_off() {
    let data = TestData::new(Backend::Sqlite).await;
    let mut config = data.config();
    config.caller_limits = CallerLimitSettings {
        rate_per_second: 50,
        burst: 200,
        concurrency: 32,
    };
    let app = TestApp::spawn_with(config).await;
    let anonymous = app.connect(None).await;
    let made_up = format!("wjt_{}_{}", "0".repeat(32), "A".repeat(43));
    let calls = (0..400).map(|_| {
        let mut attestation = anonymous.attestation();
        let token = made_up.clone();
        async move {
            attestation
                .attest(proto::AttestRequest {
                    method: Some(proto::attest_request::Method::JoinToken(token)),
                })
                .await
                .unwrap_err()
                .code()
        }
    });
    let codes = futures_util::future::join_all(calls).await;
    let limited = codes
        .iter()
        .filter(|code| **code == Code::ResourceExhausted)
        .count();
    assert!(
        limited > 0,
        "400 at once from one address, 200 allowed in a burst"
    );
    assert!(
        codes
            .iter()
            .all(|code| matches!(code, Code::ResourceExhausted | Code::Unauthenticated)),
        "{codes:?}"
    );
}
