//! `dataapi health`: asks a running service's `/ready` and says whether it may take traffic, for container
//! health checks in images that have no curl (the Dockerfile's `HEALTHCHECK`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// How long the whole check may take: a health check that hangs is worse than one that fails.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where to ask a service that listens on `bind_addr`: an unspecified address (`0.0.0.0`, `::`) is asked on
/// the loopback address of its family.
pub fn probe_addr(bind_addr: SocketAddr) -> SocketAddr {
    let ip = match bind_addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bind_addr.port())
}

/// `Ok` with `/ready`'s answer when it is 200; otherwise what went wrong, for the health check's log.
pub async fn ready(addr: SocketAddr) -> Result<String, String> {
    tokio::time::timeout(PROBE_TIMEOUT, ask_ready(addr))
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {addr} within {PROBE_TIMEOUT:?}")))
}

async fn ask_ready(addr: SocketAddr) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| format!("cannot connect to {addr}: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("no HTTP at {addr}: {error}"))?;
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get("/ready")
        // A loopback name: the host check lets it through with or without keys.
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .expect("a static request is valid");
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("{addr} did not answer /ready: {error}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("{addr} broke off its answer: {error}"))?
        .to_bytes();
    connection.abort();
    let body = String::from_utf8_lossy(&body).trim().to_owned();
    if status == hyper::StatusCode::OK {
        Ok(body)
    } else {
        Err(format!("/ready answered {status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_bind_address_is_probed_on_loopback() {
        let probe = |bind: &str| probe_addr(bind.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:8000"), "127.0.0.1:8000");
        assert_eq!(probe("[::]:9000"), "[::1]:9000");
        assert_eq!(probe("10.1.2.3:8000"), "10.1.2.3:8000");
        assert_eq!(probe("127.0.0.1:1"), "127.0.0.1:1");
    }
}
