#!/bin/sh
# Hand a renewed certificate and the current chain CRL to a running HAProxy (master-worker
# mode, `haproxy -W -p DIR/haproxy.pid`). Run by `trustmesh agent --exec` and on a new CRL.
# Usage: haproxy-update.sh DIR SOCKET   (DIR: the agent's --out; SOCKET: the stats socket)
set -eu
dir=$1
sock=$2

changed() {  # true when $1 differs from what was handed over last time
    [ "$(cksum < "$1")" != "$(cat "$1.pushed" 2>/dev/null)" ]
}
pushed() {
    cksum < "$1" > "$1.pushed"
}

# The certificate: HAProxy wants the key beside the chain in one file. A seamless reload
# (SIGUSR2 to the master; the listeners pass to the new worker, open connections finish
# on the old one) picks it up. (HAProxy 2.6's `commit ssl cert` stops taking effect after
# a `commit ssl crl-file` on the same bind line, so it is not used here.)
umask 077
cat "$dir/chain.pem" "$dir/key.pem" > "$dir/haproxy.pem.tmp"
mv "$dir/haproxy.pem.tmp" "$dir/haproxy.pem"
if changed "$dir/haproxy.pem"; then
    kill -USR2 "$(cat "$dir/haproxy.pid")"
    pushed "$dir/haproxy.pem"
    exit 0  # the new worker reads the CRL file as well
fi

# The CRL, through the runtime API: set + commit, no reload. HAProxy answers "Success!"
# (-t 30: a commit rebuilds the SSL contexts; wait for the answer, not 0.5 s).
if changed "$dir/chain-crl.pem"; then
    crl=$dir/chain-crl.pem
    answer=$(printf 'set ssl crl-file %s <<\n%s\n\n' "$crl" "$(cat "$crl")" | socat -t 30 - "UNIX-CONNECT:$sock")
    answer="$answer $(printf 'commit ssl crl-file %s\n' "$crl" | socat -t 30 - "UNIX-CONNECT:$sock")"
    case $answer in
        *Success*) pushed "$crl" ;;
        *) echo "haproxy refused $crl: $answer" >&2; exit 1 ;;
    esac
fi
