//! Request ids, tracing spans and the Prometheus text at `/metrics`.
//!
//! Every request runs in a span `request{request_id, method, route, account_id, job_id}`; the id
//! is the caller's `X-Request-Id` when it is a sane one, else a new ULID, and is sent back in
//! `X-Request-Id`. Internal errors name it (`ApiError::internal`), so a user's report finds the
//! log line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_core::prom::{Histogram, family};
use tracing::Instrument;

use crate::Api;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served, if any.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Records `field = value` on the request's span (account and job ids, once known).
pub fn record(field: &'static str, value: &dyn std::fmt::Display) {
    tracing::Span::current().record(field, tracing::field::display(value));
}

fn sane_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| s.to_owned())
}

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug)]
struct RouteStats {
    /// By status code.
    count: BTreeMap<u16, u64>,
    duration: Histogram,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            count: BTreeMap::new(),
            duration: Histogram::new(&BUCKETS),
        }
    }
}

/// Counters the API keeps in memory; queue and ledger figures are read at scrape time.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
    rate_limited: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicU64,
}

/// Counts a request in flight until dropped (also when its future is dropped).
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Metrics {
    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = routes
            .entry((method.to_owned(), route.to_owned()))
            .or_default();
        *r.count.entry(status).or_default() += 1;
        r.duration.observe(seconds);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs a handler on a task of its own, to its end, whether or not the client stays for the
/// answer. hyper drops a request's future when its client hangs up (a long poll given up, a
/// closed tab), and a database future dropped mid-flight can leave its pooled connection out of
/// step with the server: the next request to borrow it waited for ever on a connection the
/// server saw as idle (seen in the workers' pool, where an aborted lease renewal did it). A
/// handler that panics answers 500 instead of dropping the connection.
pub(crate) async fn to_completion(
    handler: impl std::future::Future<Output = Response> + Send + 'static,
) -> Response {
    detached(handler)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `fut` on a task of its own, to its end, under this request's id and span (where it has
/// them): a whole handler (`to_completion`), or the database work of the one handler that is
/// not itself on its own task (`KITS_ROUTE`). A panic is a 500.
pub(crate) async fn detached<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, crate::error::ApiError> {
    let fut = fut.instrument(tracing::Span::current());
    let handle = match request_id() {
        Some(id) => tokio::spawn(REQUEST_ID.scope(id, fut)),
        None => tokio::spawn(fut),
    };
    handle
        .await
        .map_err(|e| crate::error::ApiError::internal(&format_args!("the handler failed: {e}")))
}

/// The middleware: request id, span, metrics.
pub async fn layer(State(api): State<Api>, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(sane_id)
        .unwrap_or_else(|| ulid::Ulid::generate().to_string());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().to_string();
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %method,
        route = %route,
        account_id = tracing::field::Empty,
        job_id = tracing::field::Empty,
    );
    let start = Instant::now();
    api.metrics
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let in_flight = InFlight(&api.metrics.in_flight);
    let handler = REQUEST_ID.scope(id.clone(), next.run(req).instrument(span.clone()));
    // The kit form is read where hyper reads the connection: on a task of its own, the handler
    // would race hyper refilling the body, and the multipart reader could pull several chunks
    // past a field's limit in one poll (3 of 64 KB, seen in CI). Its database work runs to its
    // end on a task of its own instead (`detached`).
    let mut resp = if method == "POST" && route == crate::KITS_ROUTE {
        handler.await
    } else {
        to_completion(handler).await
    };
    drop(in_flight);
    let status = resp.status();
    let seconds = start.elapsed().as_secs_f64();
    api.metrics
        .observe(&method, &route, status.as_u16(), seconds);
    if status.is_server_error() {
        span.in_scope(|| tracing::warn!(status = status.as_u16(), seconds, "request failed"));
    } else {
        span.in_scope(|| tracing::debug!(status = status.as_u16(), seconds, "request"));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// `GET /metrics`: Prometheus text format 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
    )
)]
pub async fn metrics(State(api): State<Api>) -> Response {
    let mut out = String::new();
    let ledger = api.queue.ledger();
    let gauges = async {
        let mut tx = ledger.db().begin_read().await?;
        let stats = kiln_jobs::queue_stats(&mut tx, ledger.ctx().now).await?;
        let holds = kiln_ledger::open_holds(&mut tx).await?;
        let flows = kiln_ledger::credit_flows(&mut tx).await?;
        Ok::<_, kiln_jobs::JobsError>((stats, holds, flows))
    }
    .await;
    let up = match gauges {
        Ok((stats, holds, flows)) => {
            let now = ledger.ctx().now.millis();
            family(
                &mut out,
                "kiln_queue_depth",
                "gauge",
                "Kit jobs by queue and status (queued, running).",
            );
            for s in &stats {
                let _ = writeln!(
                    out,
                    "kiln_queue_depth{{queue=\"{}\",status=\"queued\"}} {}",
                    s.queue, s.queued
                );
                let _ = writeln!(
                    out,
                    "kiln_queue_depth{{queue=\"{}\",status=\"running\"}} {}",
                    s.queue, s.running
                );
            }
            family(
                &mut out,
                "kiln_queue_oldest_age_seconds",
                "gauge",
                "Age of the oldest queued job that is due, 0 when none.",
            );
            for s in &stats {
                let age = s
                    .oldest_queued_ms
                    .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
                let _ = writeln!(
                    out,
                    "kiln_queue_oldest_age_seconds{{queue=\"{}\"}} {age}",
                    s.queue
                );
            }
            family(
                &mut out,
                "kiln_holds_open",
                "gauge",
                "Holds for tool calls not yet captured, voided or expired.",
            );
            let _ = writeln!(out, "kiln_holds_open {holds}");
            family(
                &mut out,
                "kiln_credits_total",
                "counter",
                "Credits moved since the ledger began, by journal entry: granted, reserved, committed (charged), released (given back), expired. The same in every process: read from the journal.",
            );
            for entry in ["grant", "reserve", "commit", "release", "expire"] {
                let n = flows
                    .iter()
                    .find(|(e, _)| e == entry)
                    .map_or(0, |(_, n)| *n);
                let _ = writeln!(out, "kiln_credits_total{{entry=\"{entry}\"}} {n}");
            }
            true
        }
        Err(e) => {
            tracing::warn!("metrics: the database did not answer: {e}");
            false
        }
    };
    family(
        &mut out,
        "kiln_up",
        "gauge",
        "Whether the database answered this scrape.",
    );
    let _ = writeln!(out, "kiln_up {}", u8::from(up));
    family(
        &mut out,
        "kiln_http_requests_in_flight",
        "gauge",
        "Requests being served, this scrape included.",
    );
    let _ = writeln!(
        out,
        "kiln_http_requests_in_flight {}",
        api.metrics
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    family(
        &mut out,
        "kiln_api_rate_limited_total",
        "counter",
        "Submissions refused with 429.",
    );
    let _ = writeln!(
        out,
        "kiln_api_rate_limited_total {}",
        api.metrics
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let routes = api
        .metrics
        .routes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    family(
        &mut out,
        "kiln_http_requests_total",
        "counter",
        "HTTP requests by method, route and status.",
    );
    for ((method, route), r) in routes.iter() {
        for (status, n) in &r.count {
            let _ = writeln!(
                out,
                "kiln_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "kiln_http_request_duration_seconds",
        "histogram",
        "HTTP request latency by method and route.",
    );
    for ((method, route), r) in routes.iter() {
        let labels = format!("method=\"{method}\",route=\"{route}\"");
        r.duration
            .render(&mut out, "kiln_http_request_duration_seconds", &labels);
    }
    drop(routes);
    if let Some(extra) = &api.extra_metrics {
        (extra.0)(&mut out);
    }
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::routing::get;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::{Notify, mpsc};

    use super::*;

    /// Sends on `tx` when dropped.
    struct OnDrop(mpsc::UnboundedSender<&'static str>, &'static str);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send(self.1);
        }
    }

    /// The next event (the bound only turns a hang into a failure).
    async fn next_event(events: &mut mpsc::UnboundedReceiver<&'static str>) -> &'static str {
        tokio::time::timeout(std::time::Duration::from_secs(30), events.recv())
            .await
            .expect("an event")
            .expect("open")
    }

    /// A client that sends a request and hangs up while the handler works: hyper drops the
    /// request's future, and the handler still runs to its end.
    #[tokio::test]
    async fn a_handler_runs_to_its_end_when_its_client_hangs_up() {
        let (events_tx, mut events) = mpsc::unbounded_channel::<&'static str>();
        let gate = Arc::new(Notify::new());
        let done = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (events_tx, gate, done) = (events_tx.clone(), gate.clone(), done.clone());
            move || async move {
                let _ = events_tx.send("started");
                let _cancelled = OnDrop(events_tx.clone(), "handler dropped");
                gate.notified().await;
                done.fetch_add(1, Ordering::SeqCst);
                std::mem::forget(_cancelled);
                "ok"
            }
        };
        let outer = events_tx.clone();
        let app = Router::new()
            .route("/slow", get(handler))
            .layer(axum::middleware::from_fn(|req: Request, next: Next| {
                to_completion(next.run(req))
            }))
            // Outermost: says when hyper gave up on the request.
            .layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let guard = OnDrop(outer.clone(), "request dropped");
                    async move {
                        let resp = next.run(req).await;
                        std::mem::forget(guard);
                        resp
                    }
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(axum::serve(listener, app).into_future());
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /slow HTTP/1.1\r\nhost: kiln\r\n\r\n")
            .await
            .expect("send");
        assert_eq!(next_event(&mut events).await, "started");
        drop(conn);
        assert_eq!(
            next_event(&mut events).await,
            "request dropped",
            "hyper noticed the hang-up first"
        );
        gate.notify_one();
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while done.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the handler ran to its end");
        assert!(events.try_recv().is_err(), "the handler was not dropped");
    }

    /// Work handed to `detached` runs to its end when the request's future that awaited it is
    /// dropped (the kit form's handler stays on the connection's task, so a hang-up drops it),
    /// under the request's id.
    #[tokio::test]
    async fn detached_work_runs_to_its_end_when_its_request_is_dropped() {
        let gate = Arc::new(Notify::new());
        let (done_tx, mut done) = mpsc::unbounded_channel::<Option<String>>();
        let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
        let request = {
            let gate = gate.clone();
            tokio::spawn(REQUEST_ID.scope("req-1".to_owned(), async move {
                detached(async move {
                    let _ = started_tx.send(());
                    gate.notified().await;
                    let _ = done_tx.send(request_id());
                })
                .await
            }))
        };
        started.recv().await.expect("the work started");
        request.abort();
        assert!(
            request.await.expect_err("aborted").is_cancelled(),
            "the request's future was dropped"
        );
        gate.notify_one();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(30), done.recv())
            .await
            .expect("the work ran to its end")
            .expect("it reported");
        assert_eq!(seen.as_deref(), Some("req-1"), "under the request's id");
    }
}
