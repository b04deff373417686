//! Cluster views for tests that drive a node's routing without etcd
//! (`Gateway::set_cluster_view`), as the registry would hand them.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ringtunnel::cluster::{ClusterView, NodeInfo, NodeState, SessionHold};

/// One node of a view: its name, the address peers dial, the address
/// agents dial, its core count.
pub type ViewNode = (String, SocketAddr, SocketAddr, u16);

/// A view at revision `rev` of ready `nodes`, in which `holders` hold
/// session "demo" (agent id 1) with TCP tunnel ports `tcp`.
pub fn view_of(
    rev: i64,
    nodes: impl IntoIterator<Item = ViewNode>,
    holders: &[&str],
    tcp: &[u16],
) -> ClusterView {
    let mut v = ClusterView {
        revision: rev,
        ..ClusterView::default()
    };
    for (name, peer, tunnel, cores) in nodes {
        v.nodes.insert(
            name.clone(),
            NodeInfo {
                name,
                peer,
                tunnel,
                cores,
                state: NodeState::Ready,
            },
        );
    }
    if !holders.is_empty() {
        let h: BTreeMap<String, SessionHold> = holders
            .iter()
            .map(|n| {
                let hold = SessionHold {
                    agent_id: 1,
                    tcp: tcp.to_vec(),
                };
                (n.to_string(), hold)
            })
            .collect();
        v.sessions.insert("demo".into(), h);
    }
    v
}
