# shellcheck shell=bash
# Installs what perf/*.sh need, once, loudly. Sourced after scripts/lib.sh.

rt_apt_install() {
  local pkg=$1
  if [[ $(id -u) -ne 0 ]]; then
    rt_log "$pkg is missing and we are not root: install it with: sudo apt-get install -y $pkg"
    return 1
  fi
  if ! command -v apt-get >/dev/null; then
    rt_log "$pkg is missing and there is no apt-get here: install it with your package manager"
    return 1
  fi
  rt_log "installing $pkg (apt-get install -y $pkg)"
  if ! apt-get install -y "$pkg" >"$RT_TMP/apt-$pkg.log" 2>&1; then
    rt_log "apt-get install $pkg failed; retrying after apt-get update"
    if ! { apt-get update && apt-get install -y "$pkg"; } >>"$RT_TMP/apt-$pkg.log" 2>&1; then
      tail -n 5 "$RT_TMP/apt-$pkg.log" >&2
      rt_log "INSTALL FAILED: apt-get install -y $pkg (log above)"
      return 1
    fi
  fi
  rt_log "installed $pkg"
}

rt_need_perf() {
  if command -v perf >/dev/null && perf --version >/dev/null 2>&1; then return 0; fi
  rt_apt_install linux-perf || rt_die "perf is required (apt package linux-perf; linux-tools-\$(uname -r) on Ubuntu)"
  command -v perf >/dev/null || rt_die "linux-perf installed but no perf on PATH"
}

rt_need_inferno() {
  if command -v inferno-collapse-perf >/dev/null && command -v inferno-flamegraph >/dev/null; then
    return 0
  fi
  # cargo installs into ~/.cargo/bin, which may not be on PATH.
  local cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
  if [[ -x $cargo_bin/inferno-collapse-perf && -x $cargo_bin/inferno-flamegraph ]]; then
    PATH=$cargo_bin:$PATH
    return 0
  fi
  command -v cargo >/dev/null || rt_die "inferno is missing and so is cargo; install Rust, then: cargo install inferno"
  rt_log "installing inferno (cargo install inferno; takes a few minutes the first time)"
  if ! cargo install inferno >"$RT_TMP/cargo-install-inferno.log" 2>&1; then
    tail -n 10 "$RT_TMP/cargo-install-inferno.log" >&2
    rt_die "INSTALL FAILED: cargo install inferno (log above)"
  fi
  PATH=$cargo_bin:$PATH
  command -v inferno-collapse-perf >/dev/null || rt_die "inferno installed but inferno-collapse-perf is not on PATH"
  rt_log "installed inferno"
}

rt_need_strace() {
  command -v strace >/dev/null && return 0
  rt_apt_install strace || rt_die "strace is required for the fallback (apt package strace)"
}
