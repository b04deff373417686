//! Starting the echo backend on its own per-core workers.

use std::net::SocketAddr;
use std::rc::Rc;

use crate::config::EchoServerConfig;

/// A running echo backend; its workers live as long as the process.
pub struct EchoServer {
    addr: SocketAddr,
    _workers: crate::runtime::Workers,
}

impl EchoServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

pub fn start(cfg: EchoServerConfig) -> std::io::Result<EchoServer> {
    crate::runtime::raise_nofile_limit();
    let addr = crate::runtime::reserve_listen_addr(&cfg.listen)?;
    let n = cfg.cores.cores;
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(n);
    let delay_ms = cfg.delay_ms;
    let workers = crate::runtime::spawn_workers(&cfg.cores.spec("echo"), move |i| {
        let ready = ready_tx.clone();
        async move {
            let listener = match crate::runtime::bind_reuseport(addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready.send(Err(format!("echo core {i}: {e}")));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            drop(ready);
            let cfg = Rc::new(super::EchoConfig {
                delay_ms,
                ..super::EchoConfig::default()
            });
            super::serve(listener, cfg).await;
        }
    })?;
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(std::io::Error::other(e)),
            Err(_) => return Err(std::io::Error::other("echo worker died during start-up")),
        }
    }
    Ok(EchoServer {
        addr,
        _workers: workers,
    })
}
