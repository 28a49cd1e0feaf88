//! The node's operator endpoints as the harness reads them: `GET /healthz` and
//! `GET /api/stats` over plain HTTP/1.1 on loopback. Small enough not to need an HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use pegaflow_actors::stats::NodeStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Fetches `path` and returns the body of a 200 reply.
pub async fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let request = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw);
        let (status, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "reply has no header end".to_string())?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "GET {path}: {}",
                status.lines().next().unwrap_or("")
            ));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .map_err(|_| format!("GET {path}: no reply within 5 s"))?
}

/// `GET /api/stats`, parsed.
pub async fn stats(addr: SocketAddr) -> Result<NodeStats, String> {
    let body = get(addr, "/api/stats").await?;
    serde_json::from_str(&body).map_err(|e| format!("/api/stats: {e}"))
}
