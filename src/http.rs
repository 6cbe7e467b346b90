//! A tiny HTTP/1.1 server for monitoring: `GET /metrics` (Prometheus text), `GET /healthz`
//! (200 `ok` while the process runs), `GET /readyz` (200 `ready`, or 503 with a short
//! reason; see [`crate::telemetry::readiness`]). `HEAD` works too. One request per
//! connection (`Connection: close`).
//!
//! The endpoint must never starve the daemon of file descriptors (PostgreSQL, Redis and
//! MQTT reconnects need them): at most [`MAX_CONNECTIONS`] connections are served at once
//! and a connection beyond that is closed as soon as it is accepted; each connection
//! gets [`DEADLINE`] for the whole exchange (request and response) and a request head of
//! at most [`MAX_REQUEST`] bytes.

use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head accepted (bytes).
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time one connection may take, from accept to the last byte of the response.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Bind `addr` (errors are returned, so a taken port fails `run` at start) and serve
/// until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "HTTP endpoints: /metrics /healthz /readyz");
    metrics::describe_counter!(
        "skusync_http_rejected_total",
        "HTTP connections closed on accept because the connection cap was reached."
    );
    metrics::counter!("skusync_http_rejected_total").absolute(0);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            // closing at once (instead of leaving it in the backlog) tells the client
            // and frees the descriptor; the slot frees when a served connection ends
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                metrics::counter!("skusync_http_rejected_total").increment(1);
                drop(sock);
                continue;
            };
            let h = handle.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(DEADLINE, connection(sock, &h)).await {
                    Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection"),
                    Err(_) => tracing::debug!("HTTP connection: deadline passed"),
                    Ok(Ok(())) => {}
                }
                drop(permit);
            });
        }
    }))
}

async fn connection(mut sock: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(DEADLINE, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(false);
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if buf.len() > MAX_REQUEST {
                return Ok(false);
            }
        }
    })
    .await;
    let complete = matches!(head, Ok(Ok(true)));
    let (status, ctype, body, head_only) = if !complete {
        (400, "text/plain", "bad request\n".to_string(), false)
    } else {
        route(&buf, handle)
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Bad Request",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    sock.write_all(&out).await?;
    sock.shutdown().await
}

/// `(status, content type, body, HEAD)` for a request head.
fn route(head: &[u8], handle: &PrometheusHandle) -> (u16, &'static str, String, bool) {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return (400, "text/plain", "bad request\n".into(), false);
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (405, "text/plain", "method not allowed\n".into(), false);
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
            head_only,
        ),
        "/healthz" => (200, "text/plain", "ok\n".into(), head_only),
        "/readyz" => match crate::telemetry::readiness() {
            Ok(()) => (200, "text/plain", "ready\n".into(), head_only),
            Err(why) => (503, "text/plain", format!("{why}\n"), head_only),
        },
        _ => (404, "text/plain", "not found\n".into(), head_only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let h = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        assert_eq!(route(b"GET /healthz HTTP/1.1\r\n\r\n", &h).0, 200);
        assert_eq!(route(b"GET /nope HTTP/1.1\r\n\r\n", &h).0, 404);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n", &h).0, 405);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &h).0, 200);
        assert_eq!(route(b"garbage\r\n\r\n", &h).0, 400);
    }
}
