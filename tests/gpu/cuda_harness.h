/* GPU test/bench harness: R ranks as threads of one process over the cuda backend's ops table,
 * an in-process bootstrap, and the LL buffer alternation that group.c does for the public API.
 * (Weak fallbacks of ep_group_fail / ep_strerror let this build before group.c lands.) */
#ifndef CUDA_HARNESS_H
#define CUDA_HARNESS_H

#include "group.h"

#include <pthread.h>

#define H_SKIP 77 /* CTest SKIP_RETURN_CODE */

typedef struct h_world {
    int nranks;
    pthread_barrier_t bar;
    unsigned char *gather; /* nranks * slot */
    size_t slot;
} h_world_t;

int h_world_init(h_world_t *w, int nranks);
void h_world_fini(h_world_t *w);
void h_bootstrap(h_world_t *w, int rank, ep_bootstrap_t *bs);
void h_barrier(h_world_t *w);

/* Creates rank `rank`'s group on the cuda backend (collective over the world's threads). */
ep_status_t h_group_create(const ep_config_t *cfg, h_world_t *w, int rank, ep_group_t **out);
void h_group_destroy(ep_group_t *g);

ep_status_t h_ll_dispatch(ep_group_t *g, const ep_ll_dispatch_args_t *a, ep_ll_dispatch_out_t *o,
                          ep_ll_handle_t **h, ep_hook_t **hook);
ep_status_t h_ll_combine(ep_group_t *g, const ep_ll_combine_args_t *a, ep_hook_t **hook);
ep_status_t h_hook_run(ep_group_t *g, ep_hook_t *hook);

/* Number of CUDA devices, 0 when none (or no driver). */
int h_device_count(void);

/* host-side conversions, written independently of the kernels */
float h_bf16_to_f(uint16_t b);
uint16_t h_f_to_bf16(float f);
uint8_t h_f_to_e4m3(float f);
float h_e4m3_to_f(uint8_t q);

#endif
