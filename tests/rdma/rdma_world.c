/* The rdma tests' additions to the forked world: the verbs device probe (see rdma_world.h). */
#include "rdma_world.h"

#include <infiniband/verbs.h>

int world_rdma_ports(void)
{
    int n = 0, ports = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    for (int d = 0; list && d < n; d++) {
        struct ibv_context *c = ibv_open_device(list[d]);
        struct ibv_device_attr da;
        if (!c) continue;
        if (!ibv_query_device(c, &da))
            for (int p = 1; p <= da.phys_port_cnt; p++) {
                struct ibv_port_attr pa;
                if (!ibv_query_port(c, (uint8_t)p, &pa) && pa.state == IBV_PORT_ACTIVE) ports++;
            }
        ibv_close_device(c);
    }
    if (list) ibv_free_device_list(list);
    return ports;
}
