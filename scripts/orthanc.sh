#!/usr/bin/env bash
# A throwaway Orthanc PACS (Debian packages `orthanc` + `orthanc-dicomweb`) on localhost, for the
# PACS tests (tests/test_pacs.py) and for trying `medvl pacs` by hand.
#
#   scripts/orthanc.sh install     install the Debian packages if Orthanc or its DICOMweb plugin is
#                                  missing (apt-get; needs root or password-less sudo)
#   scripts/orthanc.sh start       write a config into $ORTHANC_DIR (default: a new temporary folder),
#                                  start Orthanc in the background (a plain process: no systemd),
#                                  wait until GET /system answers, print url=..., dicomweb=...,
#                                  dir=..., pid=... on stdout
#   scripts/orthanc.sh stop DIR    stop the Orthanc started with that folder (its orthanc.pid)
#
# Environment for `start`: ORTHANC_PORT (HTTP port; default: a free one), ORTHANC_DIR,
# ORTHANC_USER and ORTHANC_PASSWORD (enable HTTP basic auth with this one user; default: no auth).
# Orthanc's HTTP server listens on 127.0.0.1 only ("RemoteAccessAllowed": false). Its DICOM (DIMSE)
# server is off unless ORTHANC_DICOM_PORT is set (a port number, or "auto" for a free one); then
# Orthanc answers C-ECHO / C-FIND / C-GET / C-MOVE as AE title ORTHANC_AET (default MEDVL-PACS;
# wrong called AE titles are rejected) and knows one peer, medvl: AE title ORTHANC_PEER_AET (default
# MEDVL) at 127.0.0.1, port ORTHANC_PEER_PORT (default: a free one), the C-MOVE destination where
# `medvl pacs pull --retrieve move --move-port PORT` listens. Orthanc cannot bind its DICOM port to
# one address, so it serves only that peer: requests from other AE titles or other hosts are
# refused. `start` then also prints dimse=dicom://AET@127.0.0.1:PORT, aet=, dicom_port=,
# peer_aet=, peer_port=. ORTHANC_LIMIT_FIND (default 0: no cap) caps every search at that many
# results (Orthanc's LimitFindResults and LimitFindInstances, for QIDO-RS and C-FIND alike), like a
# PACS with a small result limit.
# Exit codes: 0 ok, 1 failure, 3 Orthanc or the DICOMweb plugin is not installed.
# On a machine with systemd, installing the package also starts the system's own Orthanc service
# (port 8042); this script never uses or stops that one.
set -euo pipefail

ORTHANC_BIN=${ORTHANC_BIN:-/usr/sbin/Orthanc}
PLUGIN_CANDIDATES=(/usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so*)

log() { echo "orthanc.sh: $*" >&2; }

find_plugin() {
    local candidate
    for candidate in "${PLUGIN_CANDIDATES[@]}"; do
        if [[ -e "$candidate" ]]; then echo "$candidate"; return 0; fi
    done
    if command -v dpkg >/dev/null 2>&1; then
        candidate=$(dpkg -L orthanc-dicomweb 2>/dev/null | grep -m1 'libOrthancDicomWeb\.so' || true)
        if [[ -n "$candidate" && -e "$candidate" ]]; then echo "$candidate"; return 0; fi
    fi
    return 1
}

installed() { [[ -x "$ORTHANC_BIN" ]] && find_plugin >/dev/null; }

install() {
    if installed; then log "Orthanc and its DICOMweb plugin are installed"; return 0; fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if sudo -n true 2>/dev/null; then sudo=(sudo -n); else log "installing needs root (or sudo)"; return 1; fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then log "no apt-get: install orthanc and orthanc-dicomweb by hand"; return 1; fi
    log "installing orthanc and orthanc-dicomweb with apt-get"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        orthanc orthanc-dicomweb >&2
    installed || { log "installed, but $ORTHANC_BIN or the DICOMweb plugin is still missing"; return 1; }
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {  # url user password pid
    python3 - "$@" <<'PY'
import base64, sys, time, urllib.error, urllib.request
url, user, password, pid = sys.argv[1:5]
request = urllib.request.Request(url + "/system")
if user:
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except (urllib.error.URLError, OSError):
        pass
    try:
        import os
        os.kill(int(pid), 0)
    except OSError:
        sys.exit(2)  # Orthanc exited
    time.sleep(0.2)
sys.exit(1)
PY
}

start() {
    local plugin
    if [[ ! -x "$ORTHANC_BIN" ]] || ! plugin=$(find_plugin); then
        log "Orthanc or its DICOMweb plugin is not installed (Debian: orthanc, orthanc-dicomweb; run: $0 install)"
        exit 3
    fi
    local dir=${ORTHANC_DIR:-$(mktemp -d -t medvl-orthanc.XXXXXX)}
    local port=${ORTHANC_PORT:-$(free_port)}
    local user=${ORTHANC_USER:-} password=${ORTHANC_PASSWORD:-}
    local dicom_port=${ORTHANC_DICOM_PORT:-} aet=${ORTHANC_AET:-MEDVL-PACS} peer_aet=${ORTHANC_PEER_AET:-MEDVL}
    local peer_port=${ORTHANC_PEER_PORT:-}
    local limit_find=${ORTHANC_LIMIT_FIND:-0}
    [[ "$limit_find" =~ ^[0-9]+$ ]] || { log "ORTHANC_LIMIT_FIND must be a number, got '$limit_find'"; exit 1; }
    mkdir -p "$dir/db"
    local dicom='"DicomServerEnabled": false'
    if [[ -n "$dicom_port" ]]; then
        [[ "$dicom_port" == auto ]] && dicom_port=$(free_port)
        [[ -n "$peer_port" ]] || peer_port=$(free_port)
        dicom=$(python3 - "$dicom_port" "$aet" "$peer_aet" "$peer_port" <<'PY'
import json, sys
port, aet, peer_aet, peer_port = sys.argv[1:5]
print(", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in {
    "DicomServerEnabled": True, "DicomPort": int(port), "DicomAet": aet, "DicomCheckCalledAet": True,
    "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
    "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False, "DicomCheckModalityHost": True,
    "DicomModalities": {"medvl": {"AET": peer_aet, "Host": "127.0.0.1", "Port": int(peer_port)}},
    "DicomAssociationCloseDelay": 0, "DicomScpTimeout": 30, "DicomScuTimeout": 10}.items()))
PY
)
    fi
    local auth='"AuthenticationEnabled": false'
    if [[ -n "$user" ]]; then
        auth=$(python3 -c 'import json, sys; print("\"AuthenticationEnabled\": true, \"RegisteredUsers\": "
                                                   + json.dumps({sys.argv[1]: sys.argv[2]}))' "$user" "$password")
    fi
    cat > "$dir/orthanc.json" <<EOF
{
  "Name": "medvl-test",
  "StorageDirectory": "$dir/db",
  "IndexDirectory": "$dir/db",
  "HttpPort": $port,
  "RemoteAccessAllowed": false,
  $auth,
  $dicom,
  "HttpCompressionEnabled": false,
  "SaveJobs": false,
  "LimitFindResults": $limit_find,
  "LimitFindInstances": $limit_find,
  "Plugins": ["$plugin"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true}
}
EOF
    chmod 600 "$dir/orthanc.json"
    # setsid: its own session, so it outlives this script and a Ctrl-C in the caller's terminal
    setsid "$ORTHANC_BIN" "$dir/orthanc.json" > "$dir/orthanc.log" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$dir/orthanc.pid"
    local url="http://127.0.0.1:$port"
    if ! wait_ready "$url" "$user" "$password" "$pid"; then
        log "Orthanc did not answer on $url; last lines of $dir/orthanc.log:"
        tail -n 20 "$dir/orthanc.log" >&2 || true
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    log "Orthanc $("$ORTHANC_BIN" --version | head -n1 | awk '{print $2}') running (pid $pid): $url, DICOMweb $url/dicom-web"
    echo "url=$url"
    echo "dicomweb=$url/dicom-web"
    echo "dir=$dir"
    echo "pid=$pid"
    if [[ -n "$dicom_port" ]]; then
        log "DICOM (DIMSE) server: AE title $aet on port $dicom_port; C-MOVE destination $peer_aet at 127.0.0.1:$peer_port"
        echo "dimse=dicom://$aet@127.0.0.1:$dicom_port"
        echo "aet=$aet"
        echo "dicom_port=$dicom_port"
        echo "peer_aet=$peer_aet"
        echo "peer_port=$peer_port"
    fi
}

stop() {
    local dir=${1:?usage: $0 stop DIR}
    local pidfile="$dir/orthanc.pid"
    [[ -f "$pidfile" ]] || { log "no $pidfile: nothing to stop"; return 0; }
    local pid
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 100); do  # Orthanc takes about 3 s to stop after SIGTERM
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then log "pid $pid still running after 10 s: SIGKILL"; kill -9 "$pid" || true; fi
        log "stopped Orthanc (pid $pid)"
    fi
    rm -f "$pidfile"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 install | start | stop DIR" >&2; exit 2 ;;
esac
