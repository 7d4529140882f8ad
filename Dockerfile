# syntax=docker/dockerfile:1
# DataAPI: a release build in a full Rust image, run from a slim Debian image as an unprivileged user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml names the benchmark target; cargo refuses a manifest whose targets are missing.
COPY benches ./benches
# GraphiQL's bundles are compiled into the binary (include_bytes!), so the image needs no internet at run time.
COPY assets/graphiql/dist ./assets/graphiql/dist
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dataapi \
    && install -m 0755 target/release/dataapi /usr/local/bin/dataapi

FROM debian:bookworm-slim AS runtime
# Pinned (bookworm-security's version): a build that cannot get exactly this fails instead of changing
# silently; bump it when Debian publishes a newer one.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20250419~deb12u2 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dataapi \
    && useradd --system --uid 10001 --gid dataapi --home-dir /var/lib/dataapi --create-home dataapi
COPY --from=build /usr/local/bin/dataapi /usr/local/bin/dataapi
# Numeric, so that a platform that refuses root (Kubernetes runAsNonRoot) can tell without /etc/passwd.
USER 10001:10001
# With DATABASE_URL unset the embedded store lives in ./data, i.e. /var/lib/dataapi/data: mount a volume there.
WORKDIR /var/lib/dataapi
ENV BIND_ADDR=0.0.0.0:8000 \
    LOG=info
EXPOSE 8000
# Asks /ready on BIND_ADDR's port without curl: healthy when the database (and Redis, if used) answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/dataapi", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/dataapi"]
CMD ["serve"]
