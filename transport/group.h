/* The EP group's internal state, shared by group.c and the backends (internal). */
#ifndef EP_GROUP_H
#define EP_GROUP_H

#include "backend.h"
#include "ep.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>

struct ep_group {
    ep_config_t cfg;
    int rank;
    int nranks;
    int num_local_experts;
    const struct ep_backend_ops *ops;
    void *impl;      /* backend state */
    int ll_next_buf; /* the LL buffer the next LL op uses (0/1) */
    _Atomic int aborted;
    _Atomic int failed_peer;
    pthread_mutex_t err_lock;
    char error[512];
};

/* Every backend's hook, LL handle and HT handle object begins with its header below, so that
 * group.c can find the group (and the backend's ops) from the opaque pointer alone. */
struct ep_hook {
    ep_group_t *group;
};
struct ep_ll_handle {
    ep_group_t *group;
};
struct ep_ht_handle {
    ep_group_t *group;
};

/* Records a failure on the group (thread-safe, the last one wins) and returns st. */
ep_status_t ep_group_fail(ep_group_t *g, int peer, ep_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif /* EP_GROUP_H */
