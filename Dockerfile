# syntax=docker/dockerfile:1
#
# idmatch-proxy container image.
#
#   docker build -t idmatch-proxy .            (needs BuildKit: the default since Docker 23)
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" ...
#
# Base images are pinned by tag, not digest: no registry could be reached where this file was
# written, so no digest could be checked. Pin them by digest (`image:tag@sha256:...`) in the
# pipeline that builds releases, and let a bot such as Renovate keep the digests current.
#
# Runtime choice: the binary is built for `<arch>-unknown-linux-musl`, which links statically,
# so the runtime is distroless `static` (no libc, no shell, no package manager; ~2 MiB) rather
# than distroless `cc` (adds glibc and libgcc for a dynamically linked glibc build). Nothing in
# the dependency tree needs glibc: TLS is rustls with ring, the roots are webpki-roots compiled
# in. musl's allocator, measured against glibc's and mimalloc (benches/README.md, "The image's
# allocator"): 8 % more instructions per request at full load, but the smallest memory (5.2 MiB
# idle against glibc's 7.9 and mimalloc's 15), and CM.com allows one request per second per
# credential, so the memory every pod pays wins. Its resolver handles Kubernetes' search domains and,
# since musl 1.2.4 (Rust >= 1.93 bundles 1.2.5), falls back to TCP for large DNS answers.
# `static` also carries ca-certificates, so `upstream.roots = "native"` works in this image too.

# ---- build ---------------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS build

# musl-tools provides musl-gcc, which the `cc` crate uses to compile ring's C and assembly for
# the musl target. The Rust target and llvm-tools (llvm-profdata, matching rustc's LLVM, for the
# profile-guided build below) come from rustup (static.rust-lang.org).
RUN rustup target add "$(uname -m)-unknown-linux-musl" \
    && rustup component add llvm-tools-preview \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# The whole workspace (see .dockerignore): cargo needs every member's manifest (mock/ is a
# member and a path dev-dependency) even to build one package.
COPY . .

# A profile-guided build (benches/pgo.sh): the proxy is built instrumented, trained over loopback
# against the mock upstream (mock/src/train.rs), and built again with the profile; about 5 % less
# CPU per request than a plain musl release build (benches/README.md). Cache mounts keep the crate
# downloads and compiled dependencies between builds. The binary is copied out of the cached
# target directory because cache mounts are not part of the image.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    binary="$(benches/pgo.sh "$(uname -m)-unknown-linux-musl" | tail -n 1)" \
    && install -D -m 0555 "$binary" /out/idmatch-proxy \
    && /out/idmatch-proxy --version

# ---- runtime -------------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="idmatch-proxy" \
      org.opencontainers.image.description="Sidecar that forwards plain HTTP to CM.com's Mobile Identity API over HTTPS, adding a cached HS256 bearer token" \
      org.opencontainers.image.source="https://github.com/idmatch/idmatch-proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/idmatch-proxy /idmatch-proxy

# Numeric, so that Kubernetes' runAsNonRoot can verify it (it cannot resolve user names).
# Nothing is written at run time: the image works with a read-only root filesystem.
USER 65532:65532

# Listen addresses are deliberately not set here: both default to 127.0.0.1 (a sidecar must not
# expose its credentials). Deployments set IDMATCH_LISTEN / IDMATCH_ADMIN_LISTEN per pattern.
#   8080: the proxy (IDMATCH_LISTEN)   9901: /livez, /readyz, /metrics (IDMATCH_ADMIN_LISTEN)
EXPOSE 8080 9901

# No shell or curl in the image: the binary probes its own admin listener (/readyz by default).
# Kubernetes ignores HEALTHCHECK and uses the probes in deploy/.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/idmatch-proxy", "healthcheck"]

ENTRYPOINT ["/idmatch-proxy"]
CMD ["run"]
