//! The listeners and the life of each connection: accept, serve, time out, drain, stop.
//!
//! Shutdown follows what Kubernetes needs (the endpoints of a terminating pod are removed
//! asynchronously, so clients keep sending for a while):
//! 1. the stop signal turns readiness to 503 at once, and HTTP/2 connections get GOAWAY;
//! 2. for `drain_delay` the listener keeps accepting, and every HTTP/1 response says
//!    `Connection: close`, so clients move to new connections without a failed request;
//! 3. then the listener closes, every connection is shut down gracefully, and in-flight
//!    requests get `shutdown_timeout` to finish before the rest are dropped.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use http::Version;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::admin;
use crate::callback::Callbacks;
use crate::config::{ClientLimits, Config, Credentials};
use crate::credentials::{CaReloader, Reloader};
use crate::metrics::Metrics;
use crate::observe::RequestEnd;
use crate::proxy::Proxy;
use crate::token::{Clock, Signer, SystemClock, TokenCache};
use crate::upstream;

/// After an `accept` error (typically out of file descriptors) wait this long before the next
/// attempt, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The sockets the caller bound: the proxy's, the admin endpoints', and the callbacks' when
/// `callback.listen` is set.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    pub callback: Option<TcpListener>,
}

/// Where the process is in its life; connections watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    Draining,
    Stopping,
}

/// A proxy ready to serve: TLS roots loaded, first token minted.
pub struct Server {
    proxy: Arc<Proxy>,
    tokens: Arc<TokenCache>,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    /// Raised by the admin listener's `POST /quitquitquit`.
    quit: Arc<Notify>,
    credentials: Credentials,
    /// Spawned by `serve`, with the credentials' reloader.
    ca_reloader: Option<CaReloader>,
    /// When `callback.listen` is set.
    callbacks: Option<Arc<Callbacks>>,
    limits: ClientLimits,
    drain_delay: Duration,
    shutdown_timeout: Duration,
}

impl Server {
    pub fn new(config: &Config) -> Result<Self, upstream::TlsSetupError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(
        config: &Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, upstream::TlsSetupError> {
        let trust = upstream::Trust::new(&config.upstream)?;
        let client = trust.client(&config.upstream);
        let signer = Signer::new(
            &config.credentials.key_id,
            config.credentials.secret.expose(),
        );
        let tokens = Arc::new(TokenCache::new(signer, config.token.clone(), clock.clone()));
        let metrics = Arc::new(Metrics::new());
        let callbacks = config
            .callback
            .as_ref()
            .map(|settings| {
                let secret = config.credentials.secret.expose();
                Callbacks::new(settings, secret, clock.clone(), metrics.clone()).map(Arc::new)
            })
            .transpose()?;
        let draining = Arc::new(AtomicBool::new(false));
        let proxy = Arc::new(Proxy::new(
            config,
            client,
            tokens.clone(),
            metrics.clone(),
            draining.clone(),
        ));
        let ca_reloader = CaReloader::new(
            &config.upstream,
            config.credentials.reload_interval,
            trust,
            metrics.clone(),
        );
        Ok(Self {
            ca_reloader,
            callbacks,
            proxy,
            tokens,
            metrics,
            draining,
            quit: Arc::new(Notify::new()),
            credentials: config.credentials.clone(),
            limits: config.client.clone(),
            drain_delay: config.drain_delay,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// The shared token, for observing it (tests, metrics).
    pub fn tokens(&self) -> &Arc<TokenCache> {
        &self.tokens
    }

    /// Serves until `shutdown` resolves or the admin listener is asked to quit, then drains and
    /// stops (see the module doc).
    pub async fn serve(mut self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let refresher = tokio::spawn(self.tokens.clone().run_refresher());
        self.proxy.keep_warm();
        let reloader = Reloader::new(&self.credentials, self.tokens.clone(), self.metrics.clone())
            .map(|reloader| match &self.callbacks {
                Some(callbacks) => reloader.also_rotating(callbacks.verifier().clone()),
                None => reloader,
            })
            .map(|reloader| tokio::spawn(reloader.pacing(self.proxy.pacer().cloned()).run()));
        // Stops accepting when the proxy's listener does, after the drain delay: CM.com, like
        // the apps, keeps sending while the endpoints of a terminating pod are removed.
        let (stop_callbacks, callbacks_stopped) = tokio::sync::oneshot::channel::<()>();
        let callbacks = match (listeners.callback, self.callbacks.clone()) {
            (Some(listener), Some(callbacks)) => Some(tokio::spawn(crate::callback::serve(
                listener,
                callbacks,
                async {
                    let _ = callbacks_stopped.await;
                },
            ))),
            _ => None,
        };
        let ca_reloader = self
            .ca_reloader
            .take()
            .map(|reloader| tokio::spawn(reloader.run()));
        let admin = tokio::spawn(admin::serve(
            listeners.admin,
            admin::State {
                tokens: self.tokens.clone(),
                metrics: self.metrics.clone(),
                draining: self.draining.clone(),
                quit: self.quit.clone(),
                pacer: self.proxy.pacer().cloned(),
            },
        ));
        let http = self.http_builder();
        let phases = Arc::new(Phases::new());
        let mut connections = JoinSet::new();
        let listener = listeners.proxy;
        let drain = tokio::time::sleep(Duration::MAX);
        tokio::pin!(shutdown, drain);
        let (mut draining, mut signalled) = (false, false);

        loop {
            let stop = tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                            continue;
                        }
                    };
                    let Ok(local) = stream.local_addr() else { continue };
                    let _ = stream.set_nodelay(true);
                    let activity = Arc::new(Activity::new());
                    let requests = activity.clone();
                    let service = service_fn({
                        let proxy = self.proxy.clone();
                        move |request: http::Request<hyper::body::Incoming>| {
                            requests.request_started(request.version());
                            proxy.clone().serve(request, local, requests.clone())
                        }
                    });
                    let io = TokioIo::new(ClientSocket { inner: stream, activity: activity.clone() });
                    let connection = http.serve_connection(io, service).into_owned();
                    connections.spawn(drive(connection, activity, self.limits.clone(), phases.clone(), peer, self.proxy.clone()));
                    false
                }
                // Still awaited after a quit started the drain: the caller's second-signal exit
                // is armed by its first signal.
                () = &mut shutdown, if !signalled => {
                    signalled = true;
                    true
                }
                () = self.quit.notified(), if !draining => true,
                () = &mut drain, if draining => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => false,
            };
            if stop && !draining {
                draining = true;
                self.draining.store(true, Ordering::SeqCst);
                phases.set(Phase::Draining);
                drain.as_mut().reset(Instant::now() + self.drain_delay);
                tracing::info!(drain_delay = ?self.drain_delay, "draining: readiness is 503; still accepting");
            }
        }

        drop(listener);
        let _ = stop_callbacks.send(());
        phases.set(Phase::Stopping);
        tracing::info!(
            connections = connections.len(),
            "stopped accepting; waiting for in-flight requests"
        );
        let callbacks_abort = callbacks.as_ref().map(|task| task.abort_handle());
        let finished = async {
            while connections.join_next().await.is_some() {}
            if let Some(callbacks) = callbacks {
                let _ = callbacks.await;
            }
        };
        if tokio::time::timeout(self.shutdown_timeout, finished)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?self.shutdown_timeout,
                connections = connections.len(),
                "connections still open at the shutdown timeout; closing them"
            );
            connections.shutdown().await;
        }
        refresher.abort();
        admin.abort();
        if let Some(callbacks) = callbacks_abort {
            callbacks.abort();
        }
        for reloader in [reloader, ca_reloader].into_iter().flatten() {
            reloader.abort();
        }
    }

    fn http_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            // Our own header and idle timeouts (see `drive`) replace hyper's, whose clock also
            // runs on idle keep-alive connections.
            .header_read_timeout(None)
            // The head must fit the read buffer; beyond it hyper answers 431.
            .max_buf_size(self.limits.max_header_bytes);
        http.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX));
        http
    }
}

/// Serves one connection to its end, enforcing the header and idle timeouts and following the
/// shutdown phases.
///
/// A plain future rather than a `select!` loop: this is polled at every wake-up for the socket,
/// several times a request, and a `select!` would poll each of its branches each time (a waiting
/// `Notified` takes its `Notify`'s lock at every poll, and would be registered and dropped again
/// at every turn of the loop). Here the timer is polled only while a deadline runs, moved only
/// when the deadline moves, and the phase only looked at when [`Signal`] says something changed.
async fn drive<C>(
    connection: C,
    activity: Arc<Activity>,
    limits: ClientLimits,
    phases: Arc<Phases>,
    peer: std::net::SocketAddr,
    proxy: Arc<Proxy>,
) where
    C: GracefulConnection<Error = Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(connection);
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    // The deadline `timer` is set to, while one runs.
    let mut armed = None;
    let phase_changed = phases.changed.notified();
    tokio::pin!(phase_changed);
    let signal = Waker::from(activity.signal.clone());
    let mut seen = Phase::Serving;
    let mut closing = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(result) = connection.as_mut().poll(cx) {
            if let Err(error) = result {
                match error.downcast_ref::<hyper::Error>() {
                    // hyper has answered it: a request that never reached the service.
                    Some(parse) if parse.is_parse() && !parse.is_parse_version_h2() => {
                        proxy.accounting().unparsed(peer, parse);
                    }
                    _ => tracing::debug!(%peer, %error, "connection ended with an error"),
                }
            }
            return Poll::Ready(());
        }
        activity.signal.task.register(cx.waker());
        if activity.signal.raised.swap(false, Ordering::AcqRel) {
            // Registered again before the phase is read, so that a change after the read
            // raises the signal once more.
            let mut signalled = Context::from_waker(&signal);
            while phase_changed.as_mut().poll(&mut signalled).is_ready() {
                phase_changed.set(phases.changed.notified());
            }
            let phase = phases.get();
            if phase != seen && !closing {
                seen = phase;
                let stop = match phase {
                    Phase::Serving => false,
                    // HTTP/1 connections learn it from `Connection: close` on their next
                    // response instead: closing them now could race a request in flight.
                    Phase::Draining => activity.is_h2.load(Ordering::Relaxed),
                    Phase::Stopping => true,
                };
                if stop {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    continue;
                }
            }
        }
        let deadline = activity.deadline(&limits);
        if deadline != armed {
            if let Some(deadline) = deadline {
                timer.as_mut().reset(deadline);
            }
            armed = deadline;
        }
        if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
            match activity.expired(&limits) {
                Some(Expired::Head) => {
                    tracing::debug!(%peer, timeout = ?limits.header_timeout, "request head too slow; closing");
                    return Poll::Ready(());
                }
                Some(Expired::Idle) if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    continue;
                }
                // Idle while already closing: nothing more to do but let the connection end.
                _ => {}
            }
        }
        return Poll::Pending;
    })
    .await;
}

/// Where the process is in its life, for every connection to follow.
struct Phases {
    current: AtomicU8,
    changed: Notify,
}

impl Phases {
    fn new() -> Self {
        Self {
            current: AtomicU8::new(Phase::Serving as u8),
            changed: Notify::new(),
        }
    }

    fn set(&self, phase: Phase) {
        self.current.store(phase as u8, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn get(&self) -> Phase {
        match self.current.load(Ordering::SeqCst) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }
}

/// Wakes a connection's task for what happens outside its own poll (the shutdown phase
/// changes; an HTTP/2 stream, which runs in a task of its own, finishes) and remembers that it
/// did, so that [`drive`] looks at those only then. Raised when made: the first poll registers
/// for the phase and reads it.
struct Signal {
    raised: AtomicBool,
    task: AtomicWaker,
}

impl Signal {
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.raise();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raise();
    }
}

/// What a connection is doing, as far as its timeouts are concerned. Times are milliseconds
/// since `epoch`; a head start of 0 means no head is being received.
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    idle_since: AtomicU64,
    head_started: AtomicU64,
    is_h2: AtomicBool,
    signal: Arc<Signal>,
}

enum Expired {
    Head,
    Idle,
}

impl Activity {
    fn new() -> Self {
        // A new connection owes us a request head, on the header timeout's clock.
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(1),
            head_started: AtomicU64::new(1),
            is_h2: AtomicBool::new(false),
            signal: Arc::new(Signal {
                raised: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }

    fn now(&self) -> u64 {
        // Never 0, which means "unset".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, millis: u64) -> Instant {
        self.epoch + Duration::from_millis(millis - 1)
    }

    fn request_started(&self, version: Version) {
        if version == Version::HTTP_2 {
            self.is_h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
    }

    /// Bytes arrived: on an idle HTTP/1 connection they begin the next request head.
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0
            && self.head_started.load(Ordering::SeqCst) == 0
            && !self.is_h2.load(Ordering::Relaxed)
        {
            self.head_started.store(self.now(), Ordering::SeqCst);
        }
    }

    /// When the connection must next be looked at, if ever.
    fn deadline(&self, limits: &ClientLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let head = self.head_started.load(Ordering::SeqCst);
        let head = (head != 0).then(|| self.at(head) + limits.header_timeout);
        let idle = self.at(self.idle_since.load(Ordering::SeqCst)) + limits.idle_timeout;
        Some(head.map_or(idle, |head| head.min(idle)))
    }

    fn expired(&self, limits: &ClientLimits) -> Option<Expired> {
        let now = Instant::now();
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let head = self.head_started.load(Ordering::SeqCst);
        if head != 0 && self.at(head) + limits.header_timeout <= now {
            return Some(Expired::Head);
        }
        let idle = self.at(self.idle_since.load(Ordering::SeqCst)) + limits.idle_timeout;
        (idle <= now).then_some(Expired::Idle)
    }
}

impl RequestEnd for Activity {
    /// Called when a response has been sent in full, or abandoned.
    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle_since.store(self.now(), Ordering::SeqCst);
            // An HTTP/1 request finishes within its connection's poll, after which `drive`
            // looks at the deadline anyway; waking it as well would cost a poll for nothing.
            if self.is_h2.load(Ordering::Relaxed) {
                self.signal.raise();
            }
        }
    }
}

/// The client's socket, telling its [`Activity`] when bytes arrive.
struct ClientSocket {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for ClientSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for ClientSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
