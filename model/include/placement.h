/* Expert placement: which rank holds each of the E experts of every MoE layer.
 *
 * libep routes by slot: slot s lives on rank s / L (L = E / R experts per rank). A placement
 * maps each expert to a slot; the contiguous placement is the identity (expert e on rank
 * e / L), an explicit one (config model.expert_map[e] = rank) keeps each rank's experts in
 * increasing order within its L slots. Every rank must hold exactly L experts. */
#ifndef EPD_MODEL_PLACEMENT_H
#define EPD_MODEL_PLACEMENT_H

#include "epd_err.h"

typedef struct epd_model_placement {
    int num_experts; /* E */
    int nranks;      /* R */
    int local;       /* L = E / R */
    int *slot_of;    /* [E] expert -> libep slot */
    int *expert_of;  /* [E] libep slot -> expert */
} epd_model_placement_t;

/* Contiguous: expert e on rank e / (E / R). */
int epd_model_placement_contiguous(int num_experts, int nranks, epd_model_placement_t *p,
                                   epd_err_t *err);
/* Explicit: rank_of[e] for every expert (E entries). */
int epd_model_placement_explicit(int num_experts, int nranks, const int *rank_of, int n,
                                 epd_model_placement_t *p, epd_err_t *err);
void epd_model_placement_fini(epd_model_placement_t *p);

static inline int epd_model_placement_rank(const epd_model_placement_t *p, int expert)
{
    return p->slot_of[expert] / p->local;
}
/* The expert in local position l (0..L-1) of rank r. */
static inline int epd_model_placement_local_expert(const epd_model_placement_t *p, int rank, int l)
{
    return p->expert_of[rank * p->local + l];
}

#endif /* EPD_MODEL_PLACEMENT_H */
