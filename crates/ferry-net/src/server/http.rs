//! The `/metrics` endpoint: a small HTTP server (tiny_http) on its own thread that renders the
//! daemon's metrics on every `GET /metrics` and answers 404 to anything else.

use ferry_core::{Error, Result};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

/// Serves until `stopped()` says so (checked every 100 ms); returns the bound address.
pub(super) fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
    stopped: impl Fn() -> bool + Send + 'static,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let server = tiny_http::Server::http(addr).map_err(|e| Error::Io {
        context: format!("serving metrics on {addr}"),
        kind: std::io::ErrorKind::AddrNotAvailable,
        message: e.to_string(),
    })?;
    let bound = server.server_addr().to_ip().ok_or_else(|| Error::InvalidArgument("metrics address".into()))?;
    let thread = std::thread::Builder::new()
        .name("ferry-metrics".into())
        .spawn(move || {
            while !stopped() {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) else { continue };
                let response = if request.method() == &tiny_http::Method::Get && request.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4"[..]);
                    let mut response = tiny_http::Response::from_string(render());
                    if let Ok(header) = header {
                        response = response.with_header(header);
                    }
                    response
                } else {
                    tiny_http::Response::from_string("only GET /metrics is served here\n").with_status_code(404)
                };
                if let Err(e) = request.respond(response) {
                    tracing::debug!(error = %e, "metrics client went away");
                }
            }
        })
        .map_err(|e| Error::io("starting the metrics thread", &e))?;
    Ok((bound, thread))
}
