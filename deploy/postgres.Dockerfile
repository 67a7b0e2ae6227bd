# PostgreSQL 15 from Debian's packages on the debootstrapped rootfs (deploy/compose_smoke.sh).
FROM hybridnas-postgres-rootfs:15
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
# The named volume takes this folder's owner on first use.
RUN mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
USER postgres
CMD ["/usr/local/bin/postgres-entrypoint.sh"]
