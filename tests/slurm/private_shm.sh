#!/bin/sh
# Runs a command with a private /dev/shm (its own mount namespace), as if it were alone on
# its host. The local cluster's two "nodes" share one host, and so one /dev/shm: two
# streaming local leaders (one per node) would race for the same shared-memory names
# (FileExistsError: '/000000_locals'), which separate hosts never do. The SLURM tests use
# it as the ALBEF_DS command with one task per node: ALBEF_DS="tests/slurm/private_shm.sh albef-ds".
# Needs root (CAP_SYS_ADMIN), as the local cluster does.
exec unshare --mount --propagation private sh -c \
    'mount -t tmpfs -o mode=1777,size=2g albef-node-shm /dev/shm && exec "$@"' private-shm "$@"
