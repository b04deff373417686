//! Raw TCP tunnels, agent side: which public port maps to which local
//! target, the line that tells the user where a tunnel is reachable, and
//! the stream of one public connection (connect, then bytes both ways).
//!
//! A connect failure resets the stream with BACKEND_CONNECT, so the
//! gateway closes the public connection at once. Once connected, the
//! agent answers with the "connected" RESPONSE and relays with
//! `io::relay::tcp_relay`: the local service's EOF becomes END (the public
//! client sees a half-close), END from the gateway shuts the local
//! socket's write side. A local service that stops reading is cut after
//! `--backend-timeout` without write progress.

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use monoio::net::TcpStream;

use super::AgentCore;
use crate::io::stats::{CoreStats, ErrorKind};
use crate::io::uplink::Stream;
use crate::proto::tcp::{TcpOpen, TCP_CONNECTED};
use crate::proto::ErrorCode;

/// The `--tcp` tunnels of an agent: local targets (resolved at start) and
/// the public ports the gateway granted, in the same order.
pub(crate) struct TcpTunnels {
    pub(crate) targets: Vec<SocketAddr>,
    pub(crate) granted: std::sync::Mutex<Vec<u16>>,
}

impl TcpTunnels {
    pub(crate) fn new(targets: Vec<SocketAddr>) -> TcpTunnels {
        TcpTunnels {
            targets,
            granted: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records the ports of an ACCEPT and, when they are new (the first
    /// ACCEPT, or a restarted gateway that picked other ports), prints
    /// where each tunnel is reachable (stdout: scripts and tests read it).
    pub(crate) fn accepted(&self, gateway_host: &str, ports: &[u16]) {
        let Ok(mut g) = self.granted.lock() else {
            return;
        };
        if *g == ports {
            return;
        }
        *g = ports.to_vec();
        drop(g);
        for (p, t) in ports.iter().zip(&self.targets) {
            tracing::info!(port = p, target = %t, "TCP tunnel open");
            println!("TCP tunnel: tcp://{gateway_host}:{p} -> {t}");
        }
    }

    fn target_of(&self, port: u16) -> Option<SocketAddr> {
        let g = self.granted.lock().ok()?;
        let i = g.iter().position(|p| *p == port)?;
        self.targets.get(i).copied()
    }
}

/// The host part of the `--gateway` address, for the printed address.
pub(crate) fn gateway_host(gateway: &str) -> String {
    let full = crate::config::gateway_addr(gateway);
    match full.rsplit_once(':') {
        Some((h, _)) => h.to_string(),
        None => full,
    }
}

/// Serves one TCP stream opened by the gateway.
pub(super) async fn serve_stream(core: Rc<AgentCore>, stream: Stream, head: Bytes) {
    let open = match TcpOpen::decode(&head) {
        Ok(o) => o,
        Err(_) => {
            core.stats.error(ErrorKind::Protocol);
            stream.reset(ErrorCode::ProtocolError);
            return;
        }
    };
    let Some(target) = core.shared.tcp.target_of(open.port) else {
        tracing::warn!(
            port = open.port,
            "TCP stream for a port this agent did not ask for"
        );
        core.stats.error(ErrorKind::Protocol);
        stream.reset(ErrorCode::ProtocolError);
        return;
    };
    let cfg = core.cfg();
    let sock =
        match monoio::time::timeout(cfg.connect_timeout, TcpStream::connect_addr(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return connect_failed(&core, &stream, target, &e.to_string()),
            Err(_) => return connect_failed(&core, &stream, target, "connect timed out"),
        };
    let _ = sock.set_nodelay(true);
    CoreStats::inc(&core.stats.requests);
    stream.send_head(Bytes::from_static(TCP_CONNECTED));
    let r = crate::io::relay::tcp_relay(sock, &stream, None, cfg.backend_timeout).await;
    tracing::debug!(
        port = open.port,
        client = %open.client,
        %target,
        to_local = r.received,
        from_local = r.sent,
        clean = r.clean,
        "TCP tunnel connection closed"
    );
}

fn connect_failed(core: &AgentCore, stream: &Stream, target: SocketAddr, why: &str) {
    tracing::warn!(%target, error = why, "TCP tunnel: cannot connect to the local service");
    core.stats.error(ErrorKind::BackendConnect);
    stream.reset(ErrorCode::BackendConnect);
}
