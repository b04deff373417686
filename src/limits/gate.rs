//! The state the gateway's listeners consult: shared by all cores
//! ([`GatewayLimits`], `Send + Sync`) and per core ([`CoreLimits`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conns::{ConnPermit, ConnRefusal, ConnTable};
use super::ip_rate::{IpCache, IpCells};
use super::rate::Gcra;
use super::strikes::{Strike, Strikes, StrikesConfig};
use crate::io::stats::ErrorKind;
use crate::scope::Rate;

/// Sessions a core keeps rate cells for before it forgets idle ones, and
/// sessions the `rate_limited_total` series are kept for (a bound on the
/// label's cardinality; the rest are summed under `session="_other"`).
pub const MAX_RATE_SESSIONS: usize = 1024;

/// The limits as configured (`None`: derived from RLIMIT_NOFILE at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `--max-conns`: public connections, all cores together.
    pub max_conns: Option<usize>,
    /// `--max-conns-per-ip` (peers in --trusted-proxies are exempt);
    /// `None`: a quarter of `max_conns`, at least
    /// `defaults::MIN_CONNS_PER_IP`.
    pub max_conns_per_ip: Option<u32>,
    /// `--fd-reserve`: descriptors the public listener leaves for uplinks,
    /// the admin endpoint and the runtime.
    pub fd_reserve: Option<usize>,
    /// `--max-handshakes`: tunnel handshakes in progress per core.
    pub max_handshakes: usize,
    pub strikes: StrikesConfig,
    /// `--session-rate` / `--session-burst`: every session's request rate
    /// unless the token rule that claimed it has its own.
    pub session_rate: Option<Rate>,
    pub session_burst: Option<u32>,
    /// `--rate-per-ip` / `--burst-per-ip`: requests per client IP within
    /// each session unless the token rule has its own `rate_per_ip`.
    pub rate_per_ip: Option<Rate>,
    pub burst_per_ip: Option<u32>,
    /// `--rate-ip-table`: per-IP rate cells kept (all sessions), and per
    /// core cached.
    pub rate_ip_table: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        use crate::config::defaults as d;
        LimitsConfig {
            max_conns: None,
            max_conns_per_ip: None,
            fd_reserve: None,
            max_handshakes: d::MAX_HANDSHAKES,
            strikes: StrikesConfig {
                limit: d::HANDSHAKE_FAIL_LIMIT,
                window: d::HANDSHAKE_FAIL_WINDOW,
                ban: d::HANDSHAKE_BAN,
                max_ban: d::HANDSHAKE_MAX_BAN,
            },
            session_rate: None,
            session_burst: None,
            rate_per_ip: None,
            burst_per_ip: None,
            rate_ip_table: d::RATE_IP_TABLE,
        }
    }
}

impl LimitsConfig {
    /// The reserve for a given fd limit: 64 or 5%, whichever is larger,
    /// but never more than half the limit.
    pub fn reserve_for(&self, nofile: u64) -> u64 {
        let auto = 64.max(nofile / 20);
        (self.fd_reserve.map(|r| r as u64).unwrap_or(auto)).min(nofile / 2)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_conns == Some(0) {
            return Err("--max-conns must be at least 1".into());
        }
        if self.max_conns_per_ip == Some(0) {
            return Err("--max-conns-per-ip must be at least 1".into());
        }
        if self.max_handshakes == 0 {
            return Err("--max-handshakes must be at least 1".into());
        }
        if self.session_burst == Some(0) {
            return Err("--session-burst must be at least 1".into());
        }
        if self.session_burst.is_some() && self.session_rate.is_none() {
            return Err("--session-burst needs --session-rate".into());
        }
        if self.burst_per_ip == Some(0) {
            return Err("--burst-per-ip must be at least 1".into());
        }
        if self.burst_per_ip.is_some() && self.rate_per_ip.is_none() {
            return Err("--burst-per-ip needs --rate-per-ip".into());
        }
        if self.rate_ip_table == 0 {
            return Err("--rate-ip-table must be at least 1".into());
        }
        Ok(())
    }
}

/// The request rates of one session: its own, and each client IP's
/// within it (`None`: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionRates {
    pub session: Option<(Rate, u32)>,
    pub per_ip: Option<(Rate, u32)>,
}

/// Which rate refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateScope {
    Session,
    Ip,
}

impl RateScope {
    pub fn label(self) -> &'static str {
        match self {
            RateScope::Session => "session",
            RateScope::Ip => "ip",
        }
    }
}

/// A rate and its burst (a missing burst is one period's worth).
pub fn rate_with_burst(rate: Rate, burst: Option<u32>) -> (Rate, u32) {
    (rate, burst.unwrap_or(rate.n).max(1))
}

/// `--max-conns` and `--max-conns-per-ip`, defaults resolved.
fn conn_limits(cfg: &LimitsConfig, fd_ceiling: u64) -> (usize, u32) {
    // Each public connection is one fd; the ceiling already leaves the
    // reserve for everything else.
    let max_conns = cfg.max_conns.unwrap_or(fd_ceiling as usize).max(1);
    // One IP may hold a quarter of the slots: a local benchmark at 1000
    // connections fits a default-sized gateway, a single remote host
    // cannot take all of it.
    let max_conns_per_ip = cfg.max_conns_per_ip.unwrap_or_else(|| {
        let quarter = u32::try_from(max_conns / 4).unwrap_or(u32::MAX);
        quarter.max(crate::config::defaults::MIN_CONNS_PER_IP)
    });
    (max_conns, max_conns_per_ip)
}

/// Shared by every core of one gateway.
pub struct GatewayLimits {
    pub cfg: LimitsConfig,
    pub conns: Arc<ConnTable>,
    /// Public accepts stop at this fd number (RLIMIT_NOFILE - reserve).
    pub fd_ceiling: u64,
    pub strikes: Strikes,
    /// Whether loopback clients skip the per-IP cap: while it is the
    /// default one (no `--max-conns-per-ip`); a reload may change it.
    loopback_exempt: AtomicBool,
    /// Time origin of the rate cells.
    epoch: Instant,
    /// session -> its cell; taken the first time a core sees a session.
    cells: Mutex<HashMap<String, Arc<Gcra>>>,
    /// Per core: session -> requests refused with 429 [by the session's
    /// rate, by a client IP's]; each core locks only its own map, and only
    /// on a 429 (the admin thread reads them).
    refused: Vec<Mutex<HashMap<String, [u64; 2]>>>,
    /// Per-(session, client IP) cells.
    pub ip_cells: IpCells,
}

impl GatewayLimits {
    /// Resolves the fd-derived defaults against `nofile` (the soft limit,
    /// after raising it).
    pub fn new(cfg: LimitsConfig, nofile: u64, cores: usize) -> GatewayLimits {
        // 0: the limit could not be read; assume the common default.
        let nofile = if nofile == 0 { 1024 } else { nofile };
        let reserve = cfg.reserve_for(nofile);
        let fd_ceiling = nofile.saturating_sub(reserve);
        let (max_conns, max_conns_per_ip) = conn_limits(&cfg, fd_ceiling);
        GatewayLimits {
            conns: ConnTable::new(max_conns, max_conns_per_ip),
            fd_ceiling,
            loopback_exempt: AtomicBool::new(cfg.max_conns_per_ip.is_none()),
            strikes: Strikes::new(cfg.strikes),
            epoch: Instant::now(),
            cells: Mutex::new(HashMap::new()),
            refused: (0..cores).map(|_| Mutex::new(HashMap::new())).collect(),
            ip_cells: IpCells::new(cfg.rate_ip_table),
            cfg,
        }
    }

    /// `--max-conns` in force.
    pub fn max_conns(&self) -> usize {
        self.conns.max_total()
    }

    /// `--max-conns-per-ip` in force.
    pub fn max_conns_per_ip(&self) -> u32 {
        self.conns.max_per_ip()
    }

    /// A reload: applies the new connection limits (defaults derived from
    /// the fd ceiling fixed at start-up, as then). Rates are read from the
    /// reloaded configuration by each core once its cache is cleared;
    /// everything else here (fd reserve, handshake cap and bans, the size
    /// of the per-IP rate table) stays as started.
    pub fn apply(&self, cfg: &LimitsConfig) {
        let (total, per_ip) = conn_limits(cfg, self.fd_ceiling);
        self.conns.set_limits(total, per_ip);
        self.loopback_exempt
            .store(cfg.max_conns_per_ip.is_none(), Ordering::Relaxed);
    }

    /// Admits a public connection whose accepted fd is `fd`. The kernel
    /// hands out the lowest free descriptor, so an fd numbered `n` means at
    /// least `n + 1` are open: once that reaches the ceiling, the public
    /// side stops and the reserve stays for agents. (With holes in the fd
    /// table this undercounts; at saturation the table is dense.)
    pub fn admit_public(
        &self,
        fd: RawFd,
        ip: IpAddr,
        trusted_proxy: bool,
    ) -> Result<ConnPermit, ErrorKind> {
        if fd as u64 + 1 >= self.fd_ceiling {
            return Err(ErrorKind::FdReserve);
        }
        // The default per-IP cap is for remote hosts: a loopback client is
        // the gateway's own host (a local proxy, a load generator), which
        // could take every slot anyway. A cap set explicitly applies to it.
        let loopback_exempt = self.loopback_exempt.load(Ordering::Relaxed) && ip.is_loopback();
        let per_ip = !trusted_proxy && !loopback_exempt;
        self.conns.acquire(ip, per_ip).map_err(|r| match r {
            ConnRefusal::Total | ConnRefusal::PerIp => ErrorKind::ConnLimit,
        })
    }

    /// Admits a tunnel connection from `ip` on a core, or says why not.
    pub fn admit_handshake(
        &self,
        core: &CoreLimits,
        ip: IpAddr,
    ) -> Result<HandshakeSlot, ErrorKind> {
        if self.strikes.banned(ip, Instant::now()).is_some() {
            return Err(ErrorKind::HandshakeLimit);
        }
        let n = core.handshakes.get();
        if n >= self.cfg.max_handshakes {
            return Err(ErrorKind::HandshakeLimit);
        }
        core.handshakes.set(n + 1);
        Ok(HandshakeSlot(core.handshakes.clone()))
    }

    /// A handshake from `ip` was refused; logs a ban when one starts.
    pub fn handshake_failed(&self, ip: IpAddr) {
        match self.strikes.fail(ip, Instant::now()) {
            Strike::Banned(d) => tracing::warn!(
                peer = %ip,
                ban_secs = d.as_secs_f64(),
                "too many failed tunnel handshakes: peer's connections are closed at accept"
            ),
            Strike::Untracked => tracing::debug!(peer = %ip, "handshake failure table full"),
            Strike::Counted(_) => {}
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The shared cell of `session`, made from `limit` on first use or
    /// when the session's limit changed.
    fn cell(&self, session: &str, (rate, burst): (Rate, u32)) -> Arc<Gcra> {
        let mut m = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(session) {
            if c.rate == rate && c.burst == burst {
                return c.clone();
            }
        }
        if m.len() >= MAX_RATE_SESSIONS * 4 {
            // Cells of sessions no core still caches are only refs here.
            m.retain(|_, c| Arc::strong_count(c) > 1);
        }
        let c = Arc::new(Gcra::new(rate, burst));
        m.insert(session.to_string(), c.clone());
        c
    }

    /// Counts a 429 for `session` on `core`.
    pub fn count_refused(&self, core: usize, session: &str, scope: RateScope) {
        let Some(m) = self.refused.get(core) else {
            return;
        };
        let i = scope as usize;
        let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(session) {
            n[i] += 1;
        } else if m.len() < MAX_RATE_SESSIONS {
            let mut n = [0; 2];
            n[i] = 1;
            m.insert(session.to_string(), n);
        } else {
            m.entry("_other".to_string()).or_insert([0; 2])[i] += 1;
        }
    }

    /// 429s per session ([session rate, client IP rate]), all cores
    /// summed, sorted by name.
    pub fn refused_by_session(&self) -> Vec<(String, [u64; 2])> {
        let mut all: HashMap<String, [u64; 2]> = HashMap::new();
        for m in &self.refused {
            for (k, v) in m.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let a = all.entry(k.clone()).or_insert([0; 2]);
                a[0] += v[0];
                a[1] += v[1];
            }
        }
        let mut v: Vec<_> = all.into_iter().collect();
        v.sort();
        v
    }
}

/// A session's rates as a core caches them.
struct CachedRates {
    cell: Option<Arc<Gcra>>,
    per_ip: Option<(Rate, u32)>,
}

/// One core's part: its handshakes in progress and its cache of rate
/// cells (so the shared maps' locks are taken once per session, and once
/// per (session, IP), per core).
#[derive(Default)]
pub struct CoreLimits {
    handshakes: Rc<Cell<usize>>,
    cells: RefCell<HashMap<String, CachedRates>>,
    ips: IpCache,
}

impl CoreLimits {
    pub fn handshakes(&self) -> usize {
        self.handshakes.get()
    }

    /// Admits one request of `session` from client `ip` (`None`: exempt
    /// from the per-IP rate, e.g. a trusted proxy) under `limits` (from the
    /// rule that claimed it, else the gateway's defaults), or says which
    /// rate refused it and how long until one would pass. The client's
    /// rate is checked first, so a client over its own rate does not spend
    /// the session's.
    pub fn check_rate(
        &self,
        shared: &GatewayLimits,
        session: &str,
        ip: Option<IpAddr>,
        limits: impl FnOnce() -> SessionRates,
    ) -> Result<(), (RateScope, Duration)> {
        let now = shared.now_ns();
        // The common case, a cached entry, is checked in place: no clone of
        // the shared `Arc` (whose count is a cache line every core touches).
        if let Some(cached) = self.cells.borrow().get(session) {
            return self.check_cached(shared, session, ip, cached, now);
        }
        let l = limits();
        let cached = CachedRates {
            cell: l.session.map(|l| shared.cell(session, l)),
            per_ip: l.per_ip,
        };
        let verdict = self.check_cached(shared, session, ip, &cached, now);
        let mut m = self.cells.borrow_mut();
        if m.len() >= MAX_RATE_SESSIONS {
            m.clear();
        }
        m.insert(session.to_string(), cached);
        verdict
    }

    fn check_cached(
        &self,
        shared: &GatewayLimits,
        session: &str,
        ip: Option<IpAddr>,
        c: &CachedRates,
        now: u64,
    ) -> Result<(), (RateScope, Duration)> {
        if let (Some(lim), Some(ip)) = (c.per_ip, ip) {
            self.ips
                .check(&shared.ip_cells, session, ip, lim, now)
                .map_err(|w| (RateScope::Ip, w))?;
        }
        match &c.cell {
            Some(g) => g.check(now).map_err(|w| (RateScope::Session, w)),
            None => Ok(()),
        }
    }

    /// Forgets the cached limits of `session` (its claim changed).
    pub fn forget(&self, session: &str) {
        self.cells.borrow_mut().remove(session);
        self.ips.forget(session);
    }

    /// Forgets every cached limit (a reload may have changed them).
    pub fn forget_all(&self) {
        self.cells.borrow_mut().clear();
        self.ips.clear();
    }
}

/// A handshake in progress on this core; the count drops with it.
pub struct HandshakeSlot(Rc<Cell<usize>>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_fd_limit() {
        let c = LimitsConfig::default();
        assert_eq!(c.reserve_for(1024), 64);
        assert_eq!(c.reserve_for(65536), 3276);
        assert_eq!(c.reserve_for(100), 50);
        let g = GatewayLimits::new(c, 1024, 2);
        assert_eq!(g.fd_ceiling, 960);
        assert_eq!(g.max_conns(), 960);
        assert_eq!(g.max_conns_per_ip(), 256);
        let g = GatewayLimits::new(LimitsConfig::default(), 65536, 2);
        assert_eq!(g.max_conns_per_ip(), (65536 - 3276) / 4);
        // A reload resolves the defaults against the same ceiling.
        g.apply(&LimitsConfig {
            max_conns: Some(100),
            ..LimitsConfig::default()
        });
        assert_eq!((g.max_conns(), g.max_conns_per_ip()), (100, 256));
    }

    #[test]
    fn public_admission_keeps_the_reserve() {
        let g = GatewayLimits::new(LimitsConfig::default(), 1024, 1);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(g.admit_public(100, ip, false).is_ok());
        assert_eq!(
            g.admit_public(959, ip, false).err(),
            Some(ErrorKind::FdReserve)
        );
    }

    #[test]
    fn default_per_ip_cap_spares_loopback_an_explicit_one_does_not() {
        let cfg = |per_ip| LimitsConfig {
            max_conns_per_ip: per_ip,
            ..LimitsConfig::default()
        };
        let (lo, remote): (IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "192.0.2.7".parse().unwrap());
        // Default cap: 256 (the floor) on a 1024-fd gateway.
        let g = GatewayLimits::new(cfg(None), 1024, 1);
        let mut held = Vec::new();
        for fd in 0..300 {
            held.push(g.admit_public(10 + fd, lo, false).expect("loopback spared"));
        }
        for fd in 0..256 {
            held.push(g.admit_public(400 + fd, remote, false).unwrap());
        }
        assert_eq!(
            g.admit_public(700, remote, false).err(),
            Some(ErrorKind::ConnLimit)
        );
        drop(held);
        // Set explicitly, it applies to loopback too; a reload back to the
        // default spares it again.
        let g = GatewayLimits::new(cfg(Some(2)), 1024, 1);
        let _a = (g.admit_public(10, lo, false), g.admit_public(11, lo, false));
        assert_eq!(
            g.admit_public(12, lo, false).err(),
            Some(ErrorKind::ConnLimit)
        );
        g.apply(&cfg(None));
        assert!(g.admit_public(12, lo, false).is_ok());
    }

    #[test]
    fn handshake_cap_per_core() {
        let cfg = LimitsConfig {
            max_handshakes: 2,
            ..LimitsConfig::default()
        };
        let g = GatewayLimits::new(cfg, 1024, 1);
        let core = CoreLimits::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = g.admit_handshake(&core, ip).unwrap();
        let _b = g.admit_handshake(&core, ip).unwrap();
        assert!(g.admit_handshake(&core, ip).is_err());
        drop(a);
        assert_eq!(core.handshakes(), 1);
        assert!(g.admit_handshake(&core, ip).is_ok());
    }

    #[test]
    fn one_cell_per_session_across_cores() {
        let g = GatewayLimits::new(LimitsConfig::default(), 1024, 2);
        let (c0, c1) = (CoreLimits::default(), CoreLimits::default());
        let lim = || SessionRates {
            session: Some(rate_with_burst("1/h".parse().unwrap(), Some(3))),
            per_ip: None,
        };
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let ok = (0..4)
            .filter(|i| {
                let c = if i % 2 == 0 { &c0 } else { &c1 };
                c.check_rate(&g, "s", Some(ip), lim).is_ok()
            })
            .count();
        assert_eq!(ok, 3);
        let none = SessionRates::default;
        assert!(c0.check_rate(&g, "other", Some(ip), none).is_ok());
        g.count_refused(1, "s", RateScope::Session);
        g.count_refused(0, "s", RateScope::Session);
        g.count_refused(0, "s", RateScope::Ip);
        assert_eq!(g.refused_by_session(), vec![("s".to_string(), [2, 1])]);
    }

    #[test]
    fn a_client_over_its_rate_does_not_spend_the_sessions() {
        let g = GatewayLimits::new(LimitsConfig::default(), 1024, 1);
        let core = CoreLimits::default();
        let lim = || SessionRates {
            session: Some(rate_with_burst("1/h".parse().unwrap(), Some(4))),
            per_ip: Some(rate_with_burst("1/h".parse().unwrap(), Some(2))),
        };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let verdicts: Vec<_> = (0..4)
            .map(|_| core.check_rate(&g, "s", Some(a), lim).map_err(|e| e.0))
            .collect();
        assert_eq!(
            verdicts,
            vec![Ok(()), Ok(()), Err(RateScope::Ip), Err(RateScope::Ip)]
        );
        // The session had 4; `a` spent 2, `b` gets the other 2, then the
        // session's own rate refuses (an exempt client counts there only).
        assert!(core.check_rate(&g, "s", Some(b), lim).is_ok());
        assert!(core.check_rate(&g, "s", None, lim).is_ok());
        let e = core.check_rate(&g, "s", Some(b), lim).unwrap_err();
        assert_eq!(e.0, RateScope::Session);
    }
}
