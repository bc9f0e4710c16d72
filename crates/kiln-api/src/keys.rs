//! Who an API key belongs to, remembered for a few seconds: every authenticated request asks,
//! and a status poll is otherwise two reads where one would do. Only the account's id and
//! admin flag are relied on from here (`GET /v1/account` reads the account afresh, and every
//! ledger operation locks its own row), and neither changes over an account's life.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_ledger::Account;

/// How long an answer is reused.
const TTL: Duration = Duration::from_secs(5);
/// Keys remembered at most; past it, the table starts over.
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    known: Mutex<HashMap<String, (Account, Instant)>>,
}

impl KeyCache {
    pub(crate) fn get(&self, key: &str, now: Instant) -> Option<Account> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known
            .get(key)
            .filter(|(_, at)| now.duration_since(*at) < TTL)
            .map(|(a, _)| a.clone())
    }

    /// Remembers `key`'s account (unknown keys are not remembered: a new account's key works
    /// at once).
    pub(crate) fn put(&self, key: &str, account: &Account, now: Instant) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_KEYS {
            known.clear();
        }
        known.insert(key.to_owned(), (account.clone(), now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            id: kiln_core::AccountId::new(),
            email: None,
            plan: kiln_core::PlanId::Discover,
            is_admin: false,
            monthly_allowance: None,
            cycle_anchor: kiln_core::Timestamp::from_millis(0),
            created_at: kiln_core::Timestamp::from_millis(0),
        }
    }

    #[test]
    fn answers_for_its_ttl_then_asks_again() {
        let (cache, t0, a) = (KeyCache::default(), Instant::now(), account());
        assert_eq!(cache.get("k", t0), None);
        cache.put("k", &a, t0);
        assert_eq!(cache.get("k", t0 + TTL / 2), Some(a.clone()));
        assert_eq!(cache.get("other", t0), None);
        assert_eq!(cache.get("k", t0 + TTL), None, "stale after the TTL");
    }

    #[test]
    fn starts_over_when_full() {
        let (cache, t0, a) = (KeyCache::default(), Instant::now(), account());
        for i in 0..MAX_KEYS {
            cache.put(&format!("k{i}"), &a, t0);
        }
        cache.put("last", &a, t0);
        assert_eq!(cache.get("k0", t0), None);
        assert_eq!(cache.get("last", t0), Some(a));
    }
}
