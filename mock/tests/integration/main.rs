//! Integration tests: real sockets on 127.0.0.1, a real TLS client.

#![forbid(unsafe_code)]

mod api;
mod bin;
mod demo;
mod rate_limit;
mod server;
mod support;
mod verification;
