//! ringtunnel: a thread-per-core HTTP tunnel gateway on io_uring (monoio).
//!
//! Public HTTP requests reach the gateway, are routed by Host to a session
//! (an agent next to a private backend), travel as frames over one of the
//! agent's uplinks, and the response streams back the same way.
//!
//! ```text
//!  client --HTTP/1.1--> gateway core k --frames (uplink)--> agent core j --HTTP/1.1--> backend
//!                       gateway/public.rs  io/uplink.rs      agent/backend.rs
//! ```
//!
//! # Layout
//!
//! - [`runtime`]: the only place that creates threads: one monoio runtime
//!   per core, pinning, io_uring/epoll choice, panic isolation per task,
//!   cross-core mailboxes, single-core wake-ups.
//! - [`proto`], [`http`], [`route`], [`trust`], [`scope`]: sans-IO. The
//!   frame codec and handshake payloads; the uplink connection as a state
//!   machine ([`proto::conn::Connection`]: stream table, credit both ways,
//!   out-queue, deadlines, limits, time passed in); HTTP/1.x heads, body
//!   decoders, forwarding encoders and PROXY headers; Host -> session;
//!   which peers are trusted proxies; which token may claim which name.
//!   Bytes in, values out; no sockets, no clocks.
//! - [`io`]: socket loops. An [`io::uplink::Uplink`] drives one
//!   connection's state machine: its reader, its single batched writer
//!   ([`io::batch`]) and its timer, waking exactly the streams an event
//!   names; [`io::relay`] holds the pumps between an HTTP socket and a
//!   stream that both edges use; [`io::transport`] carries a connection
//!   (plain TCP or TLS) through its handshake and splits it for the
//!   uplink; [`io::watchdog`] enforces deadlines by shutting sockets down;
//!   [`io::stats`] holds per-core counters.
//! - [`tls`]: rustls settings of the uplink, loaded from PEM at start-up,
//!   and what a failed TLS handshake means for an agent; [`sni`]: the
//!   public HTTPS edge's certificates, chosen by SNI.
//! - [`gateway`], [`agent`], [`echo`], [`bench`](mod@bench), [`demo`]: the programs.
//! - [`limits`]: connection limits, the fd reserve, per-session rates,
//!   handshake bans and accept back-off.
//! - [`cluster`]: many gateways as one: the shared vocabulary, the etcd
//!   client and the node's registry (control-plane threads that push
//!   cluster views to the cores), rendezvous hashing.
//! - [`admin`]: `/metrics` and `/stats`; [`config`]: validated settings;
//!   [`config_file`]: the TOML file behind `--config`; [`signals`]:
//!   SIGTERM/SIGINT/SIGHUP as flags.
//!
//! Invariants: no lock or async lock on the frame path (each uplink's
//! state is owned by one core); a panic ends one task, never a core; a
//! malformed frame closes one uplink; memory per uplink is bounded by the
//! flow-control windows. docs/ARCHITECTURE.md follows one request through
//! these files; docs/PROTOCOL.md specifies the wire format.

pub mod admin;
pub mod agent;
pub mod bench;
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod demo;
pub mod echo;
pub mod gateway;
pub mod http;
pub mod inspect;
pub mod io;
pub mod limits;
pub mod proto;
pub mod route;
pub mod runtime;
pub mod scope;
pub mod signals;
pub mod sni;
pub mod tls;
pub mod trust;
