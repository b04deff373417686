//! Failed tunnel handshakes per peer IP, and the ban that follows.
//!
//! After `limit` failures (bad token, a refused claim, a malformed HELLO)
//! within `window`, an IP is banned: its connections are closed at accept,
//! before any TLS or HELLO work, for `ban`; each further ban of the same IP
//! doubles that, up to `max_ban`. The table is shared by all cores behind
//! one mutex, taken only when a tunnel connection arrives or fails (agents
//! connect rarely; frames never touch it), and holds at most
//! [`MAX_ENTRIES`] IPs: quiet entries are pruned first, and when only
//! active ones remain a new IP is not tracked (failing open, logged by the
//! caller) rather than evicting a banned one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StrikesConfig {
    /// Failures within `window` that start a ban; 0 turns bans off.
    pub limit: u32,
    pub window: Duration,
    pub ban: Duration,
    pub max_ban: Duration,
}

#[derive(Debug)]
struct Entry {
    fails: u32,
    window_start: Instant,
    banned_until: Option<Instant>,
    /// Bans so far: the next one lasts `ban * 2^bans`.
    bans: u32,
}

/// What a failure led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strike {
    Counted(u32),
    Banned(Duration),
    /// The table is full of active entries.
    Untracked,
}

pub struct Strikes {
    cfg: StrikesConfig,
    map: Mutex<HashMap<IpAddr, Entry>>,
}

impl Strikes {
    pub fn new(cfg: StrikesConfig) -> Strikes {
        Strikes {
            cfg,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// How much longer `ip` is banned, if it is.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.cfg.limit == 0 {
            return None;
        }
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let until = m.get(&ip)?.banned_until?;
        (until > now).then(|| until - now)
    }

    pub fn fail(&self, ip: IpAddr, now: Instant) -> Strike {
        if self.cfg.limit == 0 {
            return Strike::Counted(0);
        }
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(&ip) && m.len() >= MAX_ENTRIES {
            let cfg = self.cfg;
            m.retain(|_, e| !quiet(&cfg, e, now));
            if m.len() >= MAX_ENTRIES {
                return Strike::Untracked;
            }
        }
        let e = m.entry(ip).or_insert(Entry {
            fails: 0,
            window_start: now,
            banned_until: None,
            bans: 0,
        });
        if now.duration_since(e.window_start) > self.cfg.window {
            e.fails = 0;
            e.window_start = now;
        }
        e.fails += 1;
        if e.fails < self.cfg.limit {
            return Strike::Counted(e.fails);
        }
        let len = self
            .cfg
            .ban
            .saturating_mul(1u32 << e.bans.min(20))
            .min(self.cfg.max_ban);
        e.bans += 1;
        e.fails = 0;
        e.window_start = now;
        e.banned_until = Some(now + len);
        Strike::Banned(len)
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An entry that no longer affects anything: not banned, its window over,
/// and long enough after its last ban that forgetting the doubling is fair.
fn quiet(cfg: &StrikesConfig, e: &Entry, now: Instant) -> bool {
    let window_over = now.duration_since(e.window_start) > cfg.window;
    let ban_over = e
        .banned_until
        .map_or(true, |u| now > u && now.duration_since(u) > cfg.max_ban);
    window_over && ban_over
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StrikesConfig {
        StrikesConfig {
            limit: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(10),
            max_ban: Duration::from_secs(25),
        }
    }

    #[test]
    fn k_failures_ban_and_bans_grow_to_the_cap() {
        let s = Strikes::new(cfg());
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let t = Instant::now();
        assert_eq!(s.fail(ip, t), Strike::Counted(1));
        assert_eq!(s.fail(ip, t), Strike::Counted(2));
        assert_eq!(s.banned(ip, t), None);
        assert_eq!(s.fail(ip, t), Strike::Banned(Duration::from_secs(10)));
        assert_eq!(s.banned(ip, t), Some(Duration::from_secs(10)));
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert_eq!(s.banned(other, t), None);
        let t2 = t + Duration::from_secs(11);
        assert_eq!(s.banned(ip, t2), None);
        s.fail(ip, t2);
        s.fail(ip, t2);
        assert_eq!(s.fail(ip, t2), Strike::Banned(Duration::from_secs(20)));
        let t3 = t2 + Duration::from_secs(21);
        s.fail(ip, t3);
        s.fail(ip, t3);
        assert_eq!(s.fail(ip, t3), Strike::Banned(Duration::from_secs(25)));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let s = Strikes::new(cfg());
        let ip: IpAddr = "::1".parse().unwrap();
        let t = Instant::now();
        s.fail(ip, t);
        s.fail(ip, t);
        let later = t + Duration::from_secs(61);
        assert_eq!(s.fail(ip, later), Strike::Counted(1));
    }

    #[test]
    fn the_table_is_bounded() {
        let s = Strikes::new(cfg());
        let t = Instant::now();
        for i in 0..MAX_ENTRIES as u32 {
            s.fail(IpAddr::from(i.to_be_bytes()), t);
        }
        let new: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(s.fail(new, t), Strike::Untracked);
        // Once the old entries are quiet they make room.
        let later = t + Duration::from_secs(61);
        assert_eq!(s.fail(new, later), Strike::Counted(1));
        assert!(s.len() <= MAX_ENTRIES);
    }

    #[test]
    fn zero_limit_disables_bans() {
        let s = Strikes::new(StrikesConfig { limit: 0, ..cfg() });
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let t = Instant::now();
        for _ in 0..10 {
            s.fail(ip, t);
        }
        assert_eq!(s.banned(ip, t), None);
        assert!(s.is_empty());
    }
}
