#!/usr/bin/env bash
# Runs systemd/campaignd.service under a real systemd and checks what an
# operator relies on: Type=notify (active only when every role runs), the
# watchdog, Restart=always after a SIGKILL, reload, stop, a config error that
# is not restarted and raises both alerts (the daemon's and OnFailure='s), and
# a campaign end to end inside the unit's sandbox.
#
# No booted systemd is needed: systemd becomes PID 1 of new pid, mount and
# cgroup namespaces (as systemd-nspawn does), with only campaignd's two units
# and empty targets, so nothing else of the host starts. Needs root, systemd
# >= 252, unshare and nsenter, and a Python >= 3.11 outside /root and /home
# (ProtectHome= hides those): PYTHON=/usr/bin/python3 by default. Installs the
# repository into /opt/campaignd-systemd-check (a venv, as README's install).
# The host keeps nothing: /var/lib, /var/cache, /etc/campaignd and the unit
# directories are the namespace's own; the processes die with its PID 1.
#
#     sudo bash tools/systemd_check.sh        # prints one line a check; exit 1 if one failed
#
# What differs from a real host, on purpose (drop-ins in /run/systemd/system):
# - there is no journald: the unit's output goes to a file, printed on failure;
# - LoadCredential= is emptied and the config names its secret files by
#   absolute path: in this VM's nested systemd even a two-line unit cannot
#   read its $CREDENTIALS_DIRECTORY (Permission denied), the same without
#   PrivateUsers=; an environment limit, not the unit's;
# - WatchdogSec=2 instead of 60, so the watchdog check takes seconds.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
VENV=/opt/campaignd-systemd-check
WORK=$(mktemp -d /tmp/campaignd-systemd-check.XXXXXX)
chmod 755 "$WORK"
FAILED=0
NS_PID=""
HOST_PIDS=()

say() { printf '%-8s %s\n' "$1" "$2"; }
check() { # check NAME CONDITION-TEXT COMMAND...
    local name=$1 detail=$2
    shift 2
    if "$@"; then say ok "$name: $detail"; else say FAILED "$name: $detail"; FAILED=1; fi
}
cleanup() {
    [ -n "$NS_PID" ] && kill -KILL "$NS_PID" 2>/dev/null || true
    for pid in "${HOST_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "systemd_check: run as root" >&2; exit 2; }
for tool in unshare nsenter /lib/systemd/systemd "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "systemd_check: $tool not found" >&2; exit 2; }
done

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WEB_PORT=$(free_port); FAKE_PORT=$(free_port); ALERT_PORT=$(free_port)
# Two uids and gids no account of the host uses: the service's, an operator's.
read -r SERVICE_ID OPERATOR_ID < <("$PYTHON" -c 'import grp, pwd
used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
print(*[i for i in range(999, 100, -1) if i not in used][:2])')

# --- install, as README's "Install as a systemd service" ------------------------
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "$REPO" 2>&1 | grep -v '^WARNING' || true
CD="$VENV/bin/campaignd"

mkdir -p "$WORK"/{units,etc/credentials,bin,varlib,varcache,run-units}
cp "$REPO"/systemd/campaignd.service "$REPO"/systemd/campaignd-alert@.service "$WORK/units/"
for target in sysinit basic shutdown network network-online sockets multi-user default; do
    printf '[Unit]\nDescription=%s (empty: nothing else of the host starts)\n' "$target" \
        >"$WORK/units/$target.target"
done
cp /etc/passwd "$WORK/passwd"; cp /etc/group "$WORK/group"
echo "campaignd:x:$SERVICE_ID:$SERVICE_ID:campaignd:/var/lib/campaignd:/usr/sbin/nologin" >>"$WORK/passwd"
echo "campaignd:x:$SERVICE_ID:operator" >>"$WORK/group"
# An operator as README's install makes one: in group campaignd, nothing more.
echo "operator:x:$OPERATOR_ID:$OPERATOR_ID:operator:/nonexistent:/bin/sh" >>"$WORK/passwd"
echo "operator:x:$OPERATOR_ID:" >>"$WORK/group"
ln -s "$CD" "$WORK/bin/campaignd"
for secret in provider_token webhook_secret api_token; do
    echo "check-$secret" >"$WORK/etc/credentials/$secret"
done
write_config() { # write_config [EXTRA-WEB-PORT-VALUE]
    cat >"$WORK/etc/campaignd.toml" <<EOF
[daemon]
data_dir = "/var/lib/campaignd"

[provider]
kind = "wassenger"
base_url = "http://127.0.0.1:$FAKE_PORT"
token_file = "/etc/campaignd/credentials/provider_token"

[web]
port = ${1:-$WEB_PORT}
webhook_secret_file = "/etc/campaignd/credentials/webhook_secret"
api_token_file = "/etc/campaignd/credentials/api_token"

[status]
socket = "/run/campaignd/campaignd.sock"
group = "campaignd"

[alerts]
webhook_url = "http://127.0.0.1:$ALERT_PORT/alert"
EOF
}
write_config
printf 'phone,name\n+33612345001,Ana\n+33612345002,Ben\n+33612345003,Chloe\n' >"$WORK/etc/contacts.csv"

# --- the world outside the unit: the fake provider and an alert receiver --------
"$CD" fake-provider --port "$FAKE_PORT" --token check-provider_token \
    --webhook-url "http://127.0.0.1:$WEB_PORT/webhooks/wassenger" \
    --webhook-secret check-webhook_secret --reply-share 1 --reply-delay-ms 300 \
    >"$WORK/fake.log" 2>&1 &
HOST_PIDS+=($!)
"$PYTHON" - "$ALERT_PORT" "$WORK/alerts.jsonl" >/dev/null 2>&1 <<'EOF' &
import http.server, sys
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(sys.argv[2], "ab") as out:
            out.write(body + b"\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
EOF
HOST_PIDS+=($!)

# --- systemd as PID 1 of its own namespaces ----------------------------------------
cat >"$WORK/boot.sh" <<EOF
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount --bind $WORK/units /usr/lib/systemd/system
mount -t tmpfs tmpfs /etc/systemd/system
mount --bind $WORK/passwd /etc/passwd
mount --bind $WORK/group /etc/group
mkdir -p /etc/campaignd
mount --bind $WORK/etc /etc/campaignd
mount --bind $WORK/bin /usr/local/bin
mount --bind $WORK/varlib /var/lib
mount --bind $WORK/varcache /var/cache
mkdir -p /run/systemd/system/campaignd.service.d /run/systemd/system/campaignd-alert@.service.d
printf '[Service]\nStandardOutput=append:$WORK/unit.log\nStandardError=inherit\nLoadCredential=\nWatchdogSec=2\n' \
    >/run/systemd/system/campaignd.service.d/check.conf
printf '[Service]\nStandardOutput=append:$WORK/unit.log\nStandardError=inherit\n' \
    >/run/systemd/system/campaignd-alert@.service.d/check.conf
exec /lib/systemd/systemd --system --unit=multi-user.target </dev/null >/dev/null 2>&1
EOF
unshare --pid --fork --mount --mount-proc --cgroup bash "$WORK/boot.sh" &
UNSHARE_PID=$!
for _ in $(seq 1 100); do
    NS_PID=$(pgrep -P "$UNSHARE_PID" -x systemd || true)
    [ -n "$NS_PID" ] && break
    sleep 0.1
done
[ -n "$NS_PID" ] || { echo "systemd_check: systemd did not start" >&2; exit 2; }
in_ns() { nsenter -t "$NS_PID" -m -p "$@"; }
for _ in $(seq 1 100); do
    in_ns systemctl is-system-running >/dev/null 2>&1 && break
    state=$(in_ns systemctl is-system-running 2>/dev/null || true)
    [ "$state" = degraded ] && break
    sleep 0.1
done
unit() { in_ns systemctl show -p "$1" --value campaignd; }
as_service() { in_ns setpriv --reuid "$SERVICE_ID" --regid "$SERVICE_ID" --clear-groups "$CD" -c /etc/campaignd/campaignd.toml "$@"; }
# The service's processes: the supervisor, the zygote and five roles.
processes() { in_ns pgrep -c -u "$SERVICE_ID" || true; }
now() { date +%s.%N; }
since() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
wait_for() { # wait_for SECONDS COMMAND...: true once COMMAND succeeds
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge "$deadline" ] && return 1; sleep 0.1; done
}
active_with_new_pid() { [ "$(unit ActiveState)" = active ] && [ "$(unit MainPID)" != "$1" ] && [ "$(unit MainPID)" != 0 ]; }
echo "systemd $(in_ns systemctl --version | head -1 | cut -d' ' -f2), unit from $REPO/systemd, campaignd $("$CD" --version | cut -d' ' -f2)"

# 1. Type=notify: "active" comes with READY=1, once every role runs.
t0=$(now)
in_ns systemctl start campaignd 2>/dev/null || true
check start "active after $(since "$t0") s, status text \"$(unit StatusText)\"" \
    [ "$(unit ActiveState)" = active ]
if [ "$(unit ActiveState)" != active ]; then
    echo "--- the unit's output"; tail -40 "$WORK/unit.log" || true
    exit 1
fi
check "status socket" "campaignd status as a user of group campaignd exits 0" \
    bash -c "nsenter -t $NS_PID -m -p setpriv --reuid $OPERATOR_ID --regid $OPERATOR_ID --init-groups $CD -c /etc/campaignd/campaignd.toml status >/dev/null"
running=$(processes)

# 2. A campaign inside the sandbox: Message 1, the replies, Message 2.
as_service campaign create --name check --message1 "Bonjour {name}" --message2 "Merci {name}" \
    --contacts /etc/campaignd/contacts.csv >/dev/null
t0=$(now)
as_service campaign start 1 >/dev/null
campaign_done() { as_service campaign show 1 | grep -q 'members *message_2_sent 3'; }
check campaign "3 contacts, 3 replies, 3 Message 2 in $(wait_for 60 campaign_done; since "$t0") s" campaign_done

# replaced SIGNAL NAME TEXT: the supervisor gets SIGNAL; a new one must be
# active, with as many processes as before (the old children went with it).
replaced() {
    local signal=$1 name=$2 text=$3 pid t0 took
    pid=$(unit MainPID)
    in_ns kill "-$signal" "$pid"
    t0=$(now)
    wait_for 20 active_with_new_pid "$pid" || true
    took=$(since "$t0")
    wait_for 10 bash -c "[ \"\$(nsenter -t $NS_PID -m -p pgrep -c -u $SERVICE_ID)\" = $running ]" || true
    check "$name" "$text after $took s, $(processes) processes (were $running)" \
        bash -c "[ '$(unit MainPID)' != '$pid' ] && [ '$(unit ActiveState)' = active ] && [ '$(processes)' = '$running' ]"
}

# 3. The watchdog: pings keep it alive; a frozen supervisor is killed and restarted.
pid=$(unit MainPID)
sleep 6
check watchdog "same main pid after 6 s with WatchdogSec=2" [ "$(unit MainPID)" = "$pid" ]
replaced STOP "watchdog kill" "SIGSTOPped supervisor replaced"

# 4. Restart=always: SIGKILL of the supervisor; its children go with it.
replaced KILL SIGKILL "active again (RestartSec=2)"

# 5. Reload: SIGHUP, the roles replaced one by one, the supervisor kept.
# (systemctl reload returns once kill has sent the signal: systemd 252 does
# not wait for a RELOADING=1 that comes after; the STATUS= line says
# "reloading" until the roles are replaced.)
pid=$(unit MainPID)
roles_before=$(in_ns pgrep -u "$SERVICE_ID" | sort | paste -sd, -)
t0=$(now)
in_ns systemctl reload campaignd
reloaded() {
    [ "$(unit StatusText)" = "5/5 roles running" ] && [ "$(unit ActiveState)" = active ] &&
        [ "$(in_ns pgrep -u "$SERVICE_ID" | sort | paste -sd, -)" != "$roles_before" ]
}
wait_for 30 reloaded || true
check reload "roles replaced after $(since "$t0") s, same main pid, $(unit StatusText)" \
    bash -c "[ '$(unit MainPID)' = '$pid' ] && [ '$(unit StatusText)' = '5/5 roles running' ]"

# 6. Stop: a clean exit within TimeoutStopSec, the runtime directory removed.
t0=$(now)
in_ns systemctl stop campaignd
check stop "inactive after $(since "$t0") s, result $(unit Result)" \
    bash -c "[ '$(unit Result)' = success ] && ! nsenter -t $NS_PID -m test -e /run/campaignd"

# The unit's own output so far: no error but those the checks caused.
errors() { grep -E ' (ERROR|CRITICAL) |^Traceback' "$WORK/unit.log" || true; }
check "log" "$(errors | wc -l) ERROR, CRITICAL or Traceback lines in the unit's output" \
    bash -c "[ -z \"\$(grep -E ' (ERROR|CRITICAL) |^Traceback' $WORK/unit.log)\" ]"
errors | head -20

# 7. A config error: exit 2, not restarted, and both alerts sent.
write_config '"x"'
in_ns systemctl start campaignd 2>/dev/null || true
alerted() { grep -q '"key": "daemon:config_error"' "$WORK/alerts.jsonl" && grep -q '"key": "unit_failed:campaignd.service"' "$WORK/alerts.jsonl"; }
wait_for 20 alerted || true
check "config error" "state $(unit ActiveState), exit $(unit ExecMainStatus), $(unit NRestarts) restarts, alerts: $(grep -o '"key": "[^"]*"' "$WORK/alerts.jsonl" 2>/dev/null | cut -d'"' -f4 | paste -sd, -)" \
    bash -c "[ '$(unit ActiveState)' = failed ] && [ '$(unit ExecMainStatus)' = 2 ] && [ '$(unit NRestarts)' = 0 ]"
check alerts "the daemon's (daemon:config_error) and OnFailure='s (unit_failed:...)" alerted

if [ "$FAILED" != 0 ]; then
    echo "--- the unit's output"; tail -40 "$WORK/unit.log" || true
fi
exit "$FAILED"
