//! Which gateway nodes a clustered agent keeps its uplinks on (sans-IO:
//! the keepers in `mod.rs` ask it where to connect and tell it what
//! happened; time is passed in).
//!
//! Off until an ACCEPT carries a node list (a gateway started with
//! `--cluster-etcd`); until then every uplink goes to `--gateway`, as on a
//! single node. Once on, the agent's uplinks are `k` **slots** of
//! `per_node` uplinks each: uplink `u` belongs to slot `u / per_node`.
//! `k` is `--nodes` (default 2) capped by the number of nodes known, and
//! only grows (the keepers of a running agent are never taken away).
//!
//! Each slot has a target node. The targets are the rendezvous top `k`
//! (`cluster::rendezvous`) of the session over the known nodes that are
//! not excluded, assigned stably: a slot keeps its node while that node
//! is still among the top `k`, and only a slot whose node left takes the
//! next-ranked one. A slot without a target (fewer usable nodes than
//! slots) goes to `--gateway`, the bootstrap address (HAProxy in front of
//! the cluster), so an agent is never left with nowhere to connect.
//!
//! A node is excluded when a connection to it fails, its uplink drops, or
//! it says REHOME (it is draining); for 1 s the first time, doubling up to
//! 30 s while it keeps failing, back to 1 s once an uplink to it is
//! accepted. An exclusion that runs out makes the node a candidate again:
//! if it ranks in the top `k`, the slot moves back to it, again by opening
//! the new uplink before draining the old one, so a node that is still
//! dead costs a failed connect, never a working uplink.
//!
//! Memory: at most `MAX_ACCEPT_NODES` known nodes, one exclusion per
//! known node (exclusions of nodes no longer listed are dropped), one
//! entry per slot and per uplink.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::cluster::rendezvous;
use crate::proto::AcceptNode;

/// First exclusion of a node; doubles while it keeps failing.
pub(crate) const EXCLUDE_FIRST: Duration = Duration::from_secs(1);
/// Longest exclusion.
pub(crate) const EXCLUDE_MAX: Duration = Duration::from_secs(30);
/// While fewer nodes are known than `--nodes` asks for, how often uplink 0
/// re-dials its node (make-before-break) to read a fresh list: a node list
/// travels only in ACCEPT, and an agent that connected while the cluster
/// was still forming must not stay on fewer nodes for good.
pub(crate) const REFRESH: Duration = Duration::from_secs(10);

/// A node the agent may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
}

#[derive(Clone, Debug)]
struct Exclusion {
    until: Instant,
    /// The next exclusion's length.
    next: Duration,
    why: String,
}

#[derive(Debug)]
pub(crate) struct Nodes {
    session: String,
    /// `--nodes`, or 2.
    want: usize,
    /// Uplinks per slot (`--uplinks` or the first clustered ACCEPT's
    /// core count); 0 while off.
    per_node: usize,
    /// The latest ACCEPT's nodes with a usable address, in its order.
    known: Vec<Target>,
    excluded: HashMap<String, Exclusion>,
    /// Target of each slot; `None`: `--gateway`.
    slots: Vec<Option<String>>,
    /// Uplink index -> node it is accepted on (its ACCEPT's first node).
    holding: HashMap<usize, String>,
    /// Bumped whenever a slot's target changes: keepers re-check theirs.
    epoch: u64,
    /// When the last node list arrived.
    listed_at: Option<Instant>,
}

impl Nodes {
    pub(crate) fn new(session: &str, want: Option<usize>) -> Self {
        Nodes {
            session: session.to_string(),
            want: want.unwrap_or(2).max(1),
            per_node: 0,
            known: Vec::new(),
            excluded: HashMap::new(),
            slots: Vec::new(),
            holding: HashMap::new(),
            epoch: 0,
            listed_at: None,
        }
    }

    /// Whether a clustered gateway has been seen.
    pub(crate) fn is_on(&self) -> bool {
        self.per_node != 0
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Uplinks per node (1 while off, so it can divide).
    pub(crate) fn per_node(&self) -> usize {
        self.per_node.max(1)
    }

    /// Uplinks in all: slots x uplinks per slot (0 while off).
    pub(crate) fn total(&self) -> usize {
        self.slots.len() * self.per_node
    }

    /// An ACCEPT arrived: an empty list (a gateway outside any cluster)
    /// changes nothing; a list turns cluster mode on (`per_node` uplinks
    /// per node from then on) and replaces the known nodes. Entries whose
    /// address is not `ip:port` are left out with a warning (a gateway
    /// sends resolved addresses; anything else is a lie or a bug).
    /// Returns the new total of uplinks if it grew.
    pub(crate) fn on_accept(
        &mut self,
        nodes: &[AcceptNode],
        per_node: usize,
        now: Instant,
    ) -> Option<usize> {
        if nodes.is_empty() {
            return None;
        }
        let before = self.total();
        self.listed_at = Some(now);
        if !self.is_on() {
            self.per_node = per_node.max(1);
        }
        self.known.clear();
        for n in nodes {
            match n.tunnel.parse::<SocketAddr>() {
                Ok(addr) if !self.known.iter().any(|k| k.name == n.name) => {
                    self.known.push(Target {
                        name: n.name.clone(),
                        addr,
                    })
                }
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    node = %n.name,
                    tunnel = ?crate::limits::log_safe(&n.tunnel),
                    "the gateway listed a node without a usable ip:port address: not used"
                ),
            }
        }
        let known = &self.known;
        self.excluded
            .retain(|name, _| known.iter().any(|k| &k.name == name));
        let k = self.want.min(self.known.len()).max(self.slots.len()).max(1);
        self.slots.resize(k, None);
        self.recompute(now);
        (self.total() > before).then_some(self.total())
    }

    /// The slot uplink `uplink` belongs to.
    pub(crate) fn slot_of(&self, uplink: usize) -> usize {
        uplink / self.per_node.max(1)
    }

    /// Where uplink `uplink` should be: its slot's node, or `None` for
    /// `--gateway` (off, no usable node for its slot, or an uplink beyond
    /// the slots). Exclusions that ran out are dropped first.
    pub(crate) fn target(&mut self, uplink: usize, now: Instant) -> Option<Target> {
        if !self.is_on() {
            return None;
        }
        self.recompute(now);
        let name = self.slots.get(self.slot_of(uplink))?.as_ref()?;
        self.known.iter().find(|k| &k.name == name).cloned()
    }

    /// Whether uplink `uplink` should re-dial for a fresh node list now
    /// (`Ok`), or in how long (`Err`, `None`: no need). Only uplink 0, and
    /// only while fewer nodes are known than wanted (see [`REFRESH`]).
    pub(crate) fn refresh(&self, uplink: usize, now: Instant) -> Result<(), Option<Duration>> {
        let Some(at) = self
            .listed_at
            .filter(|_| uplink == 0 && self.known.len() < self.want)
        else {
            return Err(None);
        };
        match (at + REFRESH).checked_duration_since(now) {
            Some(d) if !d.is_zero() => Err(Some(d)),
            _ => Ok(()),
        }
    }

    /// How long until the next exclusion runs out (when a slot may move
    /// back), if one is running.
    pub(crate) fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.excluded
            .values()
            .filter(|e| e.until > now)
            .map(|e| e.until - now)
            .min()
    }

    /// Takes `node` out of the candidates for a while (see the module
    /// doc). A node already excluded stays so until its current deadline:
    /// the uplinks of one slot failing together count once.
    pub(crate) fn exclude(&mut self, node: &str, why: &str, now: Instant) {
        if !self.known.iter().any(|k| k.name == node) {
            return;
        }
        let e = self
            .excluded
            .entry(node.to_string())
            .or_insert_with(|| Exclusion {
                until: now,
                next: EXCLUDE_FIRST,
                why: String::new(),
            });
        if e.until > now {
            return;
        }
        e.until = now + e.next;
        tracing::warn!(
            %node,
            seconds = e.next.as_secs_f64(),
            reason = %why,
            "gateway node excluded"
        );
        e.next = (e.next * 2).min(EXCLUDE_MAX);
        e.why = why.to_string();
        self.recompute(now);
    }

    /// Uplink `uplink` was accepted on `node`: the node is healthy again.
    pub(crate) fn accepted(&mut self, uplink: usize, node: Option<&str>) {
        match node {
            Some(n) => {
                self.excluded.remove(n);
                self.holding.insert(uplink, n.to_string());
            }
            None => {
                self.holding.remove(&uplink);
            }
        }
    }

    /// Uplink `uplink` (its connection on `node`) ended.
    pub(crate) fn released(&mut self, uplink: usize, node: &str) {
        if self.holding.get(&uplink).is_some_and(|n| n == node) {
            self.holding.remove(&uplink);
        }
    }

    /// Nodes holding this agent's uplinks now, with how many, by name.
    pub(crate) fn on_nodes(&self) -> Vec<(String, usize)> {
        let mut m: std::collections::BTreeMap<&str, usize> = Default::default();
        for n in self.holding.values() {
            *m.entry(n).or_default() += 1;
        }
        m.into_iter().map(|(n, c)| (n.to_string(), c)).collect()
    }

    /// `"cluster":{...}` for the agent's /stats; empty while off.
    pub(crate) fn json(&self, now: Instant) -> String {
        if !self.is_on() {
            return String::new();
        }
        // Names are session-shaped; reasons may carry a gateway's text:
        // quotes, backslashes and control characters never reach the JSON.
        let q = |s: &str| {
            let clean: String = crate::limits::log_safe(s)
                .chars()
                .filter(|c| !matches!(c, '"' | '\\'))
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("\"{clean}\"")
        };
        let slots: Vec<String> = self
            .slots
            .iter()
            .map(|s| s.as_deref().map_or("null".into(), q))
            .collect();
        let on: Vec<String> = self
            .on_nodes()
            .iter()
            .map(|(n, c)| format!("{{\"node\":{},\"uplinks\":{c}}}", q(n)))
            .collect();
        let known: Vec<String> = self
            .known
            .iter()
            .map(|k| format!("{{\"node\":{},\"tunnel\":\"{}\"}}", q(&k.name), k.addr))
            .collect();
        let mut ex: Vec<(&String, &Exclusion)> = self
            .excluded
            .iter()
            .filter(|(_, e)| e.until > now)
            .collect();
        ex.sort_by_key(|(n, _)| n.as_str());
        let ex: Vec<String> = ex
            .iter()
            .map(|(n, e)| {
                format!(
                    "{{\"node\":{},\"ms_left\":{},\"why\":{}}}",
                    q(n),
                    e.until.saturating_duration_since(now).as_millis(),
                    q(&e.why)
                )
            })
            .collect();
        format!(
            "\"cluster\":{{\"nodes_wanted\":{},\"uplinks_per_node\":{},\"slots\":[{}],\"on\":[{}],\"known\":[{}],\"excluded\":[{}]}}",
            self.want,
            self.per_node,
            slots.join(","),
            on.join(","),
            known.join(","),
            ex.join(",")
        )
    }

    /// Re-assigns slots whose node is no longer among the top `k`
    /// candidates (see the module doc); bumps `epoch` if any changed.
    fn recompute(&mut self, now: Instant) {
        let excluded = &self.excluded;
        let candidates = self
            .known
            .iter()
            .map(|k| k.name.as_str())
            .filter(|n| !excluded.get(*n).is_some_and(|e| e.until > now));
        let desired: Vec<String> = rendezvous::top_k(&self.session, candidates, self.slots.len())
            .into_iter()
            .map(str::to_string)
            .collect();
        let mut next: Vec<Option<String>> = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let keep = s
                .as_ref()
                .filter(|n| desired.contains(n) && !next.iter().flatten().any(|m| m == *n));
            next.push(keep.cloned());
        }
        let mut free = desired
            .iter()
            .filter(|n| !next.iter().flatten().any(|m| m == *n))
            .cloned()
            .collect::<Vec<_>>()
            .into_iter();
        for s in next.iter_mut().filter(|s| s.is_none()) {
            *s = free.next();
        }
        if next != self.slots {
            self.slots = next;
            self.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(names: &[&str]) -> Vec<AcceptNode> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| AcceptNode {
                name: n.to_string(),
                tunnel: format!("127.0.0.{}:7000", i + 1),
            })
            .collect()
    }

    fn targets(n: &mut Nodes, now: Instant) -> Vec<Option<String>> {
        (0..n.slots.len())
            .map(|s| n.target(s * n.per_node, now).map(|t| t.name))
            .collect()
    }

    const ALL: [&str; 3] = ["gw-a", "gw-b", "gw-c"];

    #[test]
    fn off_until_a_node_list_then_slots_are_the_rendezvous_top_k() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", None);
        assert_eq!(n.on_accept(&[], 2, t), None);
        assert!(!n.is_on());
        assert_eq!(n.target(0, t), None);
        assert_eq!(n.on_accept(&list(&ALL), 2, t), Some(4));
        let want = rendezvous::top_k("demo", ALL, 2);
        let got = targets(&mut n, t);
        assert_eq!(got.len(), 2);
        for w in &want {
            assert!(got.contains(&Some(w.to_string())), "{got:?} vs {want:?}");
        }
        assert_eq!(n.slot_of(0), 0);
        assert_eq!(n.slot_of(1), 0);
        assert_eq!(n.slot_of(2), 1);
        // The address comes with it.
        let first = n.target(0, t).unwrap();
        let i = ALL.iter().position(|x| *x == first.name).unwrap();
        assert_eq!(
            first.addr,
            format!("127.0.0.{}:7000", i + 1).parse().unwrap()
        );
    }

    #[test]
    fn k_is_capped_by_the_nodes_known_and_only_grows() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", Some(3));
        assert_eq!(n.on_accept(&list(&ALL[..1]), 2, t), Some(2));
        assert_eq!(n.on_accept(&list(&ALL), 4, t), Some(6), "per_node is kept");
        assert_eq!(n.on_accept(&list(&ALL[..2]), 2, t), None);
        assert_eq!(n.total(), 6);
        // Three slots, two nodes: one slot goes to --gateway.
        let got = targets(&mut n, t);
        assert_eq!(got.iter().filter(|s| s.is_none()).count(), 1, "{got:?}");
    }

    #[test]
    fn an_excluded_node_moves_only_its_slot_and_comes_back_after_backoff() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", None);
        n.on_accept(&list(&ALL), 2, t);
        let before = targets(&mut n, t);
        let rank = rendezvous::rank("demo", ALL);
        let third = rank[2].to_string();
        let gone = before[0].clone().unwrap();
        let e0 = n.epoch();
        n.exclude(&gone, "connect failed", t);
        assert!(n.epoch() > e0);
        let after = targets(&mut n, t);
        assert_eq!(after[1], before[1], "the other slot stays");
        assert_eq!(
            after[0],
            Some(third.clone()),
            "the third-ranked node takes over"
        );
        assert_eq!(n.next_expiry(t), Some(EXCLUDE_FIRST));
        // Failing again while excluded does not lengthen the exclusion.
        n.exclude(&gone, "again", t + Duration::from_millis(500));
        assert_eq!(
            n.next_expiry(t + Duration::from_millis(500)),
            Some(Duration::from_millis(500))
        );
        let back = t + EXCLUDE_FIRST;
        assert_eq!(
            targets(&mut n, back),
            before,
            "back once the exclusion ran out"
        );
        // A second failure: 2 s.
        n.exclude(&gone, "still dead", back);
        assert_eq!(
            targets(&mut n, back + Duration::from_millis(1999))[0],
            Some(third)
        );
        assert_eq!(targets(&mut n, back + Duration::from_secs(2)), before);
        // Accepted: backoff resets.
        n.accepted(0, Some(&gone));
        n.exclude(&gone, "x", back + Duration::from_secs(3));
        assert_eq!(
            targets(&mut n, back + Duration::from_secs(4)),
            before,
            "1 s again"
        );
    }

    #[test]
    fn every_node_excluded_falls_back_to_the_bootstrap_address() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", None);
        n.on_accept(&list(&ALL), 1, t);
        for a in ALL {
            n.exclude(a, "down", t);
        }
        assert_eq!(targets(&mut n, t), vec![None, None]);
        assert_eq!(n.target(7, t), None, "an uplink beyond the slots");
    }

    #[test]
    fn bad_addresses_and_duplicates_are_left_out() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", None);
        let mut l = list(&ALL);
        l[1].tunnel = "not an address".into();
        l.push(AcceptNode {
            name: "gw-a".into(),
            tunnel: "10.9.9.9:1".into(),
        });
        n.on_accept(&l, 1, t);
        let got = targets(&mut n, t);
        assert!(!got.contains(&Some("gw-b".into())), "{got:?}");
        assert!(got.contains(&Some("gw-a".into())) && got.contains(&Some("gw-c".into())));
        assert_eq!(n.known.len(), 2);
        assert_eq!(n.known[0].addr, "127.0.0.1:7000".parse().unwrap());
        // An exclusion of a node that is no longer listed is dropped.
        n.exclude("gw-c", "x", t);
        n.on_accept(&list(&ALL[..2]), 1, t);
        assert!(n.excluded.is_empty());
    }

    #[test]
    fn uplink_0_refreshes_the_list_while_fewer_nodes_are_known_than_wanted() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", None);
        assert_eq!(n.refresh(0, t), Err(None), "off");
        n.on_accept(&list(&ALL[..1]), 2, t);
        assert_eq!(n.refresh(0, t), Err(Some(REFRESH)));
        assert_eq!(n.refresh(1, t + REFRESH), Err(None), "uplink 0 only");
        assert_eq!(n.refresh(0, t + REFRESH), Ok(()));
        let t2 = t + REFRESH;
        n.on_accept(&list(&ALL), 2, t2);
        assert_eq!(n.refresh(0, t2 + REFRESH), Err(None), "enough nodes known");
    }

    #[test]
    fn holding_and_json() {
        let t = Instant::now();
        let mut n = Nodes::new("demo", None);
        assert_eq!(n.json(t), "");
        n.on_accept(&list(&ALL), 2, t);
        n.accepted(0, Some("gw-a"));
        n.accepted(1, Some("gw-a"));
        n.accepted(2, Some("gw-b"));
        n.released(1, "gw-c");
        assert_eq!(n.on_nodes(), vec![("gw-a".into(), 2), ("gw-b".into(), 1)]);
        n.released(1, "gw-a");
        assert_eq!(n.on_nodes(), vec![("gw-a".into(), 1), ("gw-b".into(), 1)]);
        n.exclude("gw-c", "refused \"x\"\n\\", t);
        let j = n.json(t);
        assert!(
            j.starts_with("\"cluster\":{\"nodes_wanted\":2,\"uplinks_per_node\":2,"),
            "{j}"
        );
        assert!(
            j.contains(
                "\"on\":[{\"node\":\"gw-a\",\"uplinks\":1},{\"node\":\"gw-b\",\"uplinks\":1}]"
            ),
            "{j}"
        );
        assert!(
            j.contains(
                "\"excluded\":[{\"node\":\"gw-c\",\"ms_left\":1000,\"why\":\"refused x \"}]"
            ),
            "{j}"
        );
    }
}
