/* Expert -> rank placement and its translation to libep's slot numbering. */
#include "placement.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static int alloc(int num_experts, int nranks, epd_model_placement_t *p, epd_err_t *err)
{
    memset(p, 0, sizeof(*p));
    if (num_experts <= 0 || nranks <= 0)
        return epd_err_set(err, -EINVAL, "placement: %d experts over %d ranks", num_experts,
                           nranks);
    if (num_experts % nranks != 0)
        return epd_err_set(err, -EINVAL,
                           "placement: %d experts do not split evenly over %d ranks (libep needs "
                           "E / R experts on every rank)",
                           num_experts, nranks);
    p->num_experts = num_experts;
    p->nranks = nranks;
    p->local = num_experts / nranks;
    p->slot_of = malloc(sizeof(int) * (size_t)num_experts);
    p->expert_of = malloc(sizeof(int) * (size_t)num_experts);
    if (!p->slot_of || !p->expert_of) {
        epd_model_placement_fini(p);
        return epd_err_set(err, -ENOMEM, "placement: out of memory");
    }
    return 0;
}

int epd_model_placement_contiguous(int num_experts, int nranks, epd_model_placement_t *p,
                                   epd_err_t *err)
{
    int rc = alloc(num_experts, nranks, p, err);
    if (rc) return rc;
    for (int e = 0; e < num_experts; e++)
        p->slot_of[e] = p->expert_of[e] = e;
    return 0;
}

int epd_model_placement_explicit(int num_experts, int nranks, const int *rank_of, int n,
                                 epd_model_placement_t *p, epd_err_t *err)
{
    int rc = alloc(num_experts, nranks, p, err);
    if (rc) return rc;
    if (n != num_experts) {
        epd_model_placement_fini(p);
        return epd_err_set(err, -EINVAL, "expert_map: %d entries for %d experts", n, num_experts);
    }
    int *fill = calloc((size_t)nranks, sizeof(int));
    if (!fill) {
        epd_model_placement_fini(p);
        return epd_err_set(err, -ENOMEM, "placement: out of memory");
    }
    for (int e = 0; e < num_experts; e++) {
        int r = rank_of[e];
        if (r < 0 || r >= nranks) {
            rc = epd_err_set(err, -EINVAL, "expert_map[%d]: rank %d outside 0..%d", e, r,
                             nranks - 1);
            goto fail;
        }
        if (fill[r] == p->local) {
            rc = epd_err_set(err, -EINVAL,
                             "expert_map[%d]: rank %d already holds %d experts (every rank must "
                             "hold exactly %d)",
                             e, r, p->local, p->local);
            goto fail;
        }
        int slot = r * p->local + fill[r]++;
        p->slot_of[e] = slot;
        p->expert_of[slot] = e;
    }
    free(fill);
    return 0; /* E entries with at most L per rank: every rank holds exactly L */
fail:
    free(fill);
    epd_model_placement_fini(p);
    return rc;
}

void epd_model_placement_fini(epd_model_placement_t *p)
{
    free(p->slot_of);
    free(p->expert_of);
    p->slot_of = p->expert_of = NULL;
}
