//! The bodies on their way through: the client's, cut off at its limit, read whole when it is
//! kept for a replay ([`collect`]); the upstream's response, aborted when it stalls.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

use super::PooledBody;
use crate::error::ProxyError;

/// Reads a body of announced `length` (at most `upstream.replay_buffer_bytes`), holding no
/// more than that whatever the client sends. Usually it is one frame, kept as it is; pieces are
/// joined. Trailers are dropped: only HTTP/2 can carry them on a body of known length, and
/// CM.com's API is JSON.
pub(super) async fn collect(body: Incoming, length: u64) -> Result<Bytes, ProxyError> {
    let mut body = ClientBody::new(body, length);
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    // A body of known length ends with its last byte: no poll more to hear so.
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|error| match error {
            RequestBodyError::Read(error) => ProxyError::RequestBody(error.to_string()),
            // Unreachable with hyper's own checks, which come first; kept as the memory bound.
            RequestBodyError::TooLong => {
                ProxyError::RequestBody("longer than its Content-Length".to_owned())
            }
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                // `length` is bounded by `upstream.replay_buffer_bytes`.
                let mut all = BytesMut::with_capacity(length as usize);
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// The client's body on its way upstream, failing once more than its limit has passed: the
/// upstream then sees the request aborted, never complete.
pub struct ClientBody {
    body: Incoming,
    /// Bytes allowed in all, and still allowed; `u64::MAX` for no limit.
    limit: u64,
    remaining: u64,
    /// Told why the body failed, which an HTTP/2 upstream would only report as a reset.
    failed: Option<oneshot::Sender<ProxyError>>,
    /// Set once the body has been read to its end.
    pub(super) ended: Arc<AtomicBool>,
}

/// Marks an upstream response that came before the client's body ended.
#[derive(Clone, Copy)]
pub(super) struct BodyLeftUnread;

impl ClientBody {
    /// The client's body, cut off past `limit` (`u64::MAX`: no limit).
    fn new(body: Incoming, limit: u64) -> Self {
        Self {
            body,
            limit,
            remaining: limit,
            failed: None,
            ended: Arc::default(),
        }
    }

    /// The same, and the receiver hears why it failed, if it does.
    pub(super) fn reporting(body: Incoming, limit: u64) -> (Self, oneshot::Receiver<ProxyError>) {
        let (failed, receiver) = oneshot::channel();
        let body = Self {
            failed: Some(failed),
            ..Self::new(body, limit)
        };
        (body, receiver)
    }

    fn report(&mut self, error: ProxyError) {
        if let Some(failed) = self.failed.take() {
            let _ = failed.send(error);
        }
    }
}

/// Why the client's body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("reading the request body")]
    Read(#[source] hyper::Error),
    #[error("the request body is longer than allowed")]
    TooLong,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                self.report(ProxyError::RequestBody(error.to_string()));
                return Poll::Ready(Some(Err(RequestBodyError::Read(error))));
            }
            None => {
                self.ended.store(true, Ordering::Release);
                return Poll::Ready(None);
            }
        };
        if let Some(data) = frame.data_ref() {
            match self.remaining.checked_sub(data.len() as u64) {
                Some(remaining) => self.remaining = remaining,
                None => {
                    let limit = self.limit;
                    self.report(ProxyError::BodyTooLarge { limit });
                    return Poll::Ready(Some(Err(RequestBodyError::TooLong)));
                }
            }
        }
        // A body of known length ends with its last byte: the reader may not poll again.
        if self.body.is_end_stream() {
            self.ended.store(true, Ordering::Release);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The upstream's response body, aborted once the upstream has sent nothing of it for
/// `upstream.response_timeout` while we wait (nginx's `proxy_read_timeout`): without a bound, a
/// body that stalls after its head holds the client, its in-flight slot and the upstream
/// connection forever, and the client's idle timeout does not run while a request is in flight.
/// Only time spent waiting on the upstream counts, never time the client takes to read.
pub struct StallTimeout {
    body: PooledBody,
    timeout: Duration,
    /// Made at the first wait, then reused: a body that arrives with its head never needs it.
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the last poll found nothing, so that `silence` is running.
    waiting: bool,
}

/// The upstream went silent in the middle of a response body.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing of the response body for {0:?}")]
pub struct BodyStalled(Duration);

impl StallTimeout {
    pub(super) fn new(body: PooledBody, timeout: Duration) -> Self {
        Self {
            body,
            timeout,
            silence: None,
            waiting: false,
        }
    }
}

impl Body for StallTimeout {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = tokio::time::Instant::now() + this.timeout;
        let silence = match &mut this.silence {
            Some(silence) if this.waiting => silence,
            Some(silence) => {
                silence.as_mut().reset(deadline);
                silence
            }
            None => this
                .silence
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.waiting = true;
        ready!(std::future::Future::poll(silence.as_mut(), cx));
        tracing::warn!(timeout = ?this.timeout, "the upstream's response body stalled; aborting it");
        Poll::Ready(Some(Err(BodyStalled(this.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
