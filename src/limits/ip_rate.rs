//! Per-client-IP request rate within a session (`--rate-per-ip`, a token
//! rule's `rate_per_ip`): one GCRA cell per (session, client IP), shared
//! by every core like the session's own cell (`rate.rs`), so the count is
//! exact across cores although SO_REUSEPORT spreads one client's
//! connections over all of them.
//!
//! Why shared cells and not a table per core: a per-core table needs no
//! lock at all, but its limit is per core, so a client gets up to `cores`
//! times its rate (and, with a small burst, a count that depends on which
//! core its connections hashed to). The shared table keeps the limit what
//! the operator wrote, at the price of a lock taken once per (session, IP)
//! per core: each core caches the cells it has used ([`IpCache`]), and a
//! request whose IP is cached costs one compare-and-swap, no lock. The
//! lock is taken again only when the core's cache dropped the entry (see
//! below) or the limit changed (a reload clears the caches).
//!
//! Memory: the shared table holds at most `cap` cells (`--rate-ip-table`)
//! and each core's cache at most `cap` entries. Forgetting a cell whose
//! theoretical arrival time has passed loses nothing: such a cell admits
//! exactly what a fresh one would (its full burst). So a full table drops
//! its idle cells, and marks them evicted: a core that still caches one
//! sees the mark on its next use (one atomic load on the line the
//! compare-and-swap touches anyway) and fetches the new cell, so cores do
//! not keep counting on two different cells for one IP. (A core that
//! checked the old cell in the same instant it was evicted may admit one
//! request on it: the error is at most one request per core per eviction,
//! of an IP that was idle.) If the shared table is still full, every cell
//! in it belongs to a client active right now: the new IP is *untracked*
//! (served under the session's own rate only, counted in
//! `ringtunnel_rate_ip_untracked_total`) rather than refused, because
//! refusing would let a crowd of addresses lock every newcomer out of the
//! session. A core's cache that is full of active cells uses the new cell
//! without caching it (a lock per request for that IP until entries go
//! idle).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::rate::Gcra;
use crate::scope::Rate;

/// A GCRA cell and whether the shared table has dropped it.
#[derive(Debug)]
struct IpCell {
    gcra: Gcra,
    evicted: AtomicBool,
}

type Cells = HashMap<String, HashMap<IpAddr, Arc<IpCell>>>;

/// Entries of a two-level (session -> IP -> cell) map.
fn entries(m: &Cells) -> usize {
    m.values().map(HashMap::len).sum()
}

/// Drops the cells `keep` rejects and sessions left empty; returns how
/// many entries remain.
fn prune(m: &mut Cells, mut keep: impl FnMut(&Arc<IpCell>) -> bool) -> usize {
    m.retain(|_, ips| {
        ips.retain(|_, c| keep(c));
        !ips.is_empty()
    });
    entries(m)
}

/// The gateway's table of per-IP cells (`Send + Sync`).
pub struct IpCells {
    cap: usize,
    inner: Mutex<(Cells, usize)>,
    untracked: AtomicU64,
}

impl IpCells {
    pub fn new(cap: usize) -> IpCells {
        IpCells {
            cap: cap.max(1),
            inner: Mutex::new((HashMap::new(), 0)),
            untracked: AtomicU64::new(0),
        }
    }

    /// The cell of (`session`, `ip`) under `limit`, made if needed; `None`
    /// when the table is full of cells in use (the IP goes untracked).
    fn cell(
        &self,
        session: &str,
        ip: IpAddr,
        (rate, burst): (Rate, u32),
        now_ns: u64,
    ) -> Option<Arc<IpCell>> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, len) = &mut *g;
        if let Some(c) = map.get(session).and_then(|ips| ips.get(&ip)) {
            if c.gcra.rate == rate && c.gcra.burst == burst {
                return Some(c.clone());
            }
        }
        let existing = map.get(session).is_some_and(|ips| ips.contains_key(&ip));
        if !existing && *len >= self.cap {
            // Idle cells carry no state: they go (marked, for the cores
            // that cache them).
            *len = prune(map, |c| {
                let idle = c.gcra.idle(now_ns);
                if idle {
                    c.evicted.store(true, Ordering::Release);
                }
                !idle
            });
            if *len >= self.cap {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let c = Arc::new(IpCell {
            gcra: Gcra::new(rate, burst),
            evicted: AtomicBool::new(false),
        });
        let ips = map.entry(session.to_string()).or_default();
        if let Some(old) = ips.insert(ip, c.clone()) {
            // A cell for the old limit: cores drop it on next use.
            old.evicted.store(true, Ordering::Release);
        } else {
            *len += 1;
        }
        Some(c)
    }

    /// Cells in the table (all sessions).
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests served without a per-IP cell because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}

/// One core's cache of the cells it has used (never leaves its thread).
#[derive(Default)]
pub struct IpCache {
    map: RefCell<Cells>,
    len: Cell<usize>,
}

impl IpCache {
    /// Admits one request of `session` from `ip` under `limit`, or says how
    /// long until one would pass. A cached cell is checked in place: no
    /// lock, no reference count touched.
    pub fn check(
        &self,
        shared: &IpCells,
        session: &str,
        ip: IpAddr,
        limit: (Rate, u32),
        now_ns: u64,
    ) -> Result<(), Duration> {
        let mut stale = false;
        if let Some(c) = self.map.borrow().get(session).and_then(|m| m.get(&ip)) {
            if !c.evicted.load(Ordering::Acquire) {
                return c.gcra.check(now_ns);
            }
            stale = true;
        }
        let mut m = self.map.borrow_mut();
        if stale {
            if let Some(ips) = m.get_mut(session) {
                ips.remove(&ip);
                self.len.set(self.len.get() - 1);
            }
        }
        let Some(c) = shared.cell(session, ip, limit, now_ns) else {
            return Ok(());
        };
        let verdict = c.gcra.check(now_ns);
        if self.len.get() >= shared.cap {
            // Idle and evicted cells are forgotten without loss.
            self.len.set(prune(&mut m, |c| {
                !c.gcra.idle(now_ns) && !c.evicted.load(Ordering::Acquire)
            }));
        }
        if self.len.get() < shared.cap {
            m.entry(session.to_string()).or_default().insert(ip, c);
            self.len.set(self.len.get() + 1);
        }
        verdict
    }

    /// Forgets the cells of `session` (its limit may change).
    pub fn forget(&self, session: &str) {
        if let Some(ips) = self.map.borrow_mut().remove(session) {
            self.len.set(self.len.get() - ips.len());
        }
    }

    pub fn clear(&self) {
        self.map.borrow_mut().clear();
        self.len.set(0);
    }

    pub fn len(&self) -> usize {
        self.len.get()
    }

    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn lim(burst: u32) -> (Rate, u32) {
        ("1/h".parse().unwrap(), burst)
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + n))
    }

    #[test]
    fn one_ip_is_limited_the_other_is_not_and_cores_share_the_count() {
        let t = IpCells::new(100);
        let (c0, c1) = (IpCache::default(), IpCache::default());
        // Burst 3 for ip(1), requests alternating between two cores.
        let ok = (0..6)
            .filter(|i| {
                let c = if i % 2 == 0 { &c0 } else { &c1 };
                c.check(&t, "s", ip(1), lim(3), S).is_ok()
            })
            .count();
        assert_eq!(ok, 3);
        assert!(c0.check(&t, "s", ip(2), lim(3), S).is_ok());
        // Same IP, another session: its own cell.
        assert!(c1.check(&t, "other", ip(1), lim(3), S).is_ok());
        assert_eq!(t.len(), 3);
        let wait = c0.check(&t, "s", ip(1), lim(3), S).unwrap_err();
        assert_eq!(wait, Duration::from_secs(3600));
    }

    #[test]
    fn a_full_table_drops_idle_cells_then_leaves_new_ips_untracked() {
        let t = IpCells::new(4);
        let core = IpCache::default();
        for n in 0..4 {
            assert!(core.check(&t, "s", ip(n), lim(1), S).is_ok());
        }
        assert_eq!((t.len(), core.len()), (4, 4));
        // Full of active cells (each IP spent its burst; cached by a core):
        // a fifth IP is untracked, served, and counted.
        assert!(core.check(&t, "s", ip(9), lim(1), S).is_ok());
        assert!(core.check(&t, "s", ip(9), lim(1), S).is_ok());
        assert_eq!(t.untracked(), 2);
        assert_eq!(t.len(), 4);
        // The tracked ones are still limited.
        assert!(core.check(&t, "s", ip(0), lim(1), S).is_err());
        // An hour later every cell is idle: the core's cache and then the
        // table drop them for new IPs, and the count is exact again.
        let later = S + 3601 * S;
        assert!(core.check(&t, "s", ip(9), lim(1), later).is_ok());
        assert!(core.check(&t, "s", ip(9), lim(1), later).is_err());
        assert!(
            t.len() <= 4 && core.len() <= 4,
            "{} {}",
            t.len(),
            core.len()
        );
        assert_eq!(t.untracked(), 2);
    }

    #[test]
    fn an_evicted_cell_is_dropped_by_the_cores_that_cache_it() {
        let t = IpCells::new(2);
        let (c0, c1) = (IpCache::default(), IpCache::default());
        assert!(c0.check(&t, "s", ip(1), lim(1), S).is_ok());
        assert!(c0.check(&t, "s", ip(2), lim(1), S).is_ok());
        // An hour later both are idle: core 1's new IP evicts them although
        // core 0 still caches them.
        let later = 3601 * S + S;
        assert!(c1.check(&t, "s", ip(3), lim(1), later).is_ok());
        assert_eq!(t.untracked(), 0);
        // ip(1) comes back on core 1 (a new cell, in the table) and then on
        // core 0: core 0 must not count on its old cell (that would give
        // ip(1) a second burst).
        assert!(c1.check(&t, "s", ip(1), lim(1), later).is_ok());
        assert!(c0.check(&t, "s", ip(1), lim(1), later).is_err());
        assert_eq!(t.len(), 2);
        c0.forget("s");
        assert!(c0.is_empty());
    }

    #[test]
    fn a_changed_limit_makes_a_new_cell() {
        let t = IpCells::new(10);
        let core = IpCache::default();
        assert!(core.check(&t, "s", ip(1), lim(1), S).is_ok());
        assert!(core.check(&t, "s", ip(1), lim(1), S).is_err());
        core.clear();
        assert!(core.check(&t, "s", ip(1), lim(2), S).is_ok());
        assert!(core.check(&t, "s", ip(1), lim(2), S).is_ok());
        assert!(core.check(&t, "s", ip(1), lim(2), S).is_err());
        assert_eq!(t.len(), 1);
    }
}
