//! A development and test stand-in for CM.com's Mobile Identity API.
//!
//! # Layout
//!
//! - [`pki`]: a runtime-generated CA and server certificate ([`TestPki`]).
//! - [`server`]: a generic TLS or plain HTTP/1.1 + HTTP/2 server for tests that records what it
//!   receives ([`Server`], [`RunningServer`], [`Handler`]).
//! - [`api`]: the Mobile Identity API itself, verifying bearer tokens and answering from a fixed
//!   sandbox data set ([`MockApi`]), served by the `mock-upstream` binary.
//! - [`http1`]: reading responses off a raw socket, for the load tools.
//! - [`train`]: the training run of idmatch-proxy's profile-guided build (`pgo-train`).

#![forbid(unsafe_code)]

pub mod api;
pub mod http1;
pub mod pki;
pub mod server;
pub mod train;

pub use api::MockApi;
pub use pki::TestPki;
pub use server::{Handler, Recorded, RunningServer, Server};
