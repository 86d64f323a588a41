//! Credential rotation without a restart.
//!
//! Kubernetes mounts a Secret as a directory of symlinks (`secret -> ..data/secret`,
//! `..data -> ..2024_01_01_00_00_00.123/`) and updates it by renaming a new `..data` over the old
//! one. The files named in the settings never change in place, so a watch on them never fires;
//! instead [`Reloader`] reads them again every `credentials.reload_interval` and compares their
//! contents with the credentials in use. Contents decide, not metadata: a rewrite of the same
//! size within the same second is still a change.
//!
//! A change is applied at once: the next token is minted with the new credentials. A file that
//! cannot be used (missing, empty, not UTF-8, too large) keeps the credentials in use; the
//! problem is logged and counted once, not at every check.
//!
//! [`CaReloader`] does the same for `upstream.ca_file`, on the same interval: a changed bundle
//! is trusted by the next connection to the upstream; one that cannot be used keeps the roots
//! in use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

use crate::callback::verify::Verifier;
use crate::config::{
    parse_certificates, read_ca_file, read_credential, Credentials, Secret, Upstream,
};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::pace::Pacer;
use crate::token::{Signer, TokenCache};
use crate::upstream::Trust;

/// Reads per check while the key id keeps changing as the secret is read. One rename replaces
/// both files, so the second read agrees.
const CONSISTENT_READ_ATTEMPTS: usize = 3;

/// Re-reads the credential files and hands changed credentials to the token cache.
pub struct Reloader {
    key_id_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    interval: Duration,
    /// What the token cache signs with now.
    key_id: String,
    secret: Secret,
    /// The last problem reported, so that a file that stays broken is reported once.
    failure: Option<String>,
    tokens: Arc<TokenCache>,
    /// The callback listener's, which must follow the secret the tokens are signed with.
    callbacks: Option<Arc<Verifier>>,
    metrics: Arc<Metrics>,
    /// Told a new key id: the shared rate limit is kept per credential.
    pacer: Option<Arc<Pacer>>,
}

/// What one [`Reloader::check`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Nothing to apply.
    Unchanged,
    /// New credentials are in use.
    Reloaded,
    /// A file could not be used; the credentials in use are kept.
    Failed,
}

impl Reloader {
    /// `tokens` must be signing with `credentials` as loaded. `None` when neither the key id nor
    /// the secret came from a file: then nothing can change.
    pub fn new(
        credentials: &Credentials,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        if credentials.key_id_file.is_none() && credentials.secret_file.is_none() {
            return None;
        }
        Some(Self {
            key_id_file: credentials.key_id_file.clone(),
            secret_file: credentials.secret_file.clone(),
            interval: credentials.reload_interval,
            key_id: credentials.key_id.clone(),
            secret: credentials.secret.clone(),
            failure: None,
            tokens,
            callbacks: None,
            metrics,
            pacer: None,
        })
    }

    /// Also tells `pacer` when the key id changes.
    pub fn pacing(self, pacer: Option<Arc<Pacer>>) -> Self {
        Self { pacer, ..self }
    }

    /// Hands a changed secret to the callbacks' `verifier` too.
    pub fn also_rotating(mut self, verifier: Arc<Verifier>) -> Self {
        self.callbacks = Some(verifier);
        self
    }

    /// Checks every `reload_interval`, forever: spawn it next to the server.
    pub async fn run(mut self) {
        // Blocking reads, but of at most 64 KiB from a tmpfs: cheaper than a trip to the
        // blocking pool.
        every(self.interval, || {
            self.check();
        })
        .await
    }

    /// Reads the files once and applies what changed.
    pub fn check(&mut self) -> Check {
        let (key_id, secret) = match self.read() {
            Ok(Some(read)) => read,
            Ok(None) => {
                tracing::debug!("credential files changed while being read; next check retries");
                return Check::Unchanged;
            }
            Err(problem) => return self.fail(problem),
        };
        let recovered = self.failure.take().is_some();
        let key_id_changed = key_id != self.key_id;
        let secret_changed = secret.expose() != self.secret.expose();
        if !key_id_changed && !secret_changed {
            if recovered {
                tracing::info!("credential files are usable again; the credentials are unchanged");
            }
            return Check::Unchanged;
        }

        self.tokens
            .replace_signer(Signer::new(&key_id, secret.expose()));
        if let (true, Some(pacer)) = (key_id_changed, &self.pacer) {
            pacer.key_id_changed(&key_id);
        }
        if let Some(verifier) = self.callbacks.as_ref().filter(|_| secret_changed) {
            verifier.rotate(secret.expose());
        }
        self.count("success");
        // The key id is public (it is in every token's header); the secret is never logged.
        tracing::info!(
            %key_id,
            key_id_changed,
            secret_changed,
            "credentials reloaded; tokens are now signed with them"
        );
        self.key_id = key_id;
        self.secret = secret;
        Check::Reloaded
    }

    /// Both credentials as the files hold them now, or `None` if they kept changing while read.
    fn read(&self) -> Result<Option<(String, Secret)>, String> {
        for _ in 0..CONSISTENT_READ_ATTEMPTS {
            let key_id = self.read_key_id()?;
            let secret = self.read_secret()?;
            // Files from one Secret change together. Had the key id changed while the secret was
            // read, the pair could mix two versions: a key id with the other version's secret.
            let paired = self.key_id_file.is_some() && self.secret_file.is_some();
            if !paired || self.read_key_id()? == key_id {
                return Ok(Some((key_id, secret)));
            }
        }
        Ok(None)
    }

    fn read_key_id(&self) -> Result<String, String> {
        match &self.key_id_file {
            Some(file) => read_credential(file)
                .map(|bytes| String::from_utf8(bytes).expect("read_credential checks UTF-8")),
            None => Ok(self.key_id.clone()),
        }
    }

    fn read_secret(&self) -> Result<Secret, String> {
        match &self.secret_file {
            Some(file) => read_credential(file).map(Secret::new),
            None => Ok(self.secret.clone()),
        }
    }

    fn fail(&mut self, problem: String) -> Check {
        if self.failure.as_ref() != Some(&problem) {
            // `problem` names the file and what is wrong with it, never its contents.
            tracing::error!(
                error = %problem,
                "credential reload failed; keeping the credentials in use"
            );
            self.count("failure");
            self.failure = Some(problem);
        }
        Check::Failed
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .credential_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Runs `check` every `interval`, forever.
async fn every(interval: Duration, mut check: impl FnMut()) {
    loop {
        tokio::time::sleep(interval).await;
        check();
    }
}

/// Re-reads `upstream.ca_file` every `credentials.reload_interval` and hands a changed bundle to
/// the upstream's [`Trust`]: connections opened after it verify against the new roots, those
/// already open keep going (they were verified when opened).
pub struct CaReloader {
    file: PathBuf,
    interval: Duration,
    /// What new connections trust now, besides `upstream.roots`.
    in_use: Vec<CertificateDer<'static>>,
    /// The file's bytes when they last gave `in_use`; empty until the first check.
    seen: Vec<u8>,
    trust: Trust,
    /// The last problem reported, so that a file that stays broken is reported once.
    failure: Option<String>,
    metrics: Arc<Metrics>,
}

impl CaReloader {
    /// `trust` must be trusting `upstream` as loaded. `None` without `upstream.ca_file`.
    pub fn new(
        upstream: &Upstream,
        interval: Duration,
        trust: Trust,
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        Some(Self {
            file: upstream.ca_file.clone()?,
            interval,
            in_use: upstream.extra_roots.clone(),
            seen: Vec::new(),
            trust,
            failure: None,
            metrics,
        })
    }

    /// Checks every `interval`, forever: spawn it next to the server.
    pub async fn run(mut self) {
        // A bundle is at most a few hundred KiB, usually from a tmpfs, as the credentials.
        every(self.interval, || {
            self.check();
        })
        .await
    }

    /// Reads the file once and applies it if its certificates changed.
    pub fn check(&mut self) -> Check {
        let pem = match read_ca_file(&self.file) {
            Ok(pem) => pem,
            Err(problem) => return self.fail(problem),
        };
        // Parsing and checking a whole public bundle every second would be wasted on bytes
        // already seen: most checks stop at this comparison.
        if pem != self.seen {
            let certificates = match parse_certificates(&self.file, &pem) {
                Ok(certificates) => certificates,
                Err(problem) => return self.fail(problem),
            };
            if certificates != self.in_use {
                if let Err(error) = self.trust.replace_extra_roots(&certificates) {
                    return self.fail(error.to_string());
                }
                self.failure = None;
                self.count("success");
                tracing::info!(
                    file = %self.file.display(),
                    certificates = certificates.len(),
                    "upstream CA file reloaded; new upstream connections trust it"
                );
                (self.in_use, self.seen) = (certificates, pem);
                return Check::Reloaded;
            }
            self.seen = pem;
        }
        if self.failure.take().is_some() {
            tracing::info!(file = %self.file.display(), "upstream CA file usable again; unchanged");
        }
        Check::Unchanged
    }

    fn fail(&mut self, problem: String) -> Check {
        if self.failure.as_ref() != Some(&problem) {
            tracing::error!(
                error = %problem,
                "upstream CA file reload failed; keeping the roots in use"
            );
            self.count("failure");
            self.failure = Some(problem);
        }
        Check::Failed
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .ca_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};

    use crate::config::TokenSettings;
    use crate::token::SystemClock;

    const KID_1: &str = "kid-one";
    const KID_2: &str = "kid-two";
    // The same length: a rewrite that no size check would notice.
    const SECRET_1: &str = "first-secret-AC4Etykn7jusGR5FwLDA";
    const SECRET_2: &str = "other-secret-tILtQbiQbTMKedP31szX";

    struct Fixture {
        dir: tempfile::TempDir,
        tokens: Arc<TokenCache>,
        metrics: Arc<Metrics>,
        reloader: Reloader,
    }

    impl Fixture {
        /// Credentials loaded from `key-id` (when `key_id_file`) and `secret` (when
        /// `secret_file`) files holding KID_1 and SECRET_1; the others as if given inline.
        fn new(key_id_file: bool, secret_file: bool) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let file = |name: &str, contents: &str, wanted: bool| {
                wanted.then(|| {
                    let path = dir.path().join(name);
                    fs::write(&path, format!("{contents}\n")).unwrap();
                    path
                })
            };
            let credentials = Credentials {
                key_id: KID_1.into(),
                secret: Secret::new(SECRET_1.as_bytes()),
                key_id_file: file("key-id", KID_1, key_id_file),
                secret_file: file("secret", SECRET_1, secret_file),
                reload_interval: Duration::from_secs(1),
            };
            let tokens = Arc::new(TokenCache::new(
                Signer::new(KID_1, SECRET_1.as_bytes()),
                TokenSettings::default(),
                Arc::new(SystemClock),
            ));
            let metrics = Arc::new(Metrics::new());
            let reloader = Reloader::new(&credentials, tokens.clone(), metrics.clone()).unwrap();
            Self {
                dir,
                tokens,
                metrics,
                reloader,
            }
        }

        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, contents: impl AsRef<[u8]>) {
            fs::write(self.path(name), contents).unwrap();
        }

        fn reloads(&self, outcome: &'static str) -> u64 {
            self.metrics
                .credential_reloads
                .get_or_create(&OutcomeLabels { outcome })
                .get()
        }

        fn rotations(&self) -> u64 {
            self.tokens.mint_counts().rotation
        }

        /// Asserts that the cached token carries `kid` and is signed with `secret`.
        fn assert_signed_with(&self, kid: &str, secret: &str) {
            let authorization = self.tokens.authorization();
            let token = authorization
                .to_str()
                .unwrap()
                .strip_prefix("Bearer ")
                .unwrap();
            assert_eq!(decode_header(token).unwrap().kid.as_deref(), Some(kid));
            let mut validation = Validation::new(Algorithm::HS256);
            validation.validate_exp = false;
            validation.required_spec_claims.clear();
            decode::<serde_json::Value>(
                token,
                &DecodingKey::from_secret(secret.as_bytes()),
                &validation,
            )
            .unwrap_or_else(|e| panic!("not signed with the expected secret: {e}"));
        }
    }

    #[test]
    fn inline_credentials_need_no_reloader() {
        let fixture = Fixture::new(false, true);
        let credentials = Credentials {
            key_id: KID_1.into(),
            secret: Secret::new(SECRET_1.as_bytes()),
            key_id_file: None,
            secret_file: None,
            reload_interval: Duration::from_secs(1),
        };
        assert!(Reloader::new(&credentials, fixture.tokens, fixture.metrics).is_none());
    }

    #[test]
    fn unchanged_files_change_nothing() {
        let mut fixture = Fixture::new(true, true);
        let before = fixture.tokens.authorization();
        for _ in 0..3 {
            assert_eq!(fixture.reloader.check(), Check::Unchanged);
        }
        // Rewritten with the same contents (a new mtime, the same bytes).
        fixture.write("secret", format!("{SECRET_1}\n"));
        assert_eq!(fixture.reloader.check(), Check::Unchanged);
        assert_eq!(fixture.tokens.authorization(), before);
        assert_eq!(fixture.rotations(), 0);
        assert_eq!(
            (fixture.reloads("success"), fixture.reloads("failure")),
            (0, 0)
        );
    }

    #[test]
    fn a_new_secret_signs_the_next_token() {
        let mut fixture = Fixture::new(true, true);
        fixture.write("secret", SECRET_2);
        assert_eq!(fixture.reloader.check(), Check::Reloaded);
        fixture.assert_signed_with(KID_1, SECRET_2);
        assert_eq!(fixture.rotations(), 1);
        assert_eq!(fixture.reloads("success"), 1);

        assert_eq!(fixture.reloader.check(), Check::Unchanged);
        assert_eq!(fixture.rotations(), 1);
    }

    #[test]
    fn key_id_and_secret_changed_together_are_applied_together() {
        let mut fixture = Fixture::new(true, true);
        fixture.write("key-id", KID_2);
        fixture.write("secret", SECRET_2);
        assert_eq!(fixture.reloader.check(), Check::Reloaded);
        fixture.assert_signed_with(KID_2, SECRET_2);
        assert_eq!(fixture.rotations(), 1);
        assert_eq!(fixture.reloads("success"), 1);
    }

    #[test]
    fn a_key_id_file_alone_keeps_the_inline_secret() {
        let mut fixture = Fixture::new(true, false);
        fixture.write("key-id", KID_2);
        assert_eq!(fixture.reloader.check(), Check::Reloaded);
        fixture.assert_signed_with(KID_2, SECRET_1);
    }

    #[test]
    fn an_unusable_file_keeps_the_credentials_and_is_counted_once() {
        let mut fixture = Fixture::new(true, true);
        let before = fixture.tokens.authorization();
        let secret = fixture.path("secret");
        let shown = secret.display();
        let too_large = vec![b'x'; 64 * 1024 + 1];
        // The new contents (`None`: removed), the problem, and the failures counted so far.
        let cases = [
            (Some(&b""[..]), format!("{shown} is empty"), 1),
            // The same problem again: not counted again.
            (Some(&b"\n"[..]), format!("{shown} is empty"), 1),
            (
                Some(&b"\xff\xfe"[..]),
                format!("{shown} is not valid UTF-8"),
                2,
            ),
            (
                Some(&too_large[..]),
                format!("{shown} is larger than 65536 bytes"),
                3,
            ),
            (
                None,
                format!("cannot read {shown}: No such file or directory (os error 2)"),
                4,
            ),
        ];
        for (contents, problem, failures) in cases {
            match contents {
                Some(contents) => fixture.write("secret", contents),
                None => fs::remove_file(&secret).unwrap(),
            }
            for _ in 0..3 {
                assert_eq!(fixture.reloader.check(), Check::Failed, "{problem}");
            }
            assert_eq!(fixture.reloader.failure.as_ref(), Some(&problem));
            assert_eq!(fixture.reloads("failure"), failures, "{problem}");
        }
        assert_eq!(fixture.tokens.authorization(), before);
        fixture.assert_signed_with(KID_1, SECRET_1);
        assert_eq!(fixture.rotations(), 0);
        assert_eq!(fixture.reloads("success"), 0);
    }

    #[test]
    fn a_repaired_file_is_used_and_a_new_failure_reported_again() {
        let mut fixture = Fixture::new(true, true);
        fixture.write("secret", "");
        assert_eq!(fixture.reloader.check(), Check::Failed);

        fixture.write("secret", SECRET_2);
        assert_eq!(fixture.reloader.check(), Check::Reloaded);
        fixture.assert_signed_with(KID_1, SECRET_2);
        assert_eq!(fixture.reloads("success"), 1);

        // The same problem as before, but a new occurrence.
        fixture.write("secret", "");
        assert_eq!(fixture.reloader.check(), Check::Failed);
        assert_eq!(fixture.reloads("failure"), 2);

        // Repaired with the contents in use: nothing to apply, but the next failure counts.
        fixture.write("secret", SECRET_2);
        assert_eq!(fixture.reloader.check(), Check::Unchanged);
        fixture.write("secret", "");
        assert_eq!(fixture.reloader.check(), Check::Failed);
        assert_eq!(fixture.reloads("failure"), 3);
        assert_eq!(fixture.rotations(), 1);
    }

    #[test]
    fn a_broken_key_id_file_keeps_the_secret_too() {
        let mut fixture = Fixture::new(true, true);
        fixture.write("key-id", "");
        fixture.write("secret", SECRET_2);
        assert_eq!(fixture.reloader.check(), Check::Failed);
        fixture.assert_signed_with(KID_1, SECRET_1);
        assert_eq!(fixture.rotations(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn run_checks_every_interval() {
        let Fixture {
            dir,
            tokens,
            reloader,
            ..
        } = Fixture::new(true, true);
        let interval = reloader.interval;
        let tick = Duration::from_millis(1);
        let task = tokio::spawn(reloader.run());
        fs::write(dir.path().join("secret"), SECRET_2).unwrap();

        // Paused time: each sleep lets the reloader's own timer fire first, if it is due.
        tokio::time::sleep(interval - tick).await;
        assert_eq!(tokens.mint_counts().rotation, 0);
        tokio::time::sleep(tick * 2).await;
        assert_eq!(tokens.mint_counts().rotation, 1);

        fs::write(dir.path().join("key-id"), KID_2).unwrap();
        tokio::time::sleep(interval).await;
        assert_eq!(tokens.mint_counts().rotation, 2);
        task.abort();
    }

    mod ca_file {
        use super::*;
        use std::collections::HashMap;

        use idmatch_mock::TestPki;

        use crate::config::Config;

        struct Fixture {
            dir: tempfile::TempDir,
            metrics: Arc<Metrics>,
            reloader: CaReloader,
        }

        impl Fixture {
            /// A proxy's configuration trusting `first`'s CA from `ca.pem`.
            fn new(first: &TestPki) -> Self {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("ca.pem");
                first.write_ca(&file).unwrap();
                let env = HashMap::from(
                    [
                        ("IDMATCH_KEY_ID", "kid"),
                        ("IDMATCH_SECRET", SECRET_1),
                        ("IDMATCH_UPSTREAM_CA_FILE", file.to_str().unwrap()),
                    ]
                    .map(|(k, v)| (k.to_owned(), v.to_owned())),
                );
                let upstream = Config::from_parts(None, &env).unwrap().config.upstream;
                let trust = crate::upstream::Trust::new(&upstream).unwrap();
                let metrics = Arc::new(Metrics::new());
                let interval = Duration::from_secs(1);
                let reloader =
                    CaReloader::new(&upstream, interval, trust, metrics.clone()).unwrap();
                Self {
                    dir,
                    metrics,
                    reloader,
                }
            }

            fn write(&self, contents: impl AsRef<[u8]>) {
                fs::write(self.dir.path().join("ca.pem"), contents).unwrap();
            }

            fn reloads(&self, outcome: &'static str) -> u64 {
                self.metrics
                    .ca_reloads
                    .get_or_create(&OutcomeLabels { outcome })
                    .get()
            }
        }

        #[test]
        fn a_changed_bundle_is_applied_once() {
            let (a, b) = (TestPki::localhost(), TestPki::localhost());
            let mut fixture = Fixture::new(&a);
            assert_eq!(fixture.reloader.check(), Check::Unchanged);
            // Rewritten with the same certificate, comments aside: nothing to apply.
            fixture.write(format!("# the same CA\n{}", a.ca_pem()));
            assert_eq!(fixture.reloader.check(), Check::Unchanged);

            fixture.write(b.ca_pem());
            assert_eq!(fixture.reloader.check(), Check::Reloaded);
            assert_eq!(fixture.reloader.in_use, [b.ca_der()]);
            assert_eq!(fixture.reloader.check(), Check::Unchanged);
            fixture.write(format!("{}{}", a.ca_pem(), b.ca_pem()));
            assert_eq!(fixture.reloader.check(), Check::Reloaded);
            assert_eq!(fixture.reloader.in_use, [a.ca_der(), b.ca_der()]);
            assert_eq!(
                (fixture.reloads("success"), fixture.reloads("failure")),
                (2, 0)
            );
        }

        #[test]
        fn an_unusable_bundle_keeps_the_roots_and_is_counted_once() {
            let (a, b) = (TestPki::localhost(), TestPki::localhost());
            let mut fixture = Fixture::new(&a);
            let shown = fixture.dir.path().join("ca.pem").display().to_string();
            // The new contents (`None`: removed), the problem, and the failures counted so far.
            let cases = [
                (
                    Some("no PEM here\n"),
                    format!("{shown} holds no certificate"),
                    1,
                ),
                (
                    Some("-----BEGIN CERTIFICATE-----\nAQIDBA==\n"),
                    format!("{shown} is not valid PEM"),
                    2,
                ),
                (None, format!("cannot read {shown}"), 3),
            ];
            for (contents, problem, failures) in cases {
                match contents {
                    Some(contents) => fixture.write(contents),
                    None => fs::remove_file(fixture.dir.path().join("ca.pem")).unwrap(),
                }
                for _ in 0..3 {
                    assert_eq!(fixture.reloader.check(), Check::Failed, "{problem}");
                }
                let failure = fixture.reloader.failure.clone().unwrap();
                assert!(failure.starts_with(&problem), "{failure}");
                assert_eq!(fixture.reloads("failure"), failures, "{problem}");
            }
            assert_eq!(fixture.reloader.in_use, [a.ca_der()]);

            // Repaired with the bundle in use: nothing to apply, but the next failure counts.
            fixture.write(a.ca_pem());
            assert_eq!(fixture.reloader.check(), Check::Unchanged);
            fixture.write("");
            assert_eq!(fixture.reloader.check(), Check::Failed);
            assert_eq!(fixture.reloads("failure"), 4);
            fixture.write(b.ca_pem());
            assert_eq!(fixture.reloader.check(), Check::Reloaded);
            assert_eq!(fixture.reloads("success"), 1);
        }

        #[test]
        fn no_ca_file_needs_no_reloader() {
            let env = HashMap::from(
                [("IDMATCH_KEY_ID", "kid"), ("IDMATCH_SECRET", SECRET_1)]
                    .map(|(k, v)| (k.to_owned(), v.to_owned())),
            );
            let upstream = Config::from_parts(None, &env).unwrap().config.upstream;
            let trust = crate::upstream::Trust::new(&upstream).unwrap();
            let metrics = Arc::new(Metrics::new());
            assert!(CaReloader::new(&upstream, Duration::from_secs(1), trust, metrics).is_none());
        }
    }
}
