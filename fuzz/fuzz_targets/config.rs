//! Any config file text and environment through `Config::from_parts`: no panic, and every
//! error is one printable line without the secret.

#![no_main]

use std::collections::HashMap;
use std::path::Path;

use idmatch_proxy::config::Config;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-s3cret-0c9d2e7a41b6";

const KEYS: [&str; 19] = [
    "IDMATCH_LISTEN",
    "IDMATCH_UPSTREAM_URL",
    "IDMATCH_UPSTREAM_ALLOW_INSECURE_HTTP",
    "IDMATCH_UPSTREAM_PROXY",
    "IDMATCH_UPSTREAM_NO_PROXY",
    "IDMATCH_UPSTREAM_CONNECT_TIMEOUT",
    "IDMATCH_UPSTREAM_REPLAY_BUFFER_BYTES",
    "IDMATCH_KEY_ID",
    "IDMATCH_TOKEN_LIFETIME",
    "IDMATCH_TOKEN_REFRESH_BEFORE",
    "IDMATCH_TOKEN_MARGIN",
    "IDMATCH_TOKEN_BACKDATE",
    "IDMATCH_CLIENT_MAX_HEADER_BYTES",
    "IDMATCH_WORKER_THREADS",
    "IDMATCH_LOG_FORMAT",
    "HTTPS_PROXY",
    "IDMATCH_UPSTREAM_CA_FILE",
    "IDMATCH_KEY_ID_FILE",
    "IDMATCH_SECRET_FILE",
];

fuzz_target!(|input: (Option<&str>, Vec<(u8, &str)>, bool)| {
    let (file, pairs, secret_in_file) = input;
    // Paths the parser would open: a device or a FIFO could block the run. Every other path
    // names a missing file.
    let texts = file.into_iter().chain(pairs.iter().map(|(_, v)| *v));
    if texts
        .clone()
        .any(|t| t.contains("/dev") || t.contains("/proc") || t.contains("/sys"))
    {
        return;
    }
    let mut env = pairs
        .iter()
        .map(|(k, v)| (KEYS[*k as usize % KEYS.len()].to_owned(), (*v).to_owned()))
        .collect::<HashMap<_, _>>();
    let mut text = file.unwrap_or_default().to_owned();
    if secret_in_file {
        text = format!("[credentials]\nsecret = \"{SECRET}\"\n{text}");
    } else {
        env.insert("IDMATCH_SECRET".into(), SECRET.into());
    }
    let path = Path::new("/etc/idmatch/idmatch-proxy.toml");
    let source = (!text.is_empty()).then_some((path, text.as_str()));
    match Config::from_parts(source, &env) {
        Ok(loaded) => assert!(!loaded.render().contains(SECRET)),
        Err(error) => {
            let message = error.to_string();
            assert!(!message.contains(SECRET), "{message}");
            assert!(!message.contains(char::is_control), "{message:?}");
        }
    }
});
