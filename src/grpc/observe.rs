//! Per-call observation: a tracing span per RPC (method, then the caller and task once known)
//! and the call's latency in `warrant_rpc_duration_seconds`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::broker::Broker;
use crate::metrics::MethodLabels;

/// Wraps the gRPC services with [`Observe`].
#[derive(Clone)]
pub struct ObserveLayer {
    broker: Arc<Broker>,
}

impl ObserveLayer {
    pub fn new(broker: Arc<Broker>) -> Self {
        ObserveLayer { broker }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            broker: self.broker.clone(),
        }
    }
}

/// Runs each call inside an `rpc` span and records its duration.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    broker: Arc<Broker>,
}

impl<S, Body, ResponseBody> Service<http::Request<Body>> for Observe<S>
where
    S: Service<http::Request<Body>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let span = tracing::info_span!("rpc", %method, caller = tracing::field::Empty, task_id = tracing::field::Empty);
        let started = Instant::now();
        let call = span.in_scope(|| self.inner.call(request));
        let broker = self.broker.clone();
        Box::pin(
            async move {
                let outcome = call.await;
                let elapsed = started.elapsed();
                // Paths come from the client: only served methods get their own label, so that
                // requests to made-up paths cannot grow the metric without bound. Unknown paths
                // are answered UNIMPLEMENTED (12) by the router; Warrant never answers it itself.
                let is_unknown_path = outcome.as_ref().is_ok_and(|response| {
                    response
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|status| status == "12")
                });
                let method = if is_unknown_path {
                    "unimplemented".to_owned()
                } else {
                    method
                };
                broker
                    .metrics()
                    .rpc_seconds
                    .get_or_create(&MethodLabels { method })
                    .observe(elapsed.as_secs_f64());
                tracing::debug!(elapsed_ms = elapsed.as_secs_f64() * 1000.0, "call finished");
                outcome
            }
            .instrument(span),
        )
    }
}
