# The coupon issuer as a container image. See README "Run with containers".
#
#   docker build -t coupon-issuer .
#
# BASE is any Debian-like image with Python 3.11+ and its venv module; the default is the
# official one. scripts/container_test.sh builds this file against a Debian image it makes
# locally, since no container registry is reachable from our test machines.
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/coupon
COPY pyproject.toml README.md /src/
COPY coupon /src/coupon
# A regular (not editable) install: the final stage copies the venv and nothing of /src.
RUN /opt/coupon/bin/pip install /src

FROM ${BASE}
# A fixed numeric uid, so orchestrators that insist on runAsNonRoot can check it.
RUN groupadd --gid 10001 coupon \
    && useradd --uid 10001 --gid coupon --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin coupon
COPY --from=build /opt/coupon /opt/coupon
COPY configs/container.yaml /etc/coupon/config.yaml
ENV PATH=/opt/coupon/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
# coupon-server is PID 1 (exec form, no shell in between): it handles SIGTERM itself, lets
# in-flight calls finish for up to server.shutdown_timeout_s and exits 0.
STOPSIGNAL SIGTERM
# Liveness only: /readyz (the database) is for load balancers, and a replica whose database is
# down should stay up and answer 503 until it is back rather than be restarted.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["coupon-server"]
CMD ["--config", "/etc/coupon/config.yaml"]
