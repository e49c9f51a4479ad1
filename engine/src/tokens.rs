//! Access tokens on a node: which secrets may connect, and what each may do.
//!
//! Tokens live in the metadata store (group 0, `Mutation::CreateToken` / `RevokeToken`):
//! only the SHA-256 of each secret, its [`TokenScope`], expiry (wall clock) and whether it
//! was revoked. Every node keeps a [`TokenRegistry`], reloaded from its own store copy
//! whenever the store's tokens epoch moves (polled once a second by the metadata
//! service), so revocations reach every node within about a second plus replication.
//! The admin token made by `hive init` (its hash is in hive.toml) is always an admin token.
//!
//! # Invariants
//! - A connection is authenticated by its first frame (`Hello`) and re-checked while it
//!   lives: the metadata port checks before every request and while idle, shard loops at
//!   least once a second and whenever the registry changes; a connection whose token was
//!   revoked or expired is closed.
//! - Secrets are never stored or logged; comparisons are of SHA-256 digests.

use hivefs_net::meta::{Answer, Query, TokenScope};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// Why a token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Revoked,
    Expired,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "token not accepted",
            Refusal::Revoked => "token revoked",
            Refusal::Expired => "token expired",
        }
    }
}

#[derive(Clone, Debug)]
struct Rec {
    scope: TokenScope,
    expires_ms: u64,
    revoked: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct TokenRegistry {
    admin: [u8; 32],
    /// The store's tokens epoch the table was loaded at (`u64::MAX`: never).
    loaded: AtomicU64,
    /// Raised by every reload (shards re-check their connections when it moves).
    version: AtomicU64,
    table: RwLock<HashMap<[u8; 32], Rec>>,
}

/// Milliseconds since the Unix epoch (token expiry is wall-clock time).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

impl TokenRegistry {
    /// A registry knowing only the admin token whose SHA-256 is `admin_sha256_hex`.
    pub fn new(admin_sha256_hex: &str) -> TokenRegistry {
        let mut admin = [0u8; 32];
        if let Ok(v) = hex::decode(admin_sha256_hex) {
            if v.len() == 32 {
                admin.copy_from_slice(&v);
            }
        }
        TokenRegistry {
            admin,
            loaded: AtomicU64::new(u64::MAX),
            version: AtomicU64::new(0),
            table: RwLock::new(HashMap::new()),
        }
    }

    /// Reload from `store` if its tokens epoch moved. Returns whether it did.
    pub fn refresh(&self, store: &crate::meta::store::MetaStore) -> anyhow::Result<bool> {
        let epoch = store.tokens_epoch()?;
        if self.loaded.load(Ordering::Acquire) == epoch {
            return Ok(false);
        }
        let Ok(Answer::Tokens(list)) = store.query(0, &Query::Tokens)? else {
            anyhow::bail!("the token table did not answer");
        };
        let table = list
            .into_iter()
            .map(|t| {
                (
                    t.sha256,
                    Rec {
                        scope: t.scope,
                        expires_ms: t.expires_ms,
                        revoked: t.revoked,
                    },
                )
            })
            .collect();
        *self.table.write().expect("token table") = table;
        self.loaded.store(epoch, Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// The scope of the token with this digest, or why it is refused (now).
    pub fn check_digest(&self, d: &[u8; 32]) -> Result<TokenScope, Refusal> {
        if constant_time_eq(d, &self.admin) {
            return Ok(TokenScope::Admin);
        }
        let t = self.table.read().expect("token table");
        let r = t.get(d).ok_or(Refusal::Unknown)?;
        if r.revoked {
            Err(Refusal::Revoked)
        } else if r.expires_ms != 0 && wall_ms() >= r.expires_ms {
            Err(Refusal::Expired)
        } else {
            Ok(r.scope.clone())
        }
    }

    /// [`check_digest`](Self::check_digest) of a secret.
    pub fn check(&self, token: &str) -> Result<(TokenScope, [u8; 32]), Refusal> {
        let d = digest(token);
        self.check_digest(&d).map(|s| (s, d))
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_and_unknown_tokens() {
        let admin = "s3cret";
        let r = TokenRegistry::new(&hex::encode(digest(admin)));
        assert_eq!(r.check(admin).unwrap().0, TokenScope::Admin);
        assert_eq!(
            r.check(" s3cret\n").unwrap().0,
            TokenScope::Admin,
            "trimmed"
        );
        assert_eq!(r.check("other").unwrap_err(), Refusal::Unknown);
        // A malformed admin hash admits nobody by accident.
        let r = TokenRegistry::new("zz");
        assert!(r.check("").is_err());
    }

    #[test]
    fn table_entries_expire_and_revoke() {
        let r = TokenRegistry::new(&"00".repeat(32));
        let (a, b, c) = (digest("a"), digest("b"), digest("c"));
        {
            let mut t = r.table.write().unwrap();
            t.insert(
                a,
                Rec {
                    scope: TokenScope::Host,
                    expires_ms: 0,
                    revoked: false,
                },
            );
            t.insert(
                b,
                Rec {
                    scope: TokenScope::Host,
                    expires_ms: 1,
                    revoked: false,
                },
            );
            t.insert(
                c,
                Rec {
                    scope: TokenScope::Host,
                    expires_ms: 0,
                    revoked: true,
                },
            );
        }
        assert_eq!(r.check("a").unwrap().0, TokenScope::Host);
        assert_eq!(r.check("b").unwrap_err(), Refusal::Expired);
        assert_eq!(r.check("c").unwrap_err(), Refusal::Revoked);
    }
}
