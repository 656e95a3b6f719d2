/* A compute backend of libep (internal): the table every backend (cpu, cuda) implements.
 * group.c validates arguments, picks the LL buffer and turns statuses into messages; a backend
 * only moves and computes. Pointers are in the backend's memory space. */
#ifndef EP_BACKEND_H
#define EP_BACKEND_H

#include "ep.h"

struct ep_backend_ops {
    const char *name;
    /* Allocates the backend's state in g->impl, connects to the peers. Collective. */
    ep_status_t (*create)(ep_group_t *g, const ep_bootstrap_t *bs);
    void (*destroy)(ep_group_t *g);

    ep_status_t (*route)(ep_group_t *g, const ep_route_params_t *p, const float *logits, int T,
                         int32_t *topk_idx, float *topk_weights, void *stream);

    /* buf: which of the two LL buffers this op uses (0 or 1). */
    ep_status_t (*ll_dispatch)(ep_group_t *g, int buf, const ep_ll_dispatch_args_t *a,
                               ep_ll_dispatch_out_t *out, ep_ll_handle_t **handle,
                               ep_hook_t **hook);
    ep_status_t (*ll_combine)(ep_group_t *g, int buf, const ep_ll_combine_args_t *a,
                              ep_hook_t **hook);
    ep_status_t (*hook_run)(ep_group_t *g, ep_hook_t *hook);

    ep_status_t (*get_dispatch_layout)(ep_group_t *g, const int32_t *topk_idx, int T,
                                       ep_ht_layout_t *layout, void *stream);
    ep_status_t (*ht_dispatch)(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                               ep_ht_dispatch_out_t *out, ep_ht_handle_t **handle);
    ep_status_t (*ht_dispatch_cached)(ep_group_t *g, const ep_ht_handle_t *h,
                                      const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out);
    ep_status_t (*ht_combine)(ep_group_t *g, const ep_ht_handle_t *h, const uint16_t *x,
                              uint16_t *out, void *stream);
    void (*ht_handle_destroy)(ep_ht_handle_t *h);

    /* Optional: ep_group_allgather of host control words (len checked by group.c). NULL, or
     * EP_ERR_UNSUPPORTED before anything is sent: the configuration has no such path. */
    ep_status_t (*allgather)(ep_group_t *g, const void *in, void *out, size_t len);

    /* Abort: make the backend's waits return EP_ERR_ABORTED (thread-safe). */
    void (*abort)(ep_group_t *g);
    /* Optional: a failure that work already enqueued reported since (cuda: a kernel's error
     * word), without enqueuing anything. */
    ep_status_t (*check)(ep_group_t *g);
};

extern const struct ep_backend_ops ep_backend_cpu_ops;
#ifdef EP_HAVE_CUDA
extern const struct ep_backend_ops ep_backend_cuda_ops;
#endif

#endif /* EP_BACKEND_H */
