# PostgreSQL for a scale-out domain's shared inventory (docs/scale-out.md): Debian's
# `postgresql` package on the locally made Debian base (deploy/base.sh), so the image
# shares the base's layers with the cloud endpoint's and adds one layer of its own.
# Nothing is pulled from a registry; the packages come from the machine's apt mirror
# (MIRROR, read from its apt configuration by deploy/build-images.sh), which the image
# forgets again. Built by deploy/build-images.sh.
ARG BASE
FROM ${BASE}
ARG MIRROR
ARG SUITE
# One layer: the server and its client tools, without what a container never reads.
# - The postgres user gets fixed ids (volumes keep their owner across rebuilds).
# - No "main" cluster at install time: the entrypoint makes one on the data volume.
# - LLVM (the JIT, 107 MB installed) is left out: the server runs with jit = off, and
#   postgres itself does not link it; only its optional llvmjit.so did, removed too.
# - Perl (47 MB) goes once the packages are configured: only postgresql-common's
#   wrappers (pg_ctlcluster, /usr/bin/psql -> pg_wrapper) use it, and PATH puts the
#   server's own binaries first. Debian's perl-base, which dpkg needs, stays.
# - Locale data, documentation, the apt lists and the mirror's address go.
RUN set -eux; \
    [ -n "$MIRROR" ] && [ -n "$SUITE" ]; \
    groupadd --gid 10002 postgres; \
    useradd --uid 10002 --gid 10002 --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres; \
    mkdir -p /etc/postgresql-common; \
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf; \
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" > /etc/apt/sources.list; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
    pg=$(ls -d /usr/lib/postgresql/*/ | head -n1); \
    ln -s "${pg}bin" /usr/local/lib/postgresql-bin; \
    rm -rf "${pg}lib/bitcode" "${pg}lib/llvmjit"*; \
    llvm=$(dpkg-query -W -f '${db:Status-Status} ${Package}\n' 'libllvm*' 2>/dev/null | awk '$1 == "installed" { print $2 }'); \
    perl=$(dpkg-query -W -f '${db:Status-Status} ${Package}\n' perl 'perl-modules-*' 'libperl5*' 2>/dev/null | awk '$1 == "installed" { print $2 }'); \
    [ -z "$llvm$perl" ] || dpkg --purge --force-depends $llvm $perl; \
    if ldd "${pg}bin/postgres" | grep 'not found'; then exit 1; fi; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* /usr/share/doc/* /usr/share/man/* \
      /usr/share/locale/* /usr/share/i18n/* /usr/share/postgresql/*/man; \
    : > /etc/apt/sources.list; \
    mkdir -p /var/lib/postgresql/data /var/run/postgresql; \
    chown -R 10002:10002 /var/lib/postgresql /var/run/postgresql; \
    chmod 0700 /var/lib/postgresql/data
COPY gateway-postgres /usr/local/bin/gateway-postgres
ENV PATH=/usr/local/lib/postgresql-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
# The data folder: initialised on the first start (an empty volume), kept afterwards.
VOLUME ["/var/lib/postgresql/data"]
USER 10002:10002
WORKDIR /var/lib/postgresql
EXPOSE 5432/tcp
# Ready once the server takes connections over TCP, which it does only after the first
# start's database and user exist (that setup listens on a private socket only).
HEALTHCHECK --interval=2s --timeout=3s --start-period=30s --retries=5 \
  CMD pg_isready -q -h 127.0.0.1 -p 5432 -d "${GATEWAY_DB_NAME:-gateway}" -U "${GATEWAY_DB_USER:-gateway}" || exit 1
# Fast shutdown: open transactions are rolled back, the server stops within docker's 10 s.
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/gateway-postgres"]
