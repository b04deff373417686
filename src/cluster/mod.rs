//! Many gateways as one: the cluster's shared vocabulary.
//!
//! Clustering is off unless `--cluster-etcd` is given; a single node needs
//! none of this. With it, every node registers itself and the sessions it
//! holds uplinks for in etcd under its own lease (`registry.rs`, a
//! control-plane thread per node that never runs on a core), watches the
//! same prefixes, and pushes each new [`ClusterView`] to its cores as an
//! `Arc` snapshot through their mailboxes. Cores read their snapshot once
//! per request that has no local uplink; the request path never waits on
//! etcd.
//!
//! The etcd key layout (values are JSON):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/ringtunnel/v1/nodes/{node}` | [`NodeInfo`] | the node's |
//! | `/ringtunnel/v1/sessions/{session}/{node}` | [`SessionHold`] (`{"agent_id":N,"tcp":[..]}`, `tcp` left out when empty) | the node's |
//!
//! A node that dies stops renewing its lease; etcd deletes its keys when
//! the lease's TTL passes. Peers do not wait for that: a peer link that
//! drops marks the node unreachable on that core at once (`peer.rs`).

pub mod etcd;
pub mod peer;
pub mod prefix;
pub mod registry;
pub mod rendezvous;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

/// The prefix of every key ringtunnel writes.
pub const PREFIX: &str = "/ringtunnel/v1/";
/// Node keys: `{NODES_PREFIX}{node}`.
pub const NODES_PREFIX: &str = "/ringtunnel/v1/nodes/";
/// Session keys: `{SESSIONS_PREFIX}{session}/{node}`.
pub const SESSIONS_PREFIX: &str = "/ringtunnel/v1/sessions/";

/// Default TTL of a node's etcd lease (`--cluster-lease-ttl`).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// How a gateway joins a cluster (`--cluster-etcd` and friends).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://10.0.0.1:2379`), tried in order.
    pub etcd: Vec<String>,
    /// This node's name: unique in the cluster, a valid session-name
    /// shape (a-z, 0-9, '-').
    pub node: String,
    /// Where this node accepts peer links (`--peer-listen`).
    pub peer_listen: String,
    /// The host other nodes and agents use to reach this node
    /// (`--advertise`); `None`: the host of `--peer-listen`, which then
    /// must not be unspecified (0.0.0.0 / ::).
    pub advertise: Option<String>,
    /// Shared secret every node presents on its peer links
    /// (`--cluster-secret`, env `RINGTUNNEL_CLUSTER_SECRET`): a peer link
    /// can open streams to any session, so a stranger must not get one.
    pub secret: String,
    /// TTL of the node's etcd lease (`--cluster-lease-ttl`).
    pub lease_ttl: Duration,
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("--cluster-etcd: at least one etcd URL".into());
        }
        for u in &self.etcd {
            if !u.starts_with("http://") {
                return Err(format!(
                    "--cluster-etcd {u}: an http:// URL (etcd's client URL)"
                ));
            }
        }
        if !crate::proto::valid_session_name(&self.node) {
            return Err(format!(
                "--node-name {:?}: 1..=63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
                self.node
            ));
        }
        if self.secret.len() < 16 {
            return Err(
                "--cluster-secret: at least 16 characters (every node must present it on its peer links)"
                    .into(),
            );
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err("--cluster-lease-ttl: at least 2 s".into());
        }
        if self.advertise.is_none() {
            let host = self
                .peer_listen
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']))
                .unwrap_or("");
            if host.is_empty() || host == "0.0.0.0" || host == "::" {
                return Err(format!(
                    "--peer-listen {}: an unspecified address needs --advertise HOST (how other nodes and agents reach this one)",
                    self.peer_listen
                ));
            }
        }
        Ok(())
    }
}

/// Whether a node takes new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    Ready,
    /// Finishing what it has: peers forward to it only for sessions no
    /// ready node holds, agents move their uplinks elsewhere.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ready" => Some(NodeState::Ready),
            "draining" => Some(NodeState::Draining),
            _ => None,
        }
    }
}

/// One node as registered in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Where its peer links are accepted.
    pub peer: SocketAddr,
    /// Where agents connect their uplinks.
    pub tunnel: SocketAddr,
    pub cores: u16,
    pub state: NodeState,
}

/// A node's hold on a session, as registered in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionHold {
    /// The agent holding it (HELLO's agent id): two nodes holding the
    /// same name for different agents is a conflict the later claim
    /// loses.
    pub agent_id: u64,
    /// The session's granted TCP tunnel ports on that node, in the
    /// agent's `--tcp` order (JSON `"tcp":[..]`, left out when empty;
    /// readers that predate it ignore it). Every other node opens a
    /// listener for each and forwards its connections here
    /// (`gateway::tcp`).
    pub tcp: Vec<u16>,
}

/// What a node knows of the cluster: the registered nodes and which
/// nodes hold which sessions. Built by the control plane from etcd,
/// handed to the cores whole (`Arc`), never mutated after.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// etcd revision this view reflects (0: not read yet).
    pub revision: i64,
    pub nodes: BTreeMap<String, NodeInfo>,
    /// session -> node -> hold.
    pub sessions: HashMap<String, BTreeMap<String, SessionHold>>,
}

impl ClusterView {
    /// Nodes other than `me` holding `session`, ready ones first (by
    /// name within each group, so every core and node agrees on the
    /// order), nodes unknown to `nodes` left out.
    pub fn holders<'a>(&'a self, session: &str, me: &str) -> Vec<&'a NodeInfo> {
        let Some(h) = self.sessions.get(session) else {
            return Vec::new();
        };
        let mut v: Vec<&NodeInfo> = h
            .keys()
            .filter(|n| n.as_str() != me)
            .filter_map(|n| self.nodes.get(n))
            .collect();
        v.sort_by_key(|n| (n.state != NodeState::Ready, n.name.as_str()));
        v
    }

    /// Ready nodes, by name.
    pub fn ready_nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values().filter(|n| n.state == NodeState::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, state: NodeState) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            peer: "127.0.0.1:7100".parse().unwrap(),
            tunnel: "127.0.0.1:7000".parse().unwrap(),
            cores: 2,
            state,
        }
    }

    #[test]
    fn holders_put_ready_nodes_first_and_skip_me_and_unknown_nodes() {
        let mut v = ClusterView::default();
        for (n, s) in [
            ("a", NodeState::Draining),
            ("b", NodeState::Ready),
            ("me", NodeState::Ready),
        ] {
            v.nodes.insert(n.into(), node(n, s));
        }
        let hold = SessionHold {
            agent_id: 1,
            tcp: Vec::new(),
        };
        let h: BTreeMap<String, SessionHold> = ["a", "b", "me", "gone"]
            .iter()
            .map(|n| (n.to_string(), hold.clone()))
            .collect();
        v.sessions.insert("s".into(), h);
        let names: Vec<&str> = v
            .holders("s", "me")
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(names, ["b", "a"]);
        assert!(v.holders("other", "me").is_empty());
    }

    #[test]
    fn config_needs_an_advertised_host_for_a_wildcard_peer_listen() {
        let mut c = ClusterConfig {
            etcd: vec!["http://127.0.0.1:2379".into()],
            node: "n1".into(),
            peer_listen: "0.0.0.0:7100".into(),
            advertise: None,
            secret: "0123456789abcdef".into(),
            lease_ttl: DEFAULT_LEASE_TTL,
        };
        assert!(c.validate().unwrap_err().contains("--advertise"));
        c.advertise = Some("10.0.0.1".into());
        c.validate().unwrap();
        c.secret = "short".into();
        assert!(c.validate().unwrap_err().contains("--cluster-secret"));
    }
}
