//! The shared schedule: one Redis (or Valkey) key per credential holding its next free slot,
//! read and moved by one server-side script per reservation, on the store's clock (`TIME`), so
//! that the replicas' own clocks never decide the spacing.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use sha2::{Digest, Sha256};

use crate::config;

/// Every operation on a credential's key in one script, so that each is atomic and one round
/// trip. Times are microseconds on the server's clock; the key expires once its slot is long
/// past, so an idle credential leaves nothing behind.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local next = tonumber(redis.call('GET', KEYS[1])) or 0
local op = ARGV[1]
local function store(value)
  redis.call('SET', KEYS[1], string.format('%.0f', value), 'PX',
    math.floor(math.max(value - now, 0) / 1000) + 60000)
end
if op == 'reserve' then
  local interval, max_wait = tonumber(ARGV[2]), tonumber(ARGV[3])
  local slot = math.max(next, now)
  if slot - now > max_wait then return {0, slot - now, next} end
  store(slot + interval)
  return {1, slot - now, slot + interval}
elseif op == 'release' then
  local interval, mine = tonumber(ARGV[2]), tonumber(ARGV[3])
  if next ~= mine then return {0, 0, next} end
  store(mine - interval)
  return {1, 0, mine - interval}
elseif op == 'push' then
  local by = tonumber(ARGV[2])
  if next > now then next = next + by end
  next = math.max(next, now + by)
  store(next)
  return {1, 0, next}
end
return redis.error_reply('unknown operation')
";

/// What the store answered to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Reserved: send after `wait`; `next` identifies the reservation for a give-back.
    Reserved { wait: Duration, next: u64 },
    /// Nothing reserved: the slot would have been `wait` away.
    TooFar { wait: Duration },
}

/// One credential's key in the store. Public for `benches/micro.rs`, which measures how many
/// reservations a store sustains.
pub struct Store {
    connection: ConnectionManager,
    script: Script,
    /// Replaced when the key id is rotated: a new credential has a budget of its own.
    key: ArcSwap<String>,
    interval_us: u64,
}

impl Store {
    /// Connects lazily: an unreachable store at start is not an error, only the first
    /// reservation finds out.
    pub fn new(
        settings: &config::Redis,
        key_id: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Self, RedisError> {
        let client = match &settings.ca {
            Some((_, pem)) => {
                let roots = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                };
                redis::Client::build_with_tls(settings.connection.clone(), roots)?
            }
            None => redis::Client::open(settings.connection.clone())?,
        };
        // Our own timeout bounds each reservation; these bound what the manager does behind it.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        Ok(Self {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            script: Script::new(SCRIPT),
            key: ArcSwap::from_pointee(key_for(key_id)),
            interval_us: micros(interval),
        })
    }

    pub async fn reserve(&self, max_wait: Duration) -> Result<Answer, RedisError> {
        let (reserved, wait, next): (u8, u64, u64) = self
            .script
            .key(self.key.load().as_str())
            .arg("reserve")
            .arg(self.interval_us)
            .arg(micros(max_wait))
            .invoke_async(&mut self.connection.clone())
            .await?;
        let wait = Duration::from_micros(wait);
        Ok(match reserved {
            1 => Answer::Reserved { wait, next },
            _ => Answer::TooFar { wait },
        })
    }

    /// Gives a reservation back if it is still the last one; returns whether it was.
    pub async fn release(&self, next: u64) -> Result<bool, RedisError> {
        let (released, _, _): (u8, u64, u64) = self
            .script
            .key(self.key.load().as_str())
            .arg("release")
            .arg(self.interval_us)
            .arg(next)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(released == 1)
    }

    /// Nothing is to be sent with the credential before `by` from now, by any replica.
    pub async fn push_back(&self, by: Duration) -> Result<(), RedisError> {
        let _: (u8, u64, u64) = self
            .script
            .key(self.key.load().as_str())
            .arg("push")
            .arg(micros(by))
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    /// Reserves in `key_id`'s budget from now on.
    pub fn set_key_id(&self, key_id: &str) {
        self.key.store(Arc::new(key_for(key_id)));
    }

    /// Whether the store answers at all.
    pub async fn ping(&self) -> Result<(), RedisError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.connection.clone())
            .await
    }
}

/// The credential's key: a hash of the key id, so that sidecars fronting different services
/// with one credential share one budget, and the key id itself is not spelled out in the store.
pub fn key_for(key_id: &str) -> String {
    let digest = Sha256::digest(key_id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("idmatch-proxy:pace:{hex}")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_a_truncated_sha256_of_the_key_id() {
        // printf %s kid-1 | sha256sum | cut -c1-32
        assert_eq!(
            key_for("kid-1"),
            "idmatch-proxy:pace:db26d710b41ea1dcfddfb68fa7b7b441"
        );
        assert_ne!(key_for("kid-1"), key_for("kid-2"));
    }
}
