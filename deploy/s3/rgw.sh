#!/usr/bin/env bash
# Start or stop a throw-away Ceph RGW (S3) on loopback, without containers.
#
#   deploy/s3/rgw.sh start DIR   # prints S3 endpoint and credentials as KEY=VALUE lines
#   deploy/s3/rgw.sh stop DIR
#
# One monitor, one memstore OSD (data lives in memory), auth none, one S3 user.
# Ports: RGW_PORT (default 7480) and MON_PORT (default 6789).
# Credentials: RGW_ACCESS_KEY / RGW_SECRET_KEY (random when unset). They are
# written to DIR/s3.env (mode 0600) and printed on stdout for the caller only.
set -euo pipefail
trap 'echo "rgw: failed at line $LINENO (exit $?); logs in ${dir:-?}/log" >&2' ERR
cmd="${1:-}"; dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2; exit 2
fi
mkdir -p "$dir"; dir="$(cd "$dir" && pwd)"
conf="$dir/ceph.conf"
name="client.rgw.edgeslim"

stop() {
  # pid files are named by daemon type: client (radosgw), osd, mon.
  for p in client osd mon; do
    if [ -f "$dir/run/$p.pid" ]; then
      pid="$(cat "$dir/run/$p.pid")"
      kill "$pid" 2>/dev/null || true
      # The data is throw-away (memstore): no need to wait long for a clean exit.
      for _ in $(seq 1 10); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/run/$p.pid"
    fi
  done
}

# Pacific's daemons and CLI sometimes send their first command before they have
# the monmap ('handle_command on fsid 0000...', EPERM or exit 250). Both steps
# retried here fail fast and are idempotent, so try again a few times.
retry() {
  local attempt
  for attempt in 1 2 3 4 5 6 7 8; do
    if "$@" </dev/null >>"$dir/log/daemons.log" 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "rgw: '$1' failed 8 times; see $dir/log" >&2
  return 1
}

if [ "$cmd" = "stop" ]; then
  stop; echo "rgw: stopped"; exit 0
fi
if [ "$cmd" != "start" ]; then
  echo "usage: $0 start|stop DIR" >&2; exit 2
fi
for bin in radosgw radosgw-admin ceph-mon ceph-osd monmaptool ceph; do
  command -v "$bin" >/dev/null || { echo "rgw: $bin not found; run deploy/s3/install-rgw.sh" >&2; exit 3; }
done
stop
rgw_port="${RGW_PORT:-7480}"; mon_port="${MON_PORT:-6789}"
ak="${RGW_ACCESS_KEY:-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)}"
sk="${RGW_SECRET_KEY:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
rm -rf "$dir/mon" "$dir/osd0" "$dir/run" "$dir/log" "$dir/monmap" "$dir/keyring"
mkdir -p "$dir/mon" "$dir/osd0" "$dir/run" "$dir/log"
fsid="$(cat /proc/sys/kernel/random/uuid)"
cat > "$conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$type.pid
keyring = $dir/keyring
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd0
osd objectstore = memstore
memstore device bytes = 1073741824
osd journal size = 0
[$name]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
auth client required = none
ms mon client mode = crc
rgw dns name = localhost
rgw thread pool size = 64
CONF
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "[v1:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" >"$dir/log/mkfs.log" 2>&1
# Daemons must not hold the caller's stdout/stderr open (a caller reading our output would wait forever).
ceph-mon -c "$conf" -i a </dev/null >>"$dir/log/daemons.log" 2>&1
ok=""
for _ in $(seq 1 100); do
  if ceph -c "$conf" --connect-timeout 3 mon stat >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.2
done
[ -n "$ok" ] || { echo "rgw: monitor did not come up; see $dir/log" >&2; stop; exit 1; }
# Create the OSD id with an explicit uuid, once (a retried bare `osd create` can
# leave an id whose uuid the OSD then contradicts: 'wrong fsid').
osd_uuid="$(cat /proc/sys/kernel/random/uuid)"
retry ceph -c "$conf" osd new "$osd_uuid" 0
ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.log" 2>&1
retry ceph-osd -c "$conf" -i 0
ok=""
for _ in $(seq 1 150); do
  if ceph -c "$conf" osd stat 2>/dev/null | grep -q "1 up"; then ok=1; break; fi
  sleep 0.2
done
[ -n "$ok" ] || { echo "rgw: OSD did not come up; see $dir/log" >&2; stop; exit 1; }
radosgw-admin -c "$conf" -n "$name" user create --uid=edgeslim --display-name=edgeslim \
  --access-key="$ak" --secret-key="$sk" >/dev/null
radosgw -c "$conf" -n "$name" </dev/null >>"$dir/log/daemons.log" 2>&1
ok=""
for _ in $(seq 1 150); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$rgw_port") 2>/dev/null; then ok=1; break; fi
  sleep 0.2
done
[ -n "$ok" ] || { echo "rgw: radosgw did not open port $rgw_port; see $dir/log" >&2; stop; exit 1; }
umask 077
cat > "$dir/s3.env" <<ENV
S3_ENDPOINT_URL=http://127.0.0.1:$rgw_port
AWS_ACCESS_KEY_ID=$ak
AWS_SECRET_ACCESS_KEY=$sk
ENV
cat "$dir/s3.env"
