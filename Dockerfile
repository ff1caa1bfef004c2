# Builds the `callbridge` server image.
#
#   docker build -t callbridge .
#   docker run --rm -p 8080:8080 --env-file .env callbridge

# ---- build stage -----------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: build them against a placeholder crate so that
# changing our sources does not rebuild every dependency.
# The workspace's other members (the load generator and the test fakes) must be present for the
# manifest to load, but only the server and its dependencies are built.
COPY Cargo.toml Cargo.lock ./
COPY loadgen/Cargo.toml loadgen/
COPY testkit/Cargo.toml testkit/
# Cargo.toml names a bench target, so its file must exist for the manifest to load.
RUN mkdir src benches loadgen/src testkit/src \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/hot_path.rs \
    && echo 'fn main() {}' > loadgen/src/main.rs \
    && touch src/lib.rs testkit/src/lib.rs \
    && cargo build --release --locked -p callbridge --bin callbridge \
    && rm -rf src benches loadgen/src testkit/src

# The real sources (src/, templates/, migrations/ if present; see .dockerignore). `touch` makes
# sure cargo rebuilds our crate instead of trusting the placeholder's newer timestamps.
COPY . .
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p callbridge --bin callbridge

# ---- runtime stage ---------------------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates for outbound TLS; util-linux provides `setpriv` for the entrypoint below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates util-linux \
    && rm -rf /var/lib/apt/lists/*

# The server runs as this unprivileged user. /app is the working directory (a local SQLite file
# lands here by default); /data is where fly.toml mounts a volume.
RUN groupadd --system --gid 10001 callbridge \
    && useradd --system --uid 10001 --gid callbridge --home-dir /app --shell /usr/sbin/nologin callbridge \
    && mkdir -p /app /data \
    && chown callbridge:callbridge /app /data

COPY --from=builder /src/target/release/callbridge /usr/local/bin/callbridge

WORKDIR /app
# callbridge listens on loopback unless told otherwise; in a container it must take connections
# from outside it.
ENV HOST=0.0.0.0
EXPOSE 8080
STOPSIGNAL SIGTERM

# Volumes mounted at /data (Fly volumes, Docker named volumes) may be owned by root. When the
# container starts as root, hand /data to the callbridge user, then drop to that user with
# `setpriv`; `exec` keeps callbridge as PID 1 so it receives SIGTERM directly. Started as any
# other user (`docker run --user ...`), the command runs as given.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$(id -u)\" = 0 ]; then chown -R 10001:10001 /data; exec setpriv --reuid=10001 --regid=10001 --init-groups \"$@\"; fi; exec \"$@\"", "entrypoint"]
CMD ["callbridge"]
