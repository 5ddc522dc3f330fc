# shellcheck shell=bash
# Sourced by the scripts that need root (scripts/run, scripts/test, scripts/reliability,
# bench/run). `elevate "$@"` returns at once when the script runs as root; otherwise it runs
# the script again through sudo. sudo resets the environment (its secure_path replaces PATH,
# HOME becomes root's), so the caller's PATH is passed through `env` (plus the sbin
# directories, where nft, mkfs.ext4 and losetup live), RUSTUP_HOME defaults to the caller's
# ~/.rustup (rustup's cargo finds no toolchain without it), and the caller's CARGO_*,
# RUSTUP_*, RUST_* and SANDPIT_* variables are kept with --preserve-env (by name, so a
# preset SANDPIT_BOOTSTRAP_TOKEN never shows in the process list).
elevate() {
  [ "$(id -u)" -eq 0 ] && return 0
  if ! command -v sudo >/dev/null; then
    echo "$0 needs root (network namespaces, nftables, mounts) and sudo is not installed: run it as root" >&2
    exit 1
  fi
  local keep
  local -a env=("PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin")
  keep=$(compgen -e | grep -E '^(CARGO_|RUSTUP_|RUST_|SANDPIT_)' | paste -sd, -) || true
  if [ -z "${RUSTUP_HOME:-}" ] && [ -d "$HOME/.rustup" ]; then
    env+=("RUSTUP_HOME=$HOME/.rustup")
  fi
  echo "$0: not root, running it again through sudo" >&2
  exec sudo ${keep:+"--preserve-env=$keep"} env "${env[@]}" "$0" "$@"
}
