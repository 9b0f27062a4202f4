//! `quicseal listen --metrics ADDR`: the node's counters in the Prometheus text format over
//! plain HTTP, rendered by `metrics-exporter-prometheus` on each scrape.
//!
//! The HTTP side is a few lines on a TCP listener rather than a web server crate: one request
//! at a time, its head read with a size and time bound, any path answered with the metrics.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use quicseal::Node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's `metrics` recorder, binds `addr` and
/// serves the node's metrics there until the task is dropped. Returns the bound address.
pub(crate) async fn serve(node: &Node, addr: SocketAddr) -> crate::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| crate::CliError::Input(format!("cannot install the metrics recorder: {e}")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| crate::CliError::Input(format!("--metrics {addr}: cannot listen there: {e}")))?;
    let bound = listener.local_addr()?;
    let node = node.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            node.record_metrics();
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(stream, &handle)).await;
        }
    });
    Ok((bound, task))
}

async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    // Read the request head (to its blank line), bounded; what it asks does not matter.
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = handle.render();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
