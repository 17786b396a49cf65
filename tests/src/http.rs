//! A blocking HTTP/1.1 client for tests (hyper underneath): the agent's health endpoints, etcd's
//! `/health`, and Docker's plugin protocol on a unix socket.
//!
//! The caller connects (so a connection made inside a network namespace stays there); the
//! exchange runs on a private current-thread runtime on its own thread, which is safe from any
//! caller, async or not.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// An established connection, in either family.
enum Connection {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// GET `path` from `addr` (connecting from the calling thread's namespace): (status, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    exchange(Connection::Tcp(stream), Method::GET, path, String::new())
        .with_context(|| format!("GET {path} from {addr}"))
}

/// POST `body` (JSON) to `path` on the unix socket `socket`: (status, body).
pub fn post_unix(socket: &Path, path: &str, body: &str) -> Result<(u16, String)> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    exchange(
        Connection::Unix(stream),
        Method::POST,
        path,
        body.to_owned(),
    )
    .with_context(|| format!("POST {path} on {}", socket.display()))
}

fn exchange(
    connection: Connection,
    method: Method,
    path: &str,
    body: String,
) -> Result<(u16, String)> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<(u16, String)> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let answer = async {
                        match connection {
                            Connection::Tcp(s) => {
                                s.set_nonblocking(true)?;
                                send(tokio::net::TcpStream::from_std(s)?, request).await
                            }
                            Connection::Unix(s) => {
                                s.set_nonblocking(true)?;
                                send(tokio::net::UnixStream::from_std(s)?, request).await
                            }
                        }
                    };
                    tokio::time::timeout(Duration::from_secs(10), answer)
                        .await
                        .context("no answer within 10 s")?
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sends `size` bytes of request line with no end to `stream`: a server that reads it all grows
/// by that much. Returns how many bytes the server took before it refused (closed or reset the
/// connection); `size` when it took everything.
pub fn endless_request_line(mut stream: impl std::io::Write, size: usize) -> usize {
    let chunk = vec![b'A'; 64 << 10];
    let mut sent = 0;
    let _ = stream.write_all(b"GET /");
    while sent < size {
        match stream.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
    sent
}
