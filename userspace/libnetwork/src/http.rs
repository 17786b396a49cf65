//! The little HTTP/1.1 that Docker's plugin client speaks (POST with a JSON body or none,
//! keep-alive connections, JSON answers); calico-node's health endpoints read requests with it
//! too.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One request: the path (the call, e.g. `/NetworkDriver.Join`) and the body.
pub struct Request {
    pub path: String,
    pub body: Vec<u8>,
}

const MAX_BODY: usize = 1 << 20;

/// Reads the next request; `Ok(None)` when the client closed the connection.
pub async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    if length > MAX_BODY {
        return Err(std::io::Error::other(format!(
            "request body of {length} bytes is too large"
        )));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    Ok(Some(Request { path, body }))
}

pub async fn write_response<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    body: &serde_json::Value,
) -> std::io::Result<()> {
    // Docker reads `Err` from a non-200 answer; with 200 some calls (RequestPool) ignore it.
    let status = if body.get("Err").is_some() {
        "500 Internal Server Error"
    } else {
        "200 OK"
    };
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).await?;
    writer.write_all(body.as_bytes()).await?;
    writer.flush().await
}
