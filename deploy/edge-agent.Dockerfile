# The edge agent: FROM scratch, the release binary from target/release and the few
# shared libraries it links (glibc's), which deploy/build-images.sh copies from this
# machine beside it in the build context. No shell, no package manager.
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 state/ /var/lib/edge-agent/
# Checkpoints (resume after an agent restart) go to the volume.
ENV EDGE_AGENT_STATE_DIR=/var/lib/edge-agent \
    HOME=/var/lib/edge-agent
VOLUME ["/var/lib/edge-agent"]
USER 10001:10001
WORKDIR /var/lib/edge-agent
ENTRYPOINT ["/usr/local/bin/edge-agent"]
CMD ["--help"]
