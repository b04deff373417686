//! The claim registry: which token and agent own each session name, how
//! many uplinks they hold on each core, and the lease that keeps a name
//! for its owner after its last uplink went.
//!
//! Pure bookkeeping (time is passed in); the gateway keeps one behind a
//! `Mutex` taken when an uplink connects, starts draining or goes away,
//! never per request or frame. Whether a name is reserved (what a request
//! for a session no core holds needs to know: wait for the owner, or 502)
//! is told to every core as a [`Reservation`] when it changes, and each
//! core keeps a [`LeaseReplica`] of it, so the request path takes no lock.
//!
//! Owner rules:
//! - a name is owned by the token (its rule, or on an open gateway the
//!   token string) and the agent id that claimed it first;
//! - another token is always refused; another agent id with the same
//!   token is refused unless the token's rule says `pool = true`, in which
//!   case the agents serve the session together;
//! - when the last uplink goes, the name stays reserved for the owner
//!   (token + agent id; pool sessions: the token) for the lease, then is
//!   free for anyone.
//!
//! Draining uplinks (GOAWAY sent or received, streams finishing) keep the
//! name owned but do not count toward the token's `max_uplinks`: an agent
//! restarting with SIGTERM leaves its old uplinks draining while the new
//! process connects as many again. So that restarts cannot pile up
//! without bound, live plus draining uplinks of a token stay within
//! `2 × max_uplinks`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::proto::tcp::PortRanges;
use crate::proto::ErrorCode;

/// The token side of an owner.
#[derive(Clone, Debug)]
pub(crate) enum Holder {
    /// The SHA-256 of the matched rule's secret: stays the same when the
    /// rules are reloaded or reordered, and keeps no secret in the map.
    Rule([u8; 32]),
    /// Open gateway: the token string itself decides who owns a name.
    Open(String),
}

impl Holder {
    fn same(&self, other: &Holder) -> bool {
        match (self, other) {
            (Holder::Rule(a), Holder::Rule(b)) => a.ct_eq(b).into(),
            // Constant time: the string is a credential of sorts.
            (Holder::Open(a), Holder::Open(b)) => a.as_bytes().ct_eq(b.as_bytes()).into(),
            _ => false,
        }
    }
}

/// Who asks for an uplink, and what its token's rule allows.
#[derive(Clone, Debug)]
pub(crate) struct Claimant {
    pub holder: Holder,
    pub agent: u64,
    pub pool: bool,
    pub max_sessions: Option<u32>,
    pub max_uplinks: Option<u32>,
    /// TCP tunnel ports the token's rule allows (`None`: any of the
    /// gateway's).
    pub tcp_ports: Option<PortRanges>,
}

/// Why a claim was refused: the REFUSE code and its sentence.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

struct Claim {
    holder: Holder,
    /// The agent that claimed the name first (pool sessions: any agent of
    /// the token may join).
    agent: u64,
    pool: bool,
    /// Live uplinks (taking new streams) per core: what placement balances.
    per_core: Vec<u32>,
    /// Uplinks that stopped taking new streams but have not closed yet.
    draining: u32,
    /// Set while no uplink is left: the name is kept for its owner until
    /// then.
    lease_until: Option<Instant>,
    /// TCP tunnel ports granted to the session, in the order its agent
    /// asked for them. Held as long as the claim (lease included).
    tcp: Vec<u16>,
}

impl Claim {
    /// Live uplinks (draining ones excluded).
    fn uplinks(&self) -> u32 {
        self.per_core.iter().sum()
    }

    fn connected(&self) -> u32 {
        self.uplinks() + self.draining
    }

    fn expired(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|t| now >= t)
    }

    fn owned_by(&self, who: &Claimant) -> bool {
        self.holder.same(&who.holder) && (self.pool || self.agent == who.agent)
    }
}

/// A TCP port refusal (REFUSE PORT_REFUSED).
fn port_refused(reason: String) -> Refusal {
    Refusal {
        code: ErrorCode::PortRefused,
        reason,
    }
}

pub(crate) struct Claims {
    cores: usize,
    lease: Duration,
    map: HashMap<String, Claim>,
}

fn seconds_left(until: Instant, now: Instant) -> u64 {
    let left = until.saturating_duration_since(now);
    // Rounded up: "0 more seconds" would read as "free now".
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

impl Claims {
    pub(crate) fn new(cores: usize, lease: Duration) -> Claims {
        Claims {
            cores,
            lease,
            map: HashMap::new(),
        }
    }

    /// Claims one more uplink of `session`; picks the core holding the
    /// fewest uplinks of that session (ties: `here`). An uplink that
    /// cannot move (TLS) is counted where it is.
    pub(crate) fn claim(
        &mut self,
        session: &str,
        who: &Claimant,
        here: usize,
        movable: bool,
        now: Instant,
    ) -> Result<usize, Refusal> {
        // Expired leases are dropped here (claims are rare; the map holds
        // one entry per name in use).
        self.map.retain(|_, c| !c.expired(now));
        let taken = |reason: String| Refusal {
            code: ErrorCode::SessionTaken,
            reason,
        };
        if let Some(c) = self.map.get(session) {
            if !c.owned_by(who) {
                return Err(taken(match c.lease_until {
                    Some(t) => format!(
                        "session '{session}' is reserved for its owner for {} more seconds",
                        seconds_left(t, now)
                    ),
                    None if !c.holder.same(&who.holder) => {
                        format!("session '{session}' is held by an agent with another token")
                    }
                    None => format!(
                        "session '{session}' is held by another agent (its token does not \
                         allow pooling)"
                    ),
                }));
            }
        } else if let Some(max) = who.max_sessions {
            let held = self
                .map
                .values()
                .filter(|c| c.holder.same(&who.holder))
                .count();
            if held >= max as usize {
                return Err(Refusal {
                    code: ErrorCode::Overloaded,
                    reason: format!(
                        "token may hold at most {max} sessions (leases included); \
                         '{session}' would be one more"
                    ),
                });
            }
        }
        if let Some(max) = who.max_uplinks {
            let (live, draining) = self
                .map
                .values()
                .filter(|c| c.holder.same(&who.holder))
                .fold((0u32, 0u32), |(l, d), c| (l + c.uplinks(), d + c.draining));
            if live >= max {
                return Err(Refusal {
                    code: ErrorCode::Overloaded,
                    reason: format!("token may hold at most {max} uplinks"),
                });
            }
            if live + draining >= max.saturating_mul(2) {
                return Err(Refusal {
                    code: ErrorCode::Overloaded,
                    reason: format!(
                        "token may hold at most {max} uplinks, and {draining} of its \
                         uplinks are still draining"
                    ),
                });
            }
        }
        let cores = self.cores;
        let c = self
            .map
            .entry(session.to_string())
            .or_insert_with(|| Claim {
                holder: who.holder.clone(),
                agent: who.agent,
                pool: who.pool,
                per_core: vec![0; cores],
                draining: 0,
                lease_until: None,
                tcp: Vec::new(),
            });
        c.lease_until = None;
        let min = *c.per_core.iter().min().unwrap_or(&0);
        let target = if !movable || c.per_core[here] == min {
            here
        } else {
            (0..cores).find(|&i| c.per_core[i] == min).unwrap_or(here)
        };
        c.per_core[target] += 1;
        Ok(target)
    }

    /// One live uplink of `session` on `core` stopped taking new streams:
    /// it no longer counts toward `max_uplinks` nor placement, but keeps
    /// the name owned until it closes (`release` with `drained`).
    pub(crate) fn drain(&mut self, session: &str, core: usize) {
        if let Some(c) = self.map.get_mut(session) {
            if c.per_core[core] > 0 {
                c.per_core[core] -= 1;
                c.draining += 1;
            }
        }
    }

    /// One uplink of `session` on `core` went (`drained`: it was counted
    /// as draining by [`Claims::drain`]). After the last one the name is
    /// leased to its owner (or freed at once with no lease).
    pub(crate) fn release(&mut self, session: &str, core: usize, drained: bool, now: Instant) {
        let Some(c) = self.map.get_mut(session) else {
            return;
        };
        if drained {
            c.draining = c.draining.saturating_sub(1);
        } else {
            c.per_core[core] = c.per_core[core].saturating_sub(1);
        }
        if c.connected() == 0 {
            if self.lease.is_zero() {
                self.map.remove(session);
            } else {
                c.lease_until = Some(now + self.lease);
            }
        }
    }

    /// Whether `session` is owned now, and until when: what the cores'
    /// [`LeaseReplica`]s are told whenever it changes.
    pub(crate) fn reservation(&self, session: &str, now: Instant) -> Reservation {
        match self.map.get(session) {
            None => Reservation::Free,
            Some(c) if c.expired(now) => Reservation::Free,
            Some(c) => match c.lease_until {
                Some(t) => Reservation::Until(t),
                None => Reservation::Held,
            },
        }
    }

    /// Drops expired leases (their TCP ports with them).
    pub(crate) fn expire(&mut self, now: Instant) {
        self.map.retain(|_, c| !c.expired(now));
    }

    /// The TCP ports `session` would hold if `who` claims it asking for
    /// `asked` (0: any free port), checked against the gateway's `range`
    /// and the token's scope; nothing changes until [`Claims::set_ports`].
    ///
    /// A session keeps the ports of its first claim for as long as the
    /// claim lives (lease included): a later uplink of the session must
    /// ask for the same list (0 matches whatever was granted), so every
    /// uplink of an agent gets the same answer and a restarting agent gets
    /// its ports back. Someone who is not the owner gets no plan here;
    /// [`Claims::claim`] then refuses them with the reason.
    pub(crate) fn plan_ports(
        &self,
        session: &str,
        who: &Claimant,
        asked: &[u16],
        range: &PortRanges,
        now: Instant,
    ) -> Result<Vec<u16>, Refusal> {
        let live = |c: &&Claim| !c.expired(now);
        if let Some(c) = self.map.get(session).filter(live) {
            if !c.owned_by(who) {
                return Ok(Vec::new());
            }
            let same = c.tcp.len() == asked.len()
                && asked.iter().zip(&c.tcp).all(|(a, g)| *a == 0 || a == g);
            if !same {
                return Err(port_refused(format!(
                    "session '{session}' already holds TCP ports {} (asked for {}); an agent \
                     with other --tcp ports must use another session name",
                    list(&c.tcp),
                    list(asked)
                )));
            }
            return Ok(c.tcp.clone());
        }
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        if range.is_empty() {
            return Err(port_refused(
                "this gateway has no TCP tunnels (started without --tcp-ports)".into(),
            ));
        }
        let scope = who.tcp_ports.as_ref();
        let taken: std::collections::HashSet<u16> = self
            .map
            .values()
            .filter(live)
            .flat_map(|c| c.tcp.iter().copied())
            .collect();
        let mut granted: Vec<u16> = Vec::with_capacity(asked.len());
        for &p in asked.iter().filter(|p| **p != 0) {
            if !range.contains(p) {
                return Err(port_refused(format!(
                    "TCP port {p} is outside the gateway's range ({range})"
                )));
            }
            if let Some(s) = scope.filter(|s| !s.contains(p)) {
                return Err(port_refused(format!(
                    "token not allowed to open TCP port {p} (its tcp_ports: {s})"
                )));
            }
            if taken.contains(&p) || granted.contains(&p) {
                return Err(port_refused(format!(
                    "TCP port {p} is taken by another session"
                )));
            }
            granted.push(p);
        }
        let mut free = range
            .iter()
            .filter(|p| scope.map_or(true, |s| s.contains(*p)))
            .filter(|p| !taken.contains(p) && !asked.contains(p));
        let mut out = Vec::with_capacity(asked.len());
        let mut fixed = granted.into_iter();
        for &p in asked {
            let g = if p == 0 {
                free.next().ok_or_else(|| {
                    port_refused(format!(
                        "no free TCP port left in the gateway's range ({range}){}",
                        if scope.is_some() {
                            " within the token's tcp_ports"
                        } else {
                            ""
                        }
                    ))
                })?
            } else {
                fixed.next().expect("one grant per fixed port")
            };
            out.push(g);
        }
        Ok(out)
    }

    /// Records the ports [`Claims::plan_ports`] planned, once the claim
    /// succeeded.
    pub(crate) fn set_ports(&mut self, session: &str, ports: Vec<u16>) {
        if let Some(c) = self.map.get_mut(session) {
            c.tcp = ports;
        }
    }

    /// Every TCP port held now (expired leases not counted), with its
    /// session.
    pub(crate) fn tcp_ports(&self, now: Instant) -> HashMap<u16, String> {
        self.map
            .iter()
            .filter(|(_, c)| !c.expired(now))
            .flat_map(|(name, c)| c.tcp.iter().map(move |p| (*p, name.clone())))
            .collect()
    }

    /// Uplinks of `session` connected now (live and draining) and the
    /// agent that claimed it; `None` without a claim. What the cluster
    /// registry is told (`Shared::register_hold`).
    pub(crate) fn uplinks_of(&self, session: &str) -> Option<(u32, u64)> {
        self.map.get(session).map(|c| (c.connected(), c.agent))
    }

    /// The TCP ports granted to `session`'s claim (empty without one).
    pub(crate) fn ports_of(&self, session: &str) -> Vec<u16> {
        self.map
            .get(session)
            .map(|c| c.tcp.clone())
            .unwrap_or_default()
    }

    /// Who holds `session` now (a live or leased claim).
    pub(crate) fn holder(&self, session: &str) -> Option<Holder> {
        self.map.get(session).map(|c| c.holder.clone())
    }

    /// Live uplinks per core of every session with live uplinks (for
    /// /stats).
    pub(crate) fn placement(&self) -> Vec<(String, Vec<u32>)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, c)| c.uplinks() > 0)
            .map(|(k, c)| (k.clone(), c.per_core.clone()))
            .collect();
        v.sort();
        v
    }
}

/// Whether a session name is owned, as the cores' replicas see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// Uplinks are connected (perhaps all draining): owned until further
    /// notice.
    Held,
    /// No uplink left: leased to its owner until then.
    Until(Instant),
    Free,
}

/// One core's copy of which names are reserved, kept up to date by the
/// [`Reservation`] messages the claim registry sends when one changes
/// (in the registry's order: they are sent under its lock). Read on the
/// slow path of a request for a session no core holds, without a lock.
///
/// Memory: one entry per name with a claim or a lease; expired leases are
/// dropped whenever a message arrives, so the replica never holds more
/// names than the registry did since the last message.
#[derive(Default)]
pub(crate) struct LeaseReplica {
    /// `None`: held by uplinks; `Some(t)`: leased until `t`.
    map: HashMap<String, Option<Instant>>,
}

impl LeaseReplica {
    pub(crate) fn apply(&mut self, session: String, r: Reservation, now: Instant) {
        self.map.retain(|_, until| until.map_or(true, |t| now < t));
        match r {
            Reservation::Held => {
                self.map.insert(session, None);
            }
            Reservation::Until(t) => {
                self.map.insert(session, Some(t));
            }
            Reservation::Free => {
                self.map.remove(&session);
            }
        }
    }

    /// Whether `session` is reserved at `now` (asked only for a lease).
    pub(crate) fn reserved(&self, session: &str, now: impl FnOnce() -> Instant) -> bool {
        match self.map.get(session) {
            None => false,
            Some(None) => true,
            Some(Some(t)) => now() < *t,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

fn list(ports: &[u16]) -> String {
    let v: Vec<String> = ports
        .iter()
        .map(|p| match p {
            0 => "any".to_string(),
            p => p.to_string(),
        })
        .collect();
    format!("[{}]", v.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(rule: u8, agent: u64) -> Claimant {
        Claimant {
            holder: Holder::Rule([rule; 32]),
            agent,
            pool: false,
            max_sessions: None,
            max_uplinks: None,
            tcp_ports: None,
        }
    }

    #[test]
    fn tcp_ports_are_planned_kept_and_freed_with_the_claim() {
        let t0 = Instant::now();
        let range = PortRanges::parse("20000-20002").unwrap();
        let mut c = Claims::new(1, LEASE);
        let take = |c: &mut Claims, s: &str, w: &Claimant, asked: &[u16], t| {
            let p = c.plan_ports(s, w, asked, &range, t)?;
            c.claim(s, w, 0, true, t)?;
            c.set_ports(s, p.clone());
            Ok::<_, Refusal>(p)
        };
        assert_eq!(
            take(&mut c, "a", &who(0, 1), &[0, 20002], t0),
            Ok(vec![20000, 20002])
        );
        // A second uplink of the same agent gets the same answer.
        assert_eq!(
            take(&mut c, "a", &who(0, 1), &[0, 20002], t0),
            Ok(vec![20000, 20002])
        );
        assert_eq!(
            take(&mut c, "a", &who(0, 1), &[20000, 0], t0),
            Ok(vec![20000, 20002])
        );
        // Another list for a live session is refused with both lists.
        let e = take(&mut c, "a", &who(0, 1), &[0], t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::PortRefused);
        assert!(
            e.reason.contains("[20000, 20002]") && e.reason.contains("[any]"),
            "{}",
            e.reason
        );
        // Taken, out of range, the range exhausted.
        let e = take(&mut c, "b", &who(1, 2), &[20002], t0).unwrap_err();
        assert!(e.reason.contains("20002 is taken"), "{}", e.reason);
        let e = take(&mut c, "b", &who(1, 2), &[30000], t0).unwrap_err();
        assert!(
            e.reason
                .contains("outside the gateway's range (20000-20002)"),
            "{}",
            e.reason
        );
        assert_eq!(take(&mut c, "b", &who(1, 2), &[0], t0), Ok(vec![20001]));
        let e = take(&mut c, "d", &who(1, 2), &[0], t0).unwrap_err();
        assert!(e.reason.contains("no free TCP port"), "{}", e.reason);
        // Asking twice for one port in one list.
        let e = take(&mut c, "e", &who(3, 3), &[20000, 20000], t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::PortRefused);
        // Nothing configured.
        let e = c
            .plan_ports("f", &who(3, 3), &[0], &PortRanges::none(), t0)
            .unwrap_err();
        assert!(e.reason.contains("no TCP tunnels"), "{}", e.reason);
        // Not the owner: no plan, the claim refuses.
        assert_eq!(
            c.plan_ports("a", &who(9, 9), &[20000], &range, t0),
            Ok(vec![])
        );
        let held = c.tcp_ports(t0);
        assert_eq!(held.get(&20000).map(String::as_str), Some("a"));
        assert_eq!(held.len(), 3);
        // The lease keeps them for the owner; expiry frees them.
        c.release("a", 0, false, t0);
        c.release("a", 0, false, t0);
        c.release("a", 0, false, t0);
        assert_eq!(c.tcp_ports(t0).len(), 3);
        let e = take(&mut c, "g", &who(4, 4), &[20000], t0).unwrap_err();
        assert!(e.reason.contains("taken"), "{}", e.reason);
        assert_eq!(
            take(&mut c, "a", &who(0, 1), &[0, 0], t0),
            Ok(vec![20000, 20002])
        );
        c.release("a", 0, false, t0);
        let later = t0 + LEASE + Duration::from_secs(1);
        c.expire(later);
        assert_eq!(c.tcp_ports(later).len(), 1);
        assert_eq!(
            take(&mut c, "g", &who(4, 4), &[20000], later),
            Ok(vec![20000])
        );
    }

    #[test]
    fn tcp_ports_within_the_token_scope() {
        let t0 = Instant::now();
        let range = PortRanges::parse("20000-20099").unwrap();
        let c = Claims::new(1, LEASE);
        let scoped = Claimant {
            tcp_ports: Some(PortRanges::parse("20050-20051").unwrap()),
            ..who(0, 1)
        };
        assert_eq!(
            c.plan_ports("a", &scoped, &[0, 0], &range, t0),
            Ok(vec![20050, 20051])
        );
        let e = c
            .plan_ports("a", &scoped, &[20000], &range, t0)
            .unwrap_err();
        assert!(
            e.reason.contains("not allowed to open TCP port 20000"),
            "{}",
            e.reason
        );
        let e = c
            .plan_ports("a", &scoped, &[0, 0, 0], &range, t0)
            .unwrap_err();
        assert!(
            e.reason.contains("within the token's tcp_ports"),
            "{}",
            e.reason
        );
        let none = Claimant {
            tcp_ports: Some(PortRanges::none()),
            ..who(0, 1)
        };
        assert!(c.plan_ports("a", &none, &[20000], &range, t0).is_err());
        assert_eq!(c.plan_ports("a", &none, &[], &range, t0), Ok(vec![]));
    }

    const LEASE: Duration = Duration::from_secs(30);

    fn reserved(c: &Claims, s: &str, now: Instant) -> bool {
        c.reservation(s, now) != Reservation::Free
    }

    #[test]
    fn owner_is_token_and_agent_unless_pooled() {
        let t0 = Instant::now();
        let mut c = Claims::new(2, LEASE);
        assert_eq!(c.claim("s", &who(0, 1), 0, true, t0), Ok(0));
        // Same token, same agent: a second uplink, placed on core 1.
        assert_eq!(c.claim("s", &who(0, 1), 0, true, t0), Ok(1));
        let e = c.claim("s", &who(0, 2), 0, true, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionTaken);
        assert!(e.reason.contains("another agent"), "{}", e.reason);
        let e = c.claim("s", &who(1, 1), 0, true, t0).unwrap_err();
        assert!(e.reason.contains("another token"), "{}", e.reason);

        let pooled = |agent| Claimant {
            pool: true,
            ..who(3, agent)
        };
        assert!(c.claim("p", &pooled(1), 0, true, t0).is_ok());
        assert!(c.claim("p", &pooled(2), 0, true, t0).is_ok());
        assert!(c.claim("p", &who(4, 2), 0, true, t0).is_err());
    }

    #[test]
    fn lease_keeps_the_name_for_its_owner_then_frees_it() {
        let t0 = Instant::now();
        let mut c = Claims::new(1, LEASE);
        c.claim("s", &who(0, 1), 0, true, t0).unwrap();
        c.release("s", 0, false, t0);
        assert!(reserved(&c, "s", t0 + Duration::from_secs(29)));
        assert!(c.placement().is_empty(), "a lease holds no uplinks");
        let e = c
            .claim("s", &who(0, 2), 0, true, t0 + Duration::from_millis(500))
            .unwrap_err();
        assert_eq!(
            e.reason,
            "session 's' is reserved for its owner for 30 more seconds"
        );
        // The owner is back in time: no lease any more.
        c.claim("s", &who(0, 1), 0, true, t0 + Duration::from_secs(10))
            .unwrap();
        assert!(reserved(&c, "s", t0 + Duration::from_secs(100)));
        c.release("s", 0, false, t0 + Duration::from_secs(10));
        // Lease over: anyone.
        let late = t0 + Duration::from_secs(41);
        assert!(!reserved(&c, "s", late));
        assert!(c.claim("s", &who(7, 9), 0, true, late).is_ok());
    }

    #[test]
    fn no_lease_frees_at_once() {
        let t0 = Instant::now();
        let mut c = Claims::new(1, Duration::ZERO);
        c.claim("s", &who(0, 1), 0, true, t0).unwrap();
        c.release("s", 0, false, t0);
        assert!(!reserved(&c, "s", t0));
        assert!(c.claim("s", &who(1, 2), 0, true, t0).is_ok());
    }

    #[test]
    fn per_token_limits() {
        let t0 = Instant::now();
        let mut c = Claims::new(2, LEASE);
        let limited = Claimant {
            max_sessions: Some(1),
            max_uplinks: Some(2),
            ..who(0, 1)
        };
        c.claim("a", &limited, 0, true, t0).unwrap();
        let e = c.claim("b", &limited, 0, true, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::Overloaded);
        assert!(e.reason.contains("at most 1 sessions"), "{}", e.reason);
        c.claim("a", &limited, 0, true, t0).unwrap();
        let e = c.claim("a", &limited, 0, true, t0).unwrap_err();
        assert!(e.reason.contains("at most 2 uplinks"), "{}", e.reason);
        // Other tokens are not counted against it.
        assert!(c.claim("b", &who(1, 5), 0, true, t0).is_ok());
    }

    #[test]
    fn open_gateway_owner_is_the_token_string() {
        let t0 = Instant::now();
        let mut c = Claims::new(1, LEASE);
        let open = |t: &str| Claimant {
            holder: Holder::Open(t.into()),
            ..who(0, 1)
        };
        c.claim("s", &open("aaa"), 0, true, t0).unwrap();
        assert!(c.claim("s", &open("aab"), 0, true, t0).is_err());
        assert!(c.claim("s", &open("aaa"), 0, true, t0).is_ok());
    }

    #[test]
    fn draining_uplinks_do_not_count_toward_max_uplinks_up_to_twice_the_limit() {
        let t0 = Instant::now();
        let mut c = Claims::new(2, LEASE);
        let k = Claimant {
            max_uplinks: Some(2),
            ..who(0, 1)
        };
        assert_eq!(c.claim("s", &k, 0, true, t0), Ok(0));
        assert_eq!(c.claim("s", &k, 0, true, t0), Ok(1));
        assert!(c.claim("s", &k, 0, true, t0).is_err());
        // The agent restarts politely: both uplinks drain, the new process
        // connects two more, placed over the cores as if alone.
        c.drain("s", 0);
        c.drain("s", 1);
        assert!(c.placement().is_empty(), "draining uplinks are not placed");
        assert_eq!(c.claim("s", &k, 1, true, t0), Ok(1));
        assert_eq!(c.claim("s", &k, 1, true, t0), Ok(0));
        assert_eq!(c.placement(), vec![("s".to_string(), vec![1, 1])]);
        // Live at the limit.
        let e = c.claim("s", &k, 0, true, t0).unwrap_err();
        assert_eq!(e.reason, "token may hold at most 2 uplinks");
        // Another restart while the first one still drains: live + draining
        // would pass 2 x max_uplinks.
        c.drain("s", 0);
        let e = c.claim("s", &k, 0, true, t0).unwrap_err();
        assert!(e.reason.contains("still draining"), "{}", e.reason);
        // An old uplink finishes: room again.
        c.release("s", 0, true, t0);
        assert!(c.claim("s", &k, 0, true, t0).is_ok());
        // The name stays held while any uplink, draining or not, is there.
        for (core, drained) in [(1, true), (0, false), (1, false), (0, true)] {
            assert_eq!(c.reservation("s", t0), Reservation::Held);
            c.release("s", core, drained, t0);
        }
        assert_eq!(c.reservation("s", t0), Reservation::Until(t0 + LEASE));
    }

    #[test]
    fn replica_follows_the_registry_and_expires_leases_by_itself() {
        let t0 = Instant::now();
        let mut c = Claims::new(1, LEASE);
        let mut r = LeaseReplica::default();
        let sync = |c: &Claims, r: &mut LeaseReplica, now| {
            r.apply("s".into(), c.reservation("s", now), now);
        };
        assert!(!r.reserved("s", || t0));
        c.claim("s", &who(0, 1), 0, true, t0).unwrap();
        sync(&c, &mut r, t0);
        // Held by an uplink: no clock needed to answer.
        assert!(r.reserved("s", || unreachable!("no lease, no clock")));
        c.release("s", 0, false, t0);
        sync(&c, &mut r, t0);
        assert!(r.reserved("s", || t0 + Duration::from_secs(29)));
        assert!(!r.reserved("s", || t0 + LEASE));
        // An expired lease is dropped when any later message comes.
        r.apply("other".into(), Reservation::Held, t0 + LEASE);
        assert_eq!(r.len(), 1);
        r.apply("other".into(), Reservation::Free, t0 + LEASE);
        assert_eq!(r.len(), 0);
        // No lease configured: freed at once.
        let mut c = Claims::new(1, Duration::ZERO);
        c.claim("s", &who(0, 1), 0, true, t0).unwrap();
        sync(&c, &mut r, t0);
        c.release("s", 0, false, t0);
        assert_eq!(c.reservation("s", t0), Reservation::Free);
        sync(&c, &mut r, t0);
        assert!(!r.reserved("s", || t0));
    }
}
