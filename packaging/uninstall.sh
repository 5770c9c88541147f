#!/bin/bash
# packaging/uninstall.sh -- remove what install.sh installed (`make uninstall`). Needs root.
# Stops and disables running streamtap@* instances (when systemd runs), removes
# $STREAMTAP_PREFIX (/opt/streamtap), the unit and the sysusers.d/tmpfiles.d files.
# Keeps the data and the operator's files: $STREAMTAP_ETC (/etc/streamtap), /var/lib/streamtap
# (spools, pcaps), /var/log/streamtap (JSONL) and the streamtap user (files it owns stay
# meaningful). Remove those by hand: rm -rf /etc/streamtap /var/lib/streamtap /var/log/streamtap;
# userdel streamtap. Idempotent: a second run says there is nothing to do.
set -euo pipefail

PREFIX=${STREAMTAP_PREFIX:-/opt/streamtap}
ETC=${STREAMTAP_ETC:-/etc/streamtap}
UNITDIR=${STREAMTAP_UNITDIR:-/etc/systemd/system}
SYSUSERSDIR=${STREAMTAP_SYSUSERSDIR:-/etc/sysusers.d}
TMPFILESDIR=${STREAMTAP_TMPFILESDIR:-/etc/tmpfiles.d}
APPLY=${STREAMTAP_APPLY:-1}
changed=0

say() { printf 'streamtap uninstall: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    printf 'streamtap uninstall: error: run as root\n' >&2
    exit 1
fi

systemd_running() {
    [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]
}

if [ "$APPLY" != 0 ] && systemd_running; then
    units=$(systemctl list-units --all --plain --no-legend 'streamtap@*.service' \
        | awk '{print $1}')
    for u in $units; do
        systemctl disable --now "$u" >/dev/null 2>&1 || systemctl stop "$u" || true
        say "stopped and disabled $u"
        changed=1
    done
fi

# enablement symlinks (e.g. multi-user.target.wants/streamtap@eth0.service)
if [ -d "$UNITDIR" ]; then
    while IFS= read -r -d '' link; do
        rm -f "$link"
        say "removed $link"
        changed=1
    done < <(find "$UNITDIR" -mindepth 2 -maxdepth 2 -name 'streamtap@*.service' -type l -print0)
fi

for f in "$UNITDIR/streamtap@.service" "$SYSUSERSDIR/streamtap.conf" \
         "$TMPFILESDIR/streamtap.conf"; do
    if [ -e "$f" ] || [ -L "$f" ]; then
        rm -f "$f"
        say "removed $f"
        changed=1
    fi
done

if [ -d "$PREFIX" ]; then
    case "$PREFIX" in
        / | /usr | /usr/local | /opt | /etc | /var) say "refusing to remove $PREFIX"; exit 1 ;;
    esac
    rm -rf "$PREFIX"
    say "removed $PREFIX"
    changed=1
fi

if [ "$changed" = 1 ] && [ "$APPLY" != 0 ] && systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed 'streamtap@*.service' 2>/dev/null || true
fi

if [ "$changed" = 0 ]; then
    say "nothing to do: streamtap is not installed"
else
    say "done. Kept: $ETC, /var/lib/streamtap, /var/log/streamtap and the user streamtap"
fi
