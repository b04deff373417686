//! ringtunnel: a thread-per-core HTTP tunnel gateway on io_uring (monoio).
//!
//! (module map written below once modules land)

pub mod admin;
pub mod agent;
pub mod bench;
pub mod config;
pub mod echo;
pub mod gateway;
pub mod http;
pub mod io;
pub mod proto;
pub mod demo;
pub mod route;
pub mod signals;
pub mod runtime;
