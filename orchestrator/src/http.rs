//! The HTTP listener of `serve --http ADDR`: `/metrics` (the service's
//! counters in the OpenMetrics text format, which Prometheus scrapes) and
//! `/` (the dashboard, [`crate::dashboard`]). Read-only, without
//! authentication: it binds loopback unless told otherwise. The dashboard
//! reads the audit log through a connection of its own, so a page never
//! waits for the QUIC service's state lock.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State as Extract;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::dashboard::{self, View};
use crate::state::{AuditFilter, State, StateError, now_secs};
use crate::telemetry::Telemetry;

/// The default address of `serve --http`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

/// How many audit entries the dashboard lists.
pub const RECENT: usize = 25;

/// The content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the pages are made from.
#[derive(Debug, Clone)]
struct Pages {
    telemetry: Arc<Telemetry>,
    state: Arc<Mutex<State>>,
}

/// Serves `/metrics` and the dashboard on `listener` until `shutdown`
/// resolves. `state` is a connection of its own to the database.
pub async fn run(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    state: State,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let pages = Pages {
        telemetry,
        state: Arc::new(Mutex::new(state)),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .with_state(pages);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(Extract(pages): Extract<Pages>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS))],
        pages.telemetry.encode(),
    )
        .into_response()
}

/// The view from the audit log and the counters.
fn view(pages: &Pages) -> Result<View, StateError> {
    let state = pages.state.lock().expect("dashboard state");
    Ok(View {
        now: now_secs(),
        live: pages.telemetry.snapshot(),
        repos: state.repo_summaries()?,
        recent: state.audit(&AuditFilter {
            newest: Some(RECENT),
            ..Default::default()
        })?,
    })
}

async fn page(Extract(pages): Extract<Pages>) -> Response {
    let made = tokio::task::spawn_blocking(move || view(&pages)).await;
    let headers = |content_type: &'static str| {
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ]
    };
    match made {
        Ok(Ok(view)) => (
            headers("text/html; charset=utf-8"),
            dashboard::render(&view),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!("dashboard: cannot read the state database: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                headers("text/plain; charset=utf-8"),
                format!("cannot read the state database: {e}\n"),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            headers("text/plain; charset=utf-8"),
            format!("the dashboard failed: {e}\n"),
        )
            .into_response(),
    }
}
