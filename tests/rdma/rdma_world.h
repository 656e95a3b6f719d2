/* What the rdma tests add to the forked world (tests/common/fork_world.h: one process per rank,
 * each meeting the others over the tcp bootstrap on loopback): skipping when no verbs device
 * exists, and a longer bootstrap wait for ranks in an emulated VM. */
#ifndef RDMA_WORLD_H
#define RDMA_WORLD_H

#include "fork_world.h"

#define WORLD_SKIP 77 /* CTest SKIP_RETURN_CODE */

/* The tcp bootstrap's wait (world_bootstrap_ms) the tests set: in the Soft-RoCE VM (qemu TCG)
 * ranks are slow to start. */
#define RDMA_WORLD_BOOTSTRAP_MS 20000u

/* Number of verbs devices with an active port (0: the test should skip). */
int world_rdma_ports(void);

#endif /* RDMA_WORLD_H */
