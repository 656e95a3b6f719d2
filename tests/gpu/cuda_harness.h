/* GPU test/bench harness: R ranks as threads of one process on the cuda backend through the
 * public API (in-process bootstrap), a barrier for the test's own steps, and host conversions. */
#ifndef CUDA_HARNESS_H
#define CUDA_HARNESS_H

#include "ep.h"

#include <pthread.h>

#define H_SKIP 77 /* CTest SKIP_RETURN_CODE */

typedef struct h_world {
    int nranks;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int waiting, generation, broken;
    ep_inproc_world_t *inproc;
} h_world_t;

int h_world_init(h_world_t *w, int nranks);
void h_world_fini(h_world_t *w);
/* Waits for every rank; returns at once (nonzero) once a rank has broken the world. */
int h_barrier(h_world_t *w);
/* A failing rank breaks the world so that its peers stop waiting for it. */
void h_world_break(h_world_t *w);

/* Creates rank `rank`'s group on the cuda backend (collective over the world's threads). */
ep_status_t h_group_create(const ep_config_t *cfg, h_world_t *w, int rank, ep_group_t **out);
void h_group_destroy(ep_group_t *g);

#define h_ll_dispatch ep_ll_dispatch
#define h_ll_combine ep_ll_combine
#define h_hook_run(g, hook) ep_hook_run(hook)

/* Number of CUDA devices, 0 when none (or no driver). */
int h_device_count(void);

/* host-side conversions, written independently of the kernels */
float h_bf16_to_f(uint16_t b);
uint16_t h_f_to_bf16(float f);
uint8_t h_f_to_e4m3(float f);
float h_e4m3_to_f(uint8_t q);

#endif
