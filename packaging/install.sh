#!/bin/bash
# packaging/install.sh -- install streamtap as a systemd service (`make install`). Needs root.
# Idempotent: a second run changes nothing and says so. What it does:
#   1. $STREAMTAP_PREFIX (/opt/streamtap): a venv of $STREAMTAP_PYTHON (/usr/bin/python3, which
#      the service user can execute) with this repository installed non-editable, only when the
#      source changed (sha256 of pyproject.toml, README.md and daemon/ sinks/ config/, kept in
#      $PREFIX/.source-hash); plus bin/streamtap-service, the unit's wrapper.
#   2. streamtap@.service into $STREAMTAP_UNITDIR (/etc/systemd/system), sysusers.d and
#      tmpfiles.d files into $STREAMTAP_SYSUSERSDIR / $STREAMTAP_TMPFILESDIR (/etc/...), then
#      creates the user and directories (systemd-sysusers / systemd-tmpfiles, else useradd/mkdir).
#   3. Configs into $STREAMTAP_ETC (/etc/streamtap) only when absent: an operator's file is never
#      overwritten (streamtap.yaml, eth0.yaml.example, eth0.env.example).
#   4. systemctl daemon-reload, only when systemd runs (PID 1) and a unit file changed.
# Paths other than the defaults are written into the installed unit, wrapper and tmpfiles file.
# STREAMTAP_APPLY=0 skips creating the user and directories and the daemon-reload.
set -euo pipefail

PREFIX=${STREAMTAP_PREFIX:-/opt/streamtap}
ETC=${STREAMTAP_ETC:-/etc/streamtap}
UNITDIR=${STREAMTAP_UNITDIR:-/etc/systemd/system}
SYSUSERSDIR=${STREAMTAP_SYSUSERSDIR:-/etc/sysusers.d}
TMPFILESDIR=${STREAMTAP_TMPFILESDIR:-/etc/tmpfiles.d}
PYTHON=${STREAMTAP_PYTHON:-/usr/bin/python3}
APPLY=${STREAMTAP_APPLY:-1}

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname -- "$here")
changed=0
units_changed=0

say() { printf 'streamtap install: %s\n' "$*"; }
die() { printf 'streamtap install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs into $PREFIX, $UNITDIR and creates a user)"
[ -f "$repo/pyproject.toml" ] || die "no pyproject.toml in $repo"
"$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON: need Python >= 3.11 with venv (apt-get install python3-venv)"

# the installed text of a packaged file: default paths replaced by the chosen ones
render() {
    sed -e "s|/opt/streamtap|$PREFIX|g" -e "s|/etc/streamtap|$ETC|g" -e "s|@ETC@|$ETC|g" "$1"
}

# install_file SRC DEST MODE: (re)write DEST only when its content or mode differs
install_file() {
    local src=$1 dest=$2 mode=$3 tmp
    tmp=$(mktemp)
    render "$src" >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest" \
        && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        rm -f "$tmp"
        return 1
    fi
    mkdir -p "$(dirname -- "$dest")"
    install -m "$mode" -o root -g root "$tmp" "$dest"
    rm -f "$tmp"
    say "installed $dest"
    changed=1
    return 0
}

# install_config SRC DEST: only when DEST does not exist
install_config() {
    local src=$1 dest=$2 mode=${3:-0644}
    if [ -e "$dest" ]; then
        return 0
    fi
    mkdir -p "$(dirname -- "$dest")"
    install -m "$mode" -o root -g root "$src" "$dest"
    say "installed $dest (example config; never overwritten)"
    changed=1
}

source_hash() {
    (
        cd "$repo"
        {
            printf '%s\n' "$("$PYTHON" -c 'import sys; print(sys.version)')"
            find pyproject.toml README.md LICENSE daemon sinks config -type f \
                ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null \
                | LC_ALL=C sort -z | xargs -0 sha256sum
        } | sha256sum | cut -d' ' -f1
    )
}

# -- 1. the venv ----------------------------------------------------------------------------
hash=$(source_hash)
if [ -x "$PREFIX/bin/streamtap" ] && [ -f "$PREFIX/.source-hash" ] \
    && [ "$(cat "$PREFIX/.source-hash")" = "$hash" ]; then
    :
else
    if [ ! -x "$PREFIX/bin/python" ]; then
        say "creating venv $PREFIX ($PYTHON)"
        mkdir -p "$PREFIX"
        "$PYTHON" -m venv "$PREFIX"
    fi
    say "installing streamtap from $repo into $PREFIX"
    # build from a copy: pip's in-tree build would write build/ and *.egg-info into the repo
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    cp -a "$repo/pyproject.toml" "$repo/README.md" "$repo/daemon" "$repo/sinks" "$repo/config" \
        "$src/"
    [ -f "$repo/LICENSE" ] && cp -a "$repo/LICENSE" "$src/"
    # the build backend that compiles the engine modules (pyproject's backend-path)
    mkdir -p "$src/packaging" && cp -a "$repo/packaging/backend" "$src/packaging/"
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    # a development tree's Cython output (.c, .so): the install compiles its own
    find "$src/daemon" "$src/sinks" "$src/config" \( -name '*.c' -o -name '*.so' \) -delete
    "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check "$src" \
        || die "pip install failed (systemd-python builds from source: needs gcc, pkg-config, \
python3-dev, libsystemd-dev)"
    rm -rf "$src"
    trap - EXIT
    printf '%s\n' "$hash" >"$PREFIX/.source-hash"
    chmod -R go-w "$PREFIX"
    chmod -R a+rX "$PREFIX"
    changed=1
fi
install_file "$here/streamtap-service" "$PREFIX/bin/streamtap-service" 0755 || true
install_file "$here/../README.md" "$PREFIX/README.md" 0644 || true

# -- 2. unit, sysusers, tmpfiles ------------------------------------------------------------
if install_file "$here/streamtap@.service" "$UNITDIR/streamtap@.service" 0644; then
    units_changed=1
fi
install_file "$here/sysusers.d/streamtap.conf" "$SYSUSERSDIR/streamtap.conf" 0644 || true
tmpfiles_changed=0
if install_file "$here/tmpfiles.d/streamtap.conf" "$TMPFILESDIR/streamtap.conf" 0644; then
    tmpfiles_changed=1
fi

if [ "$APPLY" != 0 ]; then
    if ! getent passwd streamtap >/dev/null; then
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers "$SYSUSERSDIR/streamtap.conf"
        else
            getent group streamtap >/dev/null || groupadd --system streamtap
            useradd --system --gid streamtap --home-dir /var/lib/streamtap --no-create-home \
                --shell /usr/sbin/nologin --comment "streamtap TCP stream reassembler" streamtap
        fi
        say "created system user streamtap"
        changed=1
    fi
    need_dirs=$tmpfiles_changed
    for d in "$ETC" /var/lib/streamtap /var/log/streamtap; do
        [ -d "$d" ] || need_dirs=1
    done
    if [ "$need_dirs" = 1 ]; then
        if command -v systemd-tmpfiles >/dev/null; then
            systemd-tmpfiles --create "$TMPFILESDIR/streamtap.conf"
        else
            install -d -m 0755 -o root -g root "$ETC"
            install -d -m 0750 -o streamtap -g streamtap /var/lib/streamtap /var/log/streamtap
        fi
        say "created $ETC, /var/lib/streamtap, /var/log/streamtap"
        changed=1
    fi
fi

# -- 3. configs: never overwritten ----------------------------------------------------------
install_config "$here/streamtap.yaml" "$ETC/streamtap.yaml"
install_config "$here/eth0.yaml" "$ETC/eth0.yaml.example"
install_config "$here/eth0.env" "$ETC/eth0.env.example" 0600

# -- 4. systemd -----------------------------------------------------------------------------
if [ "$units_changed" = 1 ] && [ "$APPLY" != 0 ]; then
    if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
        systemctl daemon-reload
        say "systemctl daemon-reload"
    else
        say "systemd is not PID 1 here: no daemon-reload"
    fi
fi

if [ "$changed" = 0 ]; then
    say "nothing to do: $PREFIX, $UNITDIR/streamtap@.service and $ETC are up to date"
else
    say "done. Start a capture with: systemctl enable --now streamtap@IFACE"
fi
