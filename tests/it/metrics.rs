//! `/metrics` in the Prometheus text format, checked with the reference parsers.

use std::process::Command;

use warrant::proto;

use crate::support::*;

/// Parses the exposition strictly as OpenMetrics and again as classic Prometheus text, and
/// prints {"name{label=value,...}": value} for every sample.
const PARSE_SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as classic
text = sys.stdin.read()
samples = {}
for family in openmetrics(text):
    for sample in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        samples[f"{sample.name}{{{labels}}}"] = sample.value
assert sum(len(f.samples) for f in classic(text)) > 0
print(json.dumps(samples))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_issuance_denial_revocation_and_introspection_in_prometheus_format() {
    let Some(python) = python_venv() else { return };
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    let task = agent
        .begin_task(begin(&["crm.contacts:read", "tickets:write"]))
        .await
        .unwrap()
        .into_inner();
    agent
        .begin_task(begin(&["payments:refund"]))
        .await
        .unwrap_err();
    assert!(app.is_active(&task.leases[0].credential, CRM).await);
    agent
        .complete_task(complete_request(&task.task_id))
        .await
        .unwrap();
    assert!(!app.is_active(&task.leases[0].credential, CRM).await);

    let channel = app.connect(None).await.channel();
    let mut grpc = tonic::client::Grpc::new(channel);
    for made_up in ["/warrant.v1.Tasks/MadeUp1", "/warrant.v1.Tasks/MadeUp2"] {
        grpc.ready().await.unwrap();
        let codec =
            tonic_prost::ProstCodec::<proto::GetJwksRequest, proto::GetJwksResponse>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(made_up);
        let status = grpc
            .unary(tonic::Request::new(proto::GetJwksRequest {}), path, codec)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    let (status, text) = http_get(app.http_addr, "/metrics");
    assert_eq!(status, 200);
    let mut parser = Command::new(python)
        .args(["-c", PARSE_SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut parser.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the exposition does not parse: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let value = |key: &str| {
        samples[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no sample {key} in {samples}"))
    };
    assert_eq!(
        value("warrant_credentials_issued_total{kind=jwt,scope=crm.contacts:read}"),
        1.0
    );
    assert_eq!(
        value("warrant_credentials_issued_total{kind=jwt,scope=tickets:write}"),
        1.0
    );
    assert_eq!(
        value("warrant_credentials_denied_total{scope=payments:refund}"),
        1.0
    );
    assert_eq!(
        value("warrant_credentials_revoked_total{reason=task_completed,scope=crm.contacts:read}"),
        1.0
    );
    assert_eq!(value("warrant_introspections_total{result=active}"), 1.0);
    assert_eq!(value("warrant_introspections_total{result=inactive}"), 1.0);
    assert!(value("warrant_rpc_duration_seconds_count{method=/warrant.v1.Tasks/BeginTask}") >= 2.0);
    assert!(value("warrant_store_duration_seconds_count{operation=insert_task}") >= 1.0);
    assert_eq!(
        value("warrant_rpc_duration_seconds_count{method=unimplemented}"),
        2.0
    );
    assert!(
        !text.contains("MadeUp"),
        "client-chosen paths never become labels"
    );
}

/// Scope names a client makes up never become label values: a thousand refused requests for
/// invented scopes add one `unknown` series, not a thousand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_scope_names_are_counted_as_unknown() {
    let data = TestData::new(Backend::Sqlite).await;
    let app = TestApp::spawn(&data).await;
    let mut agent = app.agent("crm-agent").await.tasks();
    for index in 0..1000 {
        let scope = format!("made.up{index}:{}", index * 7919);
        let refused = agent.begin_task(begin(&[&scope])).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }
    agent
        .begin_task(begin(&["payments:refund"]))
        .await
        .unwrap_err();

    let (_, text) = http_get(app.http_addr, "/metrics");
    let denied: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("warrant_credentials_denied_total{"))
        .collect();
    assert_eq!(
        denied.len(),
        2,
        "one series per catalog scope refused, plus unknown: {denied:?}"
    );
    assert!(
        denied
            .iter()
            .any(|line| line.contains(r#"scope="unknown""#) && line.ends_with(" 1000")),
        "{denied:?}"
    );
    assert!(!text.contains("made.up"), "no invented name in /metrics");
}
