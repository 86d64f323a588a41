//! A development and test stand-in for CM.com's Mobile Identity API and Verification service.
//!
//! # Layout
//!
//! - [`pki`]: a runtime-generated CA and server certificate ([`TestPki`]).
//! - [`server`]: a generic TLS or plain HTTP/1.1 + HTTP/2 server for tests that records what it
//!   receives ([`Server`], [`RunningServer`], [`Handler`]).
//! - [`api`]: the two APIs themselves, as CM.com documents them: verifying bearer tokens and
//!   answering from CM's sandbox data set ([`MockApi`]), served by the `mock-upstream` binary.
//! - [`demo`]: the mock and two proxies in one process, one request per endpoint (`demo`).
//! - [`http1`]: reading responses off a raw socket, for the load tools.
//! - [`train`]: the training run of idmatch-proxy's profile-guided build (`pgo-train`).

#![forbid(unsafe_code)]

pub mod api;
pub mod demo;
pub mod http1;
pub mod pki;
pub mod server;
pub mod train;

pub use api::MockApi;
pub use pki::TestPki;
pub use server::{Handler, Recorded, RunningServer, Server};
