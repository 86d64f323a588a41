//! Credential rotation: a Secret volume laid out and updated the way the kubelet does it, picked
//! up by the proxy while it serves.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, StatusCode};
use idmatch_mock::server::json;
use idmatch_mock::{RunningServer, Server as Upstream, TestPki};
use idmatch_proxy::config::{Credentials, Secret, TokenSettings};
use idmatch_proxy::credentials::{Check, Reloader};
use idmatch_proxy::metrics::Metrics;
use idmatch_proxy::token::{Signer, SystemClock, TokenCache};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::json;
use support::*;
use tokio::sync::{mpsc, watch};
use tracing::subscriber::NoSubscriber;

const KID_1: &str = "kid-2024";
const SECRET_1: &str = "secret-2024-AC4Etykn7jusGR5FwLDAtILtQb";
const KID_2: &str = "kid-2025";
const SECRET_2: &str = "secret-2025-iQbTMKedP31szXg4WlSbjGEXyN";

const RELOAD_INTERVAL: Duration = Duration::from_millis(50);

/// A Secret volume as the kubelet's `AtomicWriter` maintains it: each version in its own
/// timestamped directory, `..data` linking to the current one, and every key a link through
/// `..data` (`key-id -> ..data/key-id`), so that one rename switches all keys at once.
struct SecretMount {
    dir: tempfile::TempDir,
    versions: u32,
}

impl SecretMount {
    fn new(key_id: &str, secret: &str) -> Self {
        let mut mount = Self {
            dir: tempfile::tempdir().unwrap(),
            versions: 0,
        };
        mount.update(key_id, secret);
        mount
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.path().join(key)
    }

    /// Writes the new version beside the current one, points `..data_tmp` at it and renames
    /// that over `..data`; then adds missing key links and removes the previous version.
    fn update(&mut self, key_id: &str, secret: &str) {
        let root = self.dir.path();
        let previous = fs::read_link(root.join("..data")).ok();
        self.versions += 1;
        let version = format!("..2024_01_01_00_00_00.{:09}", self.versions);
        fs::create_dir(root.join(&version)).unwrap();
        let keys = [("key-id", key_id), ("secret", secret)];
        for (key, contents) in keys {
            fs::write(root.join(&version).join(key), contents).unwrap();
        }
        symlink(&version, root.join("..data_tmp")).unwrap();
        fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        for (key, _) in keys {
            if fs::symlink_metadata(root.join(key)).is_err() {
                symlink(Path::new("..data").join(key), root.join(key)).unwrap();
            }
        }
        if let Some(previous) = previous {
            fs::remove_dir_all(root.join(previous)).unwrap();
        }
    }
}

#[test]
fn a_kubernetes_secret_update_is_picked_up() {
    let mut mount = SecretMount::new(KID_1, SECRET_1);
    let credentials = Credentials {
        key_id: KID_1.into(),
        secret: Secret::new(SECRET_1.as_bytes()),
        key_id_file: Some(mount.path("key-id")),
        secret_file: Some(mount.path("secret")),
        reload_interval: RELOAD_INTERVAL,
    };
    let tokens = Arc::new(TokenCache::new(
        Signer::new(KID_1, SECRET_1.as_bytes()),
        TokenSettings::default(),
        Arc::new(SystemClock),
    ));
    let mut reloader =
        Reloader::new(&credentials, tokens.clone(), Arc::new(Metrics::new())).unwrap();
    assert_eq!(reloader.check(), Check::Unchanged);

    mount.update(KID_2, SECRET_2);
    // The paths in the settings are the same symlinks as before; only `..data` moved.
    assert!(fs::symlink_metadata(mount.path("secret"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(reloader.check(), Check::Reloaded);
    assert_eq!(kid_of(&tokens.authorization()), KID_2);
    assert_eq!(tokens.mint_counts().rotation, 1);

    // Back to the first version, through a third directory.
    mount.update(KID_1, SECRET_1);
    assert_eq!(reloader.check(), Check::Reloaded);
    assert_eq!(kid_of(&tokens.authorization()), KID_1);
    assert_eq!(reloader.check(), Check::Unchanged);
    assert_eq!(tokens.mint_counts().rotation, 2);
}

fn kid_of(authorization: &http::HeaderValue) -> String {
    let token = authorization.to_str().unwrap().strip_prefix("Bearer ");
    decode_header(token.unwrap()).unwrap().kid.unwrap()
}

/// The key id of a request's bearer token if it verifies against the key table, which holds
/// both the old and the new credentials, as CM.com does while a rotation is under way.
fn verified_kid(headers: &HeaderMap) -> Option<&'static str> {
    let token = headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    let kid = decode_header(token).ok()?.kid?;
    let (kid, secret) = [(KID_1, SECRET_1), (KID_2, SECRET_2)]
        .into_iter()
        .find(|(known, _)| *known == kid)?;
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "nbf"]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    decode::<serde_json::Value>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .ok()?;
    Some(kid)
}

/// A request the upstream accepted.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    at: Instant,
    kid: &'static str,
}

/// Accepted requests, per key id.
#[derive(Clone, Copy, Debug, Default)]
struct Accepted {
    kid_1: usize,
    kid_2: usize,
}

/// A TLS upstream accepting tokens signed with either credential set (401 otherwise), recording
/// the key id of each accepted request in arrival order.
struct KeyTableUpstream {
    server: RunningServer,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    accepted: watch::Receiver<Accepted>,
}

impl KeyTableUpstream {
    async fn start(pki: &TestPki) -> Self {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (counts, accepted) = watch::channel(Accepted::default());
        let recorded = arrivals.clone();
        let server = Upstream::builder()
            .tls(pki)
            .handler(move |request: Request<hyper::body::Incoming>| {
                let kid = verified_kid(request.headers());
                if let Some(kid) = kid {
                    // Recorded and counted under one lock, so the order is the arrival order.
                    let mut arrivals = recorded.lock().unwrap();
                    arrivals.push(Arrival {
                        at: Instant::now(),
                        kid,
                    });
                    counts.send_modify(|accepted| match kid {
                        KID_1 => accepted.kid_1 += 1,
                        _ => accepted.kid_2 += 1,
                    });
                }
                async move {
                    match kid {
                        Some(kid) => json(StatusCode::OK, json!({ "kid": kid })),
                        None => json(StatusCode::UNAUTHORIZED, json!({ "error": "bad token" })),
                    }
                }
            })
            .start()
            .await;
        Self {
            server,
            arrivals,
            accepted,
        }
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Waits until the accepted counts satisfy `enough`.
    async fn wait_for(&mut self, enough: impl FnMut(&Accepted) -> bool) {
        self.accepted.wait_for(enough).await.unwrap();
    }
}

/// A proxy reading its credentials from `mount`, re-read every `RELOAD_INTERVAL`; with the
/// settings, which must outlive it: their directory holds the CA file, re-read too.
async fn proxy_over(
    upstream: &KeyTableUpstream,
    pki: &TestPki,
    mount: &SecretMount,
) -> (Proxy, ProxyConfig) {
    let mut config = ProxyConfig::new(&upstream.server.url(BASE), pki);
    config.env.remove("IDMATCH_KEY_ID");
    config.env.remove("IDMATCH_SECRET");
    let config = config
        .set(
            "IDMATCH_KEY_ID_FILE",
            mount.path("key-id").to_str().unwrap(),
        )
        .set(
            "IDMATCH_SECRET_FILE",
            mount.path("secret").to_str().unwrap(),
        )
        .set("IDMATCH_CREDENTIALS_RELOAD_INTERVAL", "50ms");
    (Proxy::start(&config).await, config)
}

const CLIENTS: usize = 4;
/// Bounds the test if the rotation is never seen: the waits below then fail on the timeout.
const MAX_REQUESTS_PER_CLIENT: usize = 2_000;

/// `CLIENTS` keep-alive clients sending requests back to back until `stop`; returns each
/// client's statuses.
fn load(proxy: &Proxy, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<StatusCode>>> {
    (0..CLIENTS)
        .map(|_| {
            let (url, stop) = (proxy.url("/sim-swap"), stop.clone());
            tokio::spawn(async move {
                let client = http1();
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) && statuses.len() < MAX_REQUESTS_PER_CLIENT {
                    statuses.push(send(&client, get(&url)).await.status);
                }
                statuses
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_fails_no_request() {
    let pki = TestPki::localhost();
    let mut upstream = KeyTableUpstream::start(&pki).await;
    let mut mount = SecretMount::new(KID_1, SECRET_1);
    let (proxy, _config) = proxy_over(&upstream, &pki, &mount).await;
    let stop = Arc::new(AtomicBool::new(false));

    let run = async {
        let clients = load(&proxy, &stop);
        upstream.wait_for(|accepted| accepted.kid_1 >= 50).await;
        mount.update(KID_2, SECRET_2);
        let swapped = Instant::now();
        upstream.wait_for(|accepted| accepted.kid_2 >= 50).await;
        stop.store(true, Ordering::Relaxed);
        let mut statuses = Vec::new();
        for client in clients {
            statuses.extend(client.await.unwrap());
        }
        (swapped, statuses)
    };
    let (swapped, statuses) = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the new key id reached the upstream");

    let failed = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", statuses.len());
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), statuses.len());
    assert_eq!(arrivals[0].kid, KID_1);
    let first_new = arrivals.iter().position(|a| a.kid == KID_2).unwrap();
    let switched_at = arrivals[first_new].at;
    assert!(
        switched_at.duration_since(swapped) < 4 * RELOAD_INTERVAL,
        "the new key id arrived {:?} after the swap",
        switched_at.duration_since(swapped)
    );
    // Requests that took the old token just before the swap may still arrive after the first
    // new one: at most one per client, and soon.
    let stragglers = arrivals[first_new..]
        .iter()
        .filter(|a| a.kid == KID_1)
        .collect::<Vec<_>>();
    assert!(stragglers.len() <= CLIENTS, "{stragglers:?}");
    for straggler in stragglers {
        assert!(
            straggler.at.duration_since(switched_at) <= RELOAD_INTERVAL,
            "old key id {:?} after the new one",
            straggler.at.duration_since(switched_at)
        );
    }
    assert_eq!(proxy.tokens.mint_counts().rotation, 1);
}

/// The log lines emitted on this thread from now on, formatted, as they are emitted.
fn capture_logs() -> (
    tracing::subscriber::DefaultGuard,
    mpsc::UnboundedReceiver<String>,
) {
    // `tracing` caches whether a call site is enabled, process-wide, when it first runs; while
    // only one dispatcher exists, it asks the default of the thread that got there first. A
    // concurrent test without a subscriber would then disable the lines captured here, for
    // every thread. A second dispatcher, alive for the whole run, makes it ask all of them.
    static ALL_DISPATCHERS_ASKED: OnceLock<tracing::Dispatch> = OnceLock::new();
    ALL_DISPATCHERS_ASKED.get_or_init(|| tracing::Dispatch::new(NoSubscriber::default()));

    #[derive(Clone)]
    struct Lines(mpsc::UnboundedSender<String>);
    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            // The fmt layer writes each event as one line in one call.
            let _ = self.0.send(String::from_utf8_lossy(bytes).into_owned());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (lines, received) = mpsc::unbounded_channel();
    let writer = Lines(lines);
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (tracing::subscriber::set_default(subscriber), received)
}

/// Reads `logs` up to the first line containing `wanted`; returns the lines read.
async fn wait_for_log(logs: &mut mpsc::UnboundedReceiver<String>, wanted: &str) -> Vec<String> {
    let find = async {
        let mut read = Vec::new();
        loop {
            let line = logs.recv().await.expect("the subscriber is alive");
            let found = line.contains(wanted);
            read.push(line);
            if found {
                return read;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), find)
        .await
        .unwrap_or_else(|_| panic!("no log line with {wanted:?}"))
}

// A current-thread runtime, so that the proxy's tasks log to this thread's subscriber.
#[tokio::test]
async fn a_failed_reload_keeps_serving_with_the_old_credentials() {
    let (_guard, mut logs) = capture_logs();
    let pki = TestPki::localhost();
    let mut upstream = KeyTableUpstream::start(&pki).await;
    let mut mount = SecretMount::new(KID_1, SECRET_1);
    let (proxy, _config) = proxy_over(&upstream, &pki, &mount).await;
    let client = http1();
    let url = proxy.url("/sim-swap");
    assert_eq!(send(&client, get(&url)).await.status, StatusCode::OK);

    // A new key id with an empty secret: neither is applied.
    mount.update(KID_2, "");
    let mut lines = wait_for_log(&mut logs, "credential reload failed").await;
    let failure = lines.last().unwrap();
    let problem = format!("{} is empty", mount.path("secret").display());
    assert!(failure.contains(&problem), "{failure}");
    for _ in 0..5 {
        assert_eq!(send(&client, get(&url)).await.status, StatusCode::OK);
    }
    assert!(upstream.arrivals().iter().all(|a| a.kid == KID_1));
    assert_eq!(proxy.tokens.mint_counts().rotation, 0);

    // Repaired: the new credentials are used from the next check on.
    mount.update(KID_2, SECRET_2);
    lines.extend(wait_for_log(&mut logs, "credentials reloaded").await);
    assert!(lines.last().unwrap().contains(KID_2), "{lines:?}");
    assert_eq!(send(&client, get(&url)).await.status, StatusCode::OK);
    upstream.wait_for(|accepted| accepted.kid_2 == 1).await;
    assert_eq!(proxy.tokens.mint_counts().rotation, 1);

    // However many checks saw the empty secret, it was reported once; no line holds a secret.
    let failures = lines.iter().filter(|l| l.contains("reload failed"));
    assert_eq!(failures.count(), 1, "{lines:?}");
    for secret in [SECRET_1, SECRET_2] {
        assert!(lines.iter().all(|line| !line.contains(secret)), "{lines:?}");
    }
}

/// Replaces `path` the way a ConfigMap or Secret volume update does: whole, by a rename.
fn replace(path: &Path, contents: impl AsRef<[u8]>) {
    let next = path.with_extension("next");
    fs::write(&next, contents).unwrap();
    fs::rename(&next, path).unwrap();
}

// A current-thread runtime, so that the proxy's tasks log to this thread's subscriber.
#[tokio::test]
async fn a_replaced_ca_file_is_trusted_by_new_connections_without_a_restart() {
    let (_guard, mut logs) = capture_logs();
    let (a, b) = (TestPki::localhost(), TestPki::localhost());
    // The upstream's certificate is from CA B. HTTP/1.1 and `Connection: close`: every request
    // opens a new connection, so each one shows the roots trusted at that moment.
    let upstream = Upstream::builder()
        .tls(&b)
        .alpn(&[b"http/1.1"])
        .handler(|_| async {
            let mut response = json(StatusCode::OK, json!({ "ok": true }));
            let close = http::HeaderValue::from_static("close");
            response
                .headers_mut()
                .insert(http::header::CONNECTION, close);
            response
        })
        .start()
        .await;
    // The proxy trusts CA A, from a file re-read every 50 ms.
    let config = ProxyConfig::new(&upstream.url(BASE), &a)
        .set("IDMATCH_CREDENTIALS_RELOAD_INTERVAL", "50ms");
    let proxy = Proxy::start(&config).await;
    let client = http1();
    let url = proxy.url("/sim-swap");
    let failures = "idmatch_proxy_upstream_ca_reloads_total{outcome=\"failure\"}";
    let successes = "idmatch_proxy_upstream_ca_reloads_total{outcome=\"success\"}";

    let answer = send(&client, get(&url)).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json()["error"]["code"], "tls_certificate_error");
    assert_eq!(upstream.request_count(), 0);

    replace(&config.ca_file(), b.ca_pem());
    let mut lines = wait_for_log(&mut logs, "upstream CA file reloaded").await;
    for _ in 0..3 {
        assert_eq!(send(&client, get(&url)).await.status, StatusCode::OK);
    }
    assert_eq!(
        upstream.tls_handshakes_completed(),
        3,
        "a new connection each"
    );
    assert_eq!(scrape(proxy.admin, successes).await, 1.0);

    // Unusable: reported once, however many checks see it; new connections still trust B.
    replace(&config.ca_file(), "not a certificate\n");
    lines.extend(wait_for_log(&mut logs, "upstream CA file reload failed").await);
    let problem = format!("{} holds no certificate", config.ca_file().display());
    assert!(lines.last().unwrap().contains(&problem), "{lines:?}");
    for _ in 0..3 {
        assert_eq!(send(&client, get(&url)).await.status, StatusCode::OK);
    }
    assert_eq!(upstream.tls_handshakes_completed(), 6);

    // Back to A alone: new connections no longer trust the upstream.
    replace(&config.ca_file(), a.ca_pem());
    lines.extend(wait_for_log(&mut logs, "upstream CA file reloaded").await);
    let answer = send(&client, get(&url)).await;
    assert_eq!(answer.json()["error"]["code"], "tls_certificate_error");
    assert_eq!(upstream.request_count(), 6);
    assert_eq!(scrape(proxy.admin, failures).await, 1.0);
    assert_eq!(scrape(proxy.admin, successes).await, 2.0);
    let reported = lines.iter().filter(|l| l.contains("reload failed")).count();
    assert_eq!(reported, 1, "{lines:?}");
}
