//! Tokens: the HS256 signer and the shared, self-refreshing cache.

mod cache;
mod jwt;

pub use cache::{claims_at, Clock, MintCounts, SystemClock, TokenCache};
pub use jwt::{Claims, Signer};
