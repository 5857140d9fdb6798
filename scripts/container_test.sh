#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2054  # mmdebstrap hooks expand $1 themselves; --include takes commas
# Build the Dockerfile and run the image, then compose.yaml, with podman; print the figures.
#
#   sudo bash scripts/container_test.sh          (tests/test_containers.py runs it in the suite)
#
# No container registry is reachable from our machines, so the images come from Debian's
# packages, made here with mmdebstrap and cached in podman's store under a tag that is a hash
# of their recipe (a warm machine reuses them; a changed recipe or CA bundle makes new ones):
#   - a base image (Python 3, venv, the host's CA bundle so pip inside the build can reach
#     PyPI through this network's TLS inspection), passed to the Dockerfile as BASE;
#   - a PostgreSQL 15 image (tests/containers/postgres-entrypoint.sh speaks the official
#     image's POSTGRES_* interface), so the app talks to its database over a container
#     network exactly as in compose.yaml, with no host port for the database.
# Then it builds the Dockerfile, runs the image against that PostgreSQL, polls /readyz, runs
# scripts/concurrency_check.py (exactly N), sends SIGTERM and checks exit code 0 within
# server.shutdown_timeout_s; then brings compose.yaml up with the db image swapped through an
# override file, runs the verifier across both replicas, restarts the stack to show the data
# lives in the named volume, and removes everything it started (not the cached base images).
#
# Two quirks of these machines, handled by a CONTAINERS_CONF file: crun fails here (cgroups
# v1), so runc is the runtime; container rlimits must stay below the host's.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
CACHE_DIR=${COUPON_CONTAINER_CACHE:-/var/cache/coupon-container-test}
REQUESTS=5000
TOTAL=100
SUITE=bookworm
MIRRORS=(
    "deb http://deb.debian.org/debian $SUITE main"
    "deb http://deb.debian.org/debian-security $SUITE-security main"
)
# Recipes: everything that goes into an image; their hash is the image's tag. The hooks are
# single-quoted on purpose ($1 is mmdebstrap's target directory); --include takes commas.
SLIM=(--variant=minbase
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
      --dpkgopt='path-exclude=/usr/share/locale/*')
CLEAN_APT='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*'
BASE_RECIPE=("${SLIM[@]}" --include=python3,python3-venv,ca-certificates
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs'
    --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1/etc/pip.conf"'
    --customize-hook="$CLEAN_APT")
BASE_CHANGES=(--change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]')
PG_ENTRYPOINT=tests/containers/postgres-entrypoint.sh
PG_RECIPE=("${SLIM[@]}" --include=postgresql-15
    --essential-hook='mkdir -p "$1/etc/postgresql-common" && echo "create_main_cluster = false" > "$1/etc/postgresql-common/createcluster.conf"'
    --customize-hook="copy-in $PG_ENTRYPOINT /usr/local/bin"
    --customize-hook="$CLEAN_APT")
PG_CHANGES=(--change 'ENV LANG=C.UTF-8' --change 'EXPOSE 5432' --change 'STOPSIGNAL SIGINT'
            --change 'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]')

say() { echo "container_test: $*"; }
fail() { say "FAIL: $*" >&2; exit 1; }  # also from inside $(...)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
random_hex() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

[ "$(id -u)" = 0 ] || fail "run as root (rootless podman needs subuid set-up this test does not make)"
for tool in podman runc mmdebstrap podman-compose curl; do
    command -v "$tool" >/dev/null || fail "$tool is missing (scripts/test.sh installs it as root)"
done

RUN=ctest-$(random_hex | cut -c1-10)
WORK=$(mktemp -d)
APP_IMAGE=localhost/coupon-issuer:$RUN
NET=$RUN-net
PG=$RUN-pg
APP=$RUN-app
PROJECT=$RUN
TOKEN=$(random_hex)
PG_PASSWORD=$(random_hex)
BUILT_IMAGE=""
cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf

cleanup() {
    local status=$?
    set +e
    if [ "$status" != 0 ]; then
        for c in "$APP" "$PG" "${PROJECT}_db_1" "${PROJECT}_app_1" "${PROJECT}_app_2"; do
            podman container exists "$c" 2>/dev/null || continue
            echo "--- podman logs $c (last 20 lines)"
            podman logs --tail 20 "$c" 2>&1
        done
    fi
    podman rm -f -t 0 "$APP" "$PG" >/dev/null 2>&1
    podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" \
        | xargs -r podman rm -f -t 0 >/dev/null 2>&1
    podman volume rm -f "${PROJECT}_pgdata" >/dev/null 2>&1
    podman network rm -f "$NET" "${PROJECT}_default" >/dev/null 2>&1
    [ -n "$BUILT_IMAGE" ] && podman rmi -f "$BUILT_IMAGE" >/dev/null 2>&1
    local left
    left=$(podman ps -aq --filter "name=$RUN"; podman volume ls -q --filter "name=$RUN";
           podman network ls -q --filter "name=$RUN"
           podman image exists "$APP_IMAGE" && echo "$APP_IMAGE")
    if [ -n "$left" ]; then
        say "cleanup left something behind: $left"
        [ "$status" = 0 ] && status=1
    else
        say "cleaned up: containers, networks, volumes and the app image of run $RUN"
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

# An image from Debian's packages, built unless a previous run left it under this recipe's hash.
cached_image() {  # name, files the recipe reads, --, recipe..., --changes, changes...
    local name=$1 hash_input files=() recipe=() changes=()
    shift
    while [ "$1" != -- ]; do files+=("$1"); shift; done
    shift
    while [ "$1" != --changes ]; do recipe+=("$1"); shift; done
    shift
    changes=("$@")
    hash_input=$( (printf '%s\n' "$SUITE" "${MIRRORS[@]}" "${recipe[@]}" "${changes[@]}";
                   cat "${files[@]}") | sha256sum | cut -c1-16)
    local tag=localhost/$name:$hash_input
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/$name.lock"
    flock -w 900 9 || fail "could not lock $CACHE_DIR/$name.lock"
    if podman image exists "$tag"; then
        say "$tag: cached" >&2
    else
        local began tar=$WORK/$name.tar
        began=$(now)
        mmdebstrap "${recipe[@]}" "$SUITE" "$tar" "${MIRRORS[@]}" >"$WORK/$name.log" 2>&1 \
            || { tail -20 "$WORK/$name.log" >&2; fail "mmdebstrap $name failed"; }
        podman import -q "${changes[@]}" "$tar" "$tag" >/dev/null
        rm -f "$tar"
        say "$tag: made with mmdebstrap in $(since "$began") s" >&2
        # Older recipes' images are of no further use.
        podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=localhost/$name" \
            | grep -vxF "$tag" | xargs -r podman rmi >/dev/null 2>&1 || true
    fi
    flock -u 9
    echo "$tag"
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true; }

wait_ready() {  # base URLs...; polls /readyz, bounded
    local url deadline=$((SECONDS + 90))
    for url in "$@"; do
        until [ "$(http_code "$url/readyz")" = 200 ]; do
            [ "$SECONDS" -lt "$deadline" ] || fail "$url/readyz did not answer 200 within 90 s"
            sleep 0.2
        done
    done
}

published() { echo "http://$(podman port "$1" 8080 | head -1)"; }

verify() {  # label, base URLs...; runs the exactly-N verifier across them
    local label=$1 url args=() out line
    shift
    for url in "$@"; do args+=(--url "$url"); done
    out=$("$PY" scripts/concurrency_check.py "${args[@]}" --token "$TOKEN" --requests "$REQUESTS" \
          --total "$TOTAL" --concurrency 100 --progress off 2>&1) \
        || { echo "$out" >&2; fail "verifier against $label"; }
    while IFS= read -r line; do echo "    $line"; done <<<"$out" >&2
    say "verifier vs $label: $(echo "$out" | grep '^Issued:') | $(echo "$out" | grep '^OK:')" >&2
    echo "$out" | sed -n 's/^Campaign \([0-9a-f-]*\):.*/\1/p'
}

issued_metric() {  # base URL -> coupon_coupons_issued_total of that replica
    curl -s --max-time 5 "$1/metrics" \
        | awk '/^coupon_coupons_issued_total / { n = $2 } END { printf "%d", n }'
}

# --- 1. images ---------------------------------------------------------------------------
BASE_IMAGE=$(cached_image coupon-ci-base /etc/ssl/certs/ca-certificates.crt -- \
    "${BASE_RECIPE[@]}" --changes "${BASE_CHANGES[@]}")
PG_IMAGE=$(cached_image coupon-ci-postgres "$PG_ENTRYPOINT" -- \
    "${PG_RECIPE[@]}" --changes "${PG_CHANGES[@]}")

began=$(now)
# docker format keeps the HEALTHCHECK (OCI image config has no field for it); no layer cache,
# so nothing of the build outlives the image this script removes at the end.
podman build -q --format docker --layers=false --build-arg "BASE=$BASE_IMAGE" \
    -t "$APP_IMAGE" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; fail "podman build"; }
BUILT_IMAGE=$APP_IMAGE
size=$(podman image inspect --format '{{.Size}}' "$APP_IMAGE")
say "image $APP_IMAGE: $(awk -v s="$size" 'BEGIN { printf "%.1f MB", s / 1e6 }'), built in $(since "$began") s (FROM $BASE_IMAGE)"

# --- 2. the image alone, against a throw-away PostgreSQL ---------------------------------
podman network create "$NET" >/dev/null
podman run -d --name "$PG" --network "$NET" -e POSTGRES_USER=coupon -e POSTGRES_DB=coupon \
    -e POSTGRES_PASSWORD="$PG_PASSWORD" "$PG_IMAGE" >/dev/null 2>"$WORK/run-pg.log" \
    || { cat "$WORK/run-pg.log"; fail "podman run $PG_IMAGE"; }
began=$(now)
# The healthcheck timer podman would set up needs systemd, absent here: podman logs an error
# and runs the container anyway; `podman healthcheck run` below runs the check on demand.
podman run -d --name "$APP" --network "$NET" -p 127.0.0.1::8080 \
    -e COUPON_DATABASE_DSN="postgresql://coupon:$PG_PASSWORD@$PG:5432/coupon" \
    -e COUPON_AUTH_ADMIN_TOKEN="$TOKEN" "$APP_IMAGE" >/dev/null 2>"$WORK/run.log" \
    || { cat "$WORK/run.log"; fail "podman run $APP_IMAGE"; }
APP_URL=$(published "$APP")
wait_ready "$APP_URL"
say "container ready on $APP_URL in $(since "$began") s (the database started beside it)"
podman healthcheck run "$APP" >/dev/null 2>&1 || fail "the image's HEALTHCHECK failed"
pid1=$(podman top "$APP" pid user comm | awk '$1 == 1 { print $3 " as " $2 }')
if [ "${pid1%% as *}" != coupon-server ] || [ "${pid1##* as }" = root ]; then
    fail "PID 1 should be coupon-server as a non-root user, is: $pid1"
fi
say "PID 1: $pid1; HEALTHCHECK: healthy"
verify "the container" "$APP_URL" >/dev/null

bound=$("$PY" -c 'import yaml; print(yaml.safe_load(open("configs/container.yaml"))["server"]["shutdown_timeout_s"])')
began=$(now)
podman kill --signal TERM "$APP" >/dev/null
# Bounded: a PID 1 that ignores SIGTERM (a shell in front, say) would otherwise hang here.
exit_code=$(timeout "$((bound * 2))" podman wait "$APP") \
    || fail "still running $((bound * 2)) s after SIGTERM: PID 1 ignores it"
stop_s=$(since "$began")
say "SIGTERM: exit code $exit_code, stopped in $stop_s s (bound: server.shutdown_timeout_s = $bound s)"
[ "$exit_code" = 0 ] || fail "exit code $exit_code after SIGTERM, expected 0"
awk -v t="$stop_s" -v b="$bound" 'BEGIN { exit !(t <= b) }' || fail "stop took longer than $bound s"
podman rm -f -t 0 "$APP" "$PG" >/dev/null 2>&1
podman network rm "$NET" >/dev/null

# --- 3. compose.yaml: PostgreSQL + 2 replicas --------------------------------------------
# A copy of compose.yaml, so a developer's .env beside the original (which podman-compose 1.0
# reads in preference to the environment) cannot change this run's secrets.
cp compose.yaml "$WORK/compose.yaml"
cat > "$WORK/override.yaml" <<EOF
# The official postgres image cannot be pulled here: the Debian-made one stands in for it.
services:
  db:
    image: $PG_IMAGE
  app:
    image: $APP_IMAGE
EOF
compose() {
    POSTGRES_PASSWORD=$PG_PASSWORD COUPON_AUTH_ADMIN_TOKEN=$TOKEN \
        podman-compose -p "$PROJECT" -f "$WORK/compose.yaml" -f "$WORK/override.yaml" "$@" \
        >>"$WORK/compose.log" 2>&1 || { tail -30 "$WORK/compose.log"; fail "podman-compose $*"; }
}
replica_urls() {
    local n urls=()
    for n in 1 2; do
        podman container exists "${PROJECT}_app_$n" || fail "replica ${PROJECT}_app_$n missing"
        urls+=("$(published "${PROJECT}_app_$n")")
    done
    [ "${urls[0]}" != "${urls[1]}" ] || fail "both replicas on one port"
    echo "${urls[@]}"
}

began=$(now)
compose up -d --no-build
listed=$(replica_urls)
read -r -a URLS <<<"$listed"
wait_ready "${URLS[@]}"
say "compose: db + 2 app replicas ready on ${URLS[*]} in $(since "$began") s"
# podman-compose cannot wait for it (no systemd timers here), but the db's health check from
# compose.yaml must pass now that the replicas are ready.
podman healthcheck run "${PROJECT}_db_1" >/dev/null 2>&1 || fail "the db service's healthcheck failed"
campaign=$(verify "the compose stack (both replicas)" "${URLS[@]}")
first=$(issued_metric "${URLS[0]}")
second=$(issued_metric "${URLS[1]}")
say "compose: codes issued per replica (their /metrics): $first + $second = $((first + second))"
[ "$((first + second))" = "$TOTAL" ] || fail "the replicas issued $((first + second)), not $TOTAL"
if [ "$first" = 0 ] || [ "$second" = 0 ]; then fail "one replica issued no code"; fi

# Down (containers gone, volume kept) and up again: the campaign must still be there.
began=$(now)
compose down
compose up -d --no-build
listed=$(replica_urls)
read -r -a URLS <<<"$listed"
wait_ready "${URLS[@]}"
answer=$(curl -s --max-time 5 -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d "{\"campaignId\": \"$campaign\", \"pageSize\": 1}" \
    "${URLS[1]}/coupon.CouponService/GetCampaign")
count=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1]).get("issuedCount", -1))' "$answer")
say "compose: after down and up ($(since "$began") s), the campaign still has $count codes (volume ${PROJECT}_pgdata)"
[ "$count" = "$TOTAL" ] || fail "after a restart the campaign has $count codes, expected $TOTAL"
compose down -v
