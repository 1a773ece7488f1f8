#!/bin/sh
# Hand a renewed certificate to a running HAProxy (master-worker mode, `haproxy -W -p
# DIR/haproxy.pid`): run by `trustmesh agent --exec` after every enrollment and renewal.
# Usage: haproxy-reload.sh DIR   (DIR: the agent's --out)
# New CRLs do not go through here: `trustmesh agent --haproxy-socket` pushes them through
# the runtime API (`set ssl crl-file` + `commit ssl crl-file`), no reload.
set -eu
dir=$1

# HAProxy wants the key beside the chain in one file, written atomically.
umask 077
cat "$dir/chain.pem" "$dir/key.pem" > "$dir/haproxy.pem.tmp"
mv "$dir/haproxy.pem.tmp" "$dir/haproxy.pem"

# A seamless reload: SIGUSR2 to the master; the listeners pass to the new worker
# (`expose-fd listeners`), open connections finish on the old one, and the new worker
# reads haproxy.pem and the CRL file again. (HAProxy 2.6's `commit ssl cert` stops taking
# effect after a `commit ssl crl-file` on the same bind line, so it is not used.)
# Before HAProxy runs (the first enrollment) there is nothing to reload.
if [ -s "$dir/haproxy.pid" ] && kill -0 "$(cat "$dir/haproxy.pid")" 2>/dev/null; then
    kill -USR2 "$(cat "$dir/haproxy.pid")"
fi
