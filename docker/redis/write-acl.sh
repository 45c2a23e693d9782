#!/bin/sh
# Writes Redis's ACL file from users.acl.template and the passwords in the environment, then runs
# the command that follows (docker-compose.yml: redis-server --aclfile OUT ...). The integration
# test tests/integration/test_redis_acl.py runs it without a command and starts its own server.
#
#   REDIS_GATEWAY_PASSWORD=... REDIS_WORKER_PASSWORD=... sh write-acl.sh TEMPLATE OUT [COMMAND...]
#
# Each #{NAME} of the template becomes "#" and the SHA-256 of $NAME: Redis keeps only the hash.
# A password must be at least 16 characters of A-Z a-z 0-9 . _ ~ - because it also travels,
# unescaped, inside the services' redis:// URLs (`openssl rand -hex 32` makes one). A missing or
# unfit password stops here, before Redis starts, so no user is ever left without one.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: write-acl.sh TEMPLATE OUT [COMMAND ARG...]" >&2
    exit 2
fi
template=$1
out=$2
shift 2

fail() {
    echo "write-acl.sh: $*" >&2
    exit 1
}

[ -r "$template" ] || fail "cannot read $template"
substitutions=''
for placeholder in $(sed -e '/^#/d' "$template" | grep -o '#{[A-Z0-9_]*}' | sort -u); do
    name=${placeholder#'#{'}
    name=${name%'}'}
    [ -n "$name" ] || fail "$template has an empty #{} placeholder"
    eval "value=\${$name:-}"
    case $value in
        '') fail "$name is empty or unset: set it in .env (docs/deployment.md)" ;;
        *[!A-Za-z0-9._~-]*) fail "$name may only hold A-Z a-z 0-9 . _ ~ - (it goes into a URL)" ;;
    esac
    [ ${#value} -ge 16 ] || fail "$name is shorter than 16 characters (openssl rand -hex 32)"
    hash=$(printf '%s' "$value" | sha256sum | cut -d ' ' -f 1)
    case $hash in
        *[!0-9a-f]* | '') fail "cannot hash $name (sha256sum)" ;;
    esac
    [ ${#hash} -eq 64 ] || fail "cannot hash $name (sha256sum)"
    substitutions="${substitutions}s/#{$name}/#$hash/g
"
done

umask 077
sed -e '/^#/d' -e '/^[[:space:]]*$/d' -e "$substitutions" "$template" > "$out.tmp"
if grep -q '#{' "$out.tmp"; then
    rm -f "$out.tmp"
    fail "placeholders left in $out"
fi
mv "$out.tmp" "$out"

if [ $# -gt 0 ]; then
    exec "$@"
fi
