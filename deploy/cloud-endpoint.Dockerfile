# The cloud endpoint: the release binary from target/release (built once by the
# workspace's build, not again in here) on the locally made Debian base (deploy/base.sh),
# which carries QEMU and qemu-img for the endpoint's hosts. Built by deploy/build-images.sh.
ARG BASE
FROM ${BASE}
COPY cloud-endpoint certs /usr/local/bin/
# Every setting can be overridden with its CLOUD_ENDPOINT_* variable (see
# `cloud-endpoint example-config`); these place the state on the volumes and read the
# certificates from a mounted folder.
ENV CLOUD_ENDPOINT_LISTEN=0.0.0.0:4433 \
    CLOUD_ENDPOINT_API_LISTEN=0.0.0.0:8443 \
    CLOUD_ENDPOINT_CERT=/etc/gateway/pki/endpoint.pem \
    CLOUD_ENDPOINT_KEY=/etc/gateway/pki/endpoint.key \
    CLOUD_ENDPOINT_EDGE_CA=/etc/gateway/pki/ca.pem \
    CLOUD_ENDPOINT_DATASTORE_DIR=/var/lib/gateway/datastore \
    CLOUD_ENDPOINT_DATABASE=/var/lib/gateway/inventory/inventory.sqlite3 \
    HOME=/var/lib/gateway
RUN mkdir -p /var/lib/gateway/datastore /var/lib/gateway/inventory /etc/gateway/pki \
 && chown -R 10001:10001 /var/lib/gateway
# Volumes take the folders' owner on first use: the unprivileged user can write them.
VOLUME ["/var/lib/gateway/datastore", "/var/lib/gateway/inventory"]
USER 10001:10001
WORKDIR /var/lib/gateway
# QUIC (migrations) and HTTPS (the vSphere API, /healthz, /readyz).
EXPOSE 4433/udp 8443/tcp
# Loopback only and no credentials: --insecure because the certificate names the
# endpoint's public name, not 127.0.0.1. A draining endpoint answers 503.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS --insecure --max-time 2 https://127.0.0.1:8443/readyz || exit 1
# docker stop sends SIGTERM: the endpoint drains within shutdown_grace_secs (8 s by
# default, under docker's 10 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/cloud-endpoint"]
CMD ["serve"]
