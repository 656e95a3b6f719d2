/* GPU test/bench harness (every GPU test's, tests/gpu and tests/model_cuda): the checks of CUDA
 * and ep_* calls, R ranks as threads of one process on the cuda backend through the public API
 * (in-process bootstrap), a barrier for the test's own steps, and host conversions. */
#ifndef CUDA_HARNESS_H
#define CUDA_HARNESS_H

#include "check.h"
#include "ep.h"

#include <pthread.h>

#define H_SKIP 77 /* CTest SKIP_RETURN_CODE */

/* A CUDA runtime call (or a function returning a cudaError_t as an int) that must succeed; else
 * prints (rank may be -1) and runs on_fail. The caller includes cuda_runtime.h. */
#define H_CUDA_CHECK(rank, on_fail, call)                                                          \
    do {                                                                                           \
        int e_ = (int)(call);                                                                      \
        if (e_ != 0) {                                                                             \
            test_check_failed((rank), -1, __FILE__, __LINE__, #call, "%d (%s)", e_,                \
                              cudaGetErrorString((cudaError_t)e_));                                \
            on_fail;                                                                               \
        }                                                                                          \
    } while (0)

/* An ep_* call on group g (may be NULL) that must return EP_OK; else prints and runs on_fail. */
#define H_EP_CHECK(rank, g, on_fail, call)                                                         \
    do {                                                                                           \
        ep_status_t s_ = (call);                                                                   \
        if (s_ != EP_OK) {                                                                         \
            test_check_failed((rank), -1, __FILE__, __LINE__, #call, "%s: %s", ep_strerror(s_),    \
                              (g) ? ep_group_last_error(g) : "");                                  \
            on_fail;                                                                               \
        }                                                                                          \
    } while (0)

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
/* 1 after printing "SKIP: no CUDA device present" when there is none: main returns H_SKIP. */
int h_skip_without_gpu(void);

/* host-side conversions, written independently of the kernels */
float h_bf16_to_f(uint16_t b);
uint16_t h_f_to_bf16(float f);
uint8_t h_f_to_e4m3(float f);
float h_e4m3_to_f(uint8_t q);

#endif
