//! Bodies stream both ways through the real binary, with flat memory: 1 GiB up, 1 GiB down.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use idmatch_mock::server::{json, Body as UpstreamBody};
use idmatch_mock::{Server as Upstream, TestPki};
use serde_json::json;
use support::*;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

/// `len` bytes of a repeating pattern, produced chunk by chunk, never held whole.
struct Pattern {
    left: u64,
    chunk: Bytes,
}

impl Pattern {
    fn new(len: u64) -> Self {
        let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
        Self {
            left: len,
            chunk: Bytes::from(chunk),
        }
    }
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Reads a body to its end, checking the pattern, and returns its length.
async fn drain_pattern<B>(mut body: B) -> u64
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let pattern = Pattern::new(CHUNK as u64).chunk;
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(mut data) = frame.expect("body intact").into_data() else {
            continue;
        };
        while !data.is_empty() {
            let at = (seen % CHUNK as u64) as usize;
            let n = data.len().min(CHUNK - at);
            assert!(
                data[..n] == pattern[at..at + n],
                "corrupted near byte {seen}"
            );
            seen += n as u64;
            data = data.slice(n..);
        }
    }
    seen
}

/// Peak resident memory of a process so far, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_streams_through_with_flat_memory() {
    let pki = TestPki::localhost();
    let upstream = Upstream::builder()
        .tls(&pki)
        .handler(|request: Request<hyper::body::Incoming>| async move {
            if request.method() == http::Method::POST {
                let received = drain_pattern(request.into_body()).await;
                json(StatusCode::OK, json!({ "received": received }))
            } else {
                let body: UpstreamBody = Pattern::new(GIB).map_err(|e| match e {}).boxed();
                http::Response::new(body)
            }
        })
        .start()
        .await;
    let config = ProxyConfig::new(&upstream.url(BASE), &pki);
    let proxy = Binary::serve(&config.env);
    let baseline = peak_rss_kib(proxy.pid());

    let client = Client::builder(TokioExecutor::new()).build_http::<Pattern>();
    let upload = Request::post(format!("http://{}/upload", proxy.addr))
        .body(Pattern::new(GIB))
        .unwrap();
    let answer = collect(client.request(upload).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["received"], GIB);
    let after_upload = peak_rss_kib(proxy.pid());

    let download = Request::get(format!("http://{}/download", proxy.addr))
        .body(Pattern::new(0))
        .unwrap();
    let response = client.request(download).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(drain_pattern(response.into_body()).await, GIB);
    let after_download = peak_rss_kib(proxy.pid());

    // Buffering either body would cost a GiB; streaming costs a few buffers.
    let budget_kib = 32 * 1024;
    assert!(
        after_upload - baseline < budget_kib,
        "upload grew peak RSS from {baseline} KiB to {after_upload} KiB"
    );
    assert!(
        after_download - baseline < budget_kib,
        "download grew peak RSS from {baseline} KiB to {after_download} KiB"
    );
    eprintln!("peak RSS: {baseline} KiB at start, {after_upload} KiB after 1 GiB up, {after_download} KiB after 1 GiB down");
}
