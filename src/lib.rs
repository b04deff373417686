//! ringtunnel: a thread-per-core HTTP tunnel gateway on io_uring (monoio).
//!
//! (module map written below once modules land)

pub mod admin;
pub mod agent;
pub mod bench;
pub mod config;
pub mod demo;
pub mod echo;
pub mod gateway;
pub mod http;
pub mod io;
pub mod proto;
pub mod route;
pub mod runtime;
pub mod signals;
