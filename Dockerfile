# One image for workers and the autoscaler: docker build -t warren:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin warren

FROM debian:bookworm-slim
# GDAL for the pipelines Warren runs; tini reaps the commands' orphans and forwards signals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gdal-bin ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin warren
COPY --from=build /src/target/release/warren /usr/local/bin/warren
USER 10001
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/warren"]
