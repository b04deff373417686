//! Public connections counted exactly across cores: in total, and per
//! client IP.
//!
//! The kernel's SO_REUSEPORT hash spreads one IP's connections over every
//! core, so a per-IP count must be shared. It is a table of 64 shards, each
//! a `Mutex<HashMap<IpAddr, u32>>`, taken twice per connection (at accept
//! and when the [`ConnPermit`] drops), never per request. Why this and not
//! a lock-free array of counters indexed by a hash of the IP: the array is
//! inexact (two IPs that collide share one count, so an innocent client
//! can be refused for another's connections), while the mutex table is
//! exact and keeps entries only for IPs with open connections, so its
//! memory is bounded by the connection limit. The critical section is one
//! hash lookup, and two cores contend only when two accepts hash to the
//! same shard at the same instant.
//!
//! The total is one atomic: incremented first, undone if over the limit,
//! so it never exceeds the limit even when cores race.
//!
//! The two limits are atomics too, so a configuration reload can change
//! them ([`ConnTable::set_limits`]): connections already admitted stay,
//! new ones are judged against the new limits.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 64;

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// `--max-conns` reached.
    Total,
    /// `--max-conns-per-ip` reached for this IP.
    PerIp,
}

pub struct ConnTable {
    max_total: AtomicUsize,
    max_per_ip: AtomicU32,
    total: AtomicUsize,
    shards: Vec<Mutex<HashMap<IpAddr, u32>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl ConnTable {
    pub fn new(max_total: usize, max_per_ip: u32) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicU32::new(max_per_ip),
            total: AtomicUsize::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        })
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        &self.shards[self.hasher.hash_one(ip) as usize % SHARDS]
    }

    /// Admits one connection from `ip`; `per_ip` false exempts it from the
    /// per-IP limit (a trusted proxy carries many clients). The permit
    /// gives the slot back when dropped, on whichever core that happens.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, per_ip: bool) -> Result<ConnPermit, ConnRefusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total() {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnRefusal::Total);
        }
        if per_ip {
            let mut m = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
            let n = m.entry(ip).or_insert(0);
            if *n >= self.max_per_ip() {
                drop(m);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(ConnRefusal::PerIp);
            }
            *n += 1;
        }
        Ok(ConnPermit {
            table: self.clone(),
            ip: per_ip.then_some(ip),
        })
    }

    /// Replaces both limits (a reload); admitted connections stay.
    pub fn set_limits(&self, max_total: usize, max_per_ip: u32) {
        self.max_total.store(max_total, Ordering::Release);
        self.max_per_ip.store(max_per_ip, Ordering::Release);
    }

    pub fn max_total(&self) -> usize {
        self.max_total.load(Ordering::Acquire)
    }

    pub fn max_per_ip(&self) -> u32 {
        self.max_per_ip.load(Ordering::Acquire)
    }

    /// Open connections admitted (all cores).
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Open connections of one IP.
    pub fn of(&self, ip: IpAddr) -> u32 {
        let m = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        m.get(&ip).copied().unwrap_or(0)
    }

    /// IPs with at least one open connection.
    pub fn ips(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// One admitted connection. `Send`: it travels with the socket when a
/// connection is handed to another core.
pub struct ConnPermit {
    table: Arc<ConnTable>,
    ip: Option<IpAddr>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut m = self
                .table
                .shard(&ip)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
        self.table.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_ip_and_total_limits_are_exact_and_released() {
        let t = ConnTable::new(5, 2);
        let a1 = t.acquire(ip("10.0.0.1"), true).unwrap();
        let _a2 = t.acquire(ip("10.0.0.1"), true).unwrap();
        assert_eq!(
            t.acquire(ip("10.0.0.1"), true).err(),
            Some(ConnRefusal::PerIp)
        );
        let _b = t.acquire(ip("10.0.0.2"), true).unwrap();
        // Exempt from the per-IP count, not from the total.
        let _p1 = t.acquire(ip("10.0.0.1"), false).unwrap();
        let _p2 = t.acquire(ip("10.0.0.3"), false).unwrap();
        assert_eq!(
            t.acquire(ip("10.0.0.4"), true).err(),
            Some(ConnRefusal::Total)
        );
        assert_eq!(t.total(), 5);
        assert_eq!(t.of(ip("10.0.0.1")), 2);
        drop(a1);
        assert_eq!(t.of(ip("10.0.0.1")), 1);
        let _a3 = t.acquire(ip("10.0.0.1"), true).unwrap();
    }

    #[test]
    fn entries_go_when_their_last_connection_does() {
        let t = ConnTable::new(100, 10);
        let ps: Vec<_> = (0..10)
            .map(|i| t.acquire(ip(&format!("10.0.0.{i}")), true).unwrap())
            .collect();
        assert_eq!(t.ips(), 10);
        drop(ps);
        assert_eq!(t.ips(), 0);
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn racing_threads_never_exceed_the_limits() {
        let t = ConnTable::new(1000, 7);
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let t = t.clone();
                    s.spawn(move || {
                        (0..50)
                            .filter_map(|_| t.acquire(ip("192.0.2.1"), true).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.len(), 7);
        assert_eq!(t.total(), 7);
        drop(held);
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn lowered_limits_refuse_new_connections_and_keep_the_old() {
        let t = ConnTable::new(10, 3);
        let held: Vec<_> = (0..3)
            .map(|_| t.acquire(ip("10.0.0.1"), true).unwrap())
            .collect();
        t.set_limits(10, 1);
        assert_eq!(
            t.acquire(ip("10.0.0.1"), true).err(),
            Some(ConnRefusal::PerIp)
        );
        assert_eq!(t.of(ip("10.0.0.1")), 3);
        let _b = t.acquire(ip("10.0.0.2"), true).unwrap();
        t.set_limits(4, 1);
        assert_eq!(
            t.acquire(ip("10.0.0.3"), true).err(),
            Some(ConnRefusal::Total)
        );
        drop(held);
        assert!(t.acquire(ip("10.0.0.1"), true).is_ok());
    }
}
