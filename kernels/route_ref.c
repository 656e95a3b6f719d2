/* Softmax top-k, softmax group-limited and sigmoid group-limited top-k routing on the host
 * (formulas in route_ref.h). */
#include "route_ref.h"

#include <math.h>
#include <stdlib.h>

/* Picks the k best of score[0..n) whose mask is set (mask NULL: all), best first, ties to the
 * lower index; writes their indices to out. A selected entry is skipped by later rounds
 * through `taken`. O(n k), k <= 16. */
static void pick_topk(const float *score, const uint8_t *mask, uint8_t *taken, int n, int k,
                      int32_t *out)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            if ((mask && !mask[e]) || taken[e]) continue;
            if (best < 0 || score[e] > score[best]) best = e;
        }
        out[j] = best;
        if (best >= 0) taken[best] = 1;
    }
}

/* Keeps the topk_groups best groups by gscore[G]: mask[E] gets 1 for their experts. */
static void keep_groups(const ep_route_params_t *p, const float *gscore, uint8_t *taken,
                        uint8_t *mask, int32_t *gsel)
{
    int E = p->num_experts, G = p->num_groups, per = E / G;
    for (int g = 0; g < G; g++)
        taken[g] = 0;
    pick_topk(gscore, NULL, taken, G, p->topk_groups, gsel);
    for (int e = 0; e < E; e++) {
        mask[e] = 0;
        taken[e] = 0;
    }
    for (int i = 0; i < p->topk_groups; i++)
        for (int e = 0; e < per; e++)
            mask[(size_t)gsel[i] * per + e] = 1;
}

static void route_softmax(const ep_route_params_t *p, const float *l, float *prob, float *gscore,
                          uint8_t *taken, uint8_t *mask, int32_t *gsel, int32_t *idx, float *w)
{
    int E = p->num_experts;
    float mx = l[0];
    for (int e = 1; e < E; e++)
        if (l[e] > mx) mx = l[e];
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        prob[e] = expf(l[e] - mx);
        sum += prob[e];
    }
    for (int e = 0; e < E; e++) {
        prob[e] = prob[e] / sum;
        taken[e] = 0;
    }
    const uint8_t *sel = NULL;
    if (p->kind == EP_ROUTE_SOFTMAX_GROUP) {
        int per = E / p->num_groups;
        for (int g = 0; g < p->num_groups; g++) {
            float b = prob[(size_t)g * per];
            for (int i = 1; i < per; i++)
                if (prob[(size_t)g * per + i] > b) b = prob[(size_t)g * per + i];
            gscore[g] = b;
        }
        keep_groups(p, gscore, taken, mask, gsel);
        sel = mask;
    }
    pick_topk(prob, sel, taken, E, p->topk, idx);
    float s = 0.0f;
    for (int j = 0; j < p->topk; j++) {
        w[j] = prob[idx[j]];
        s += w[j];
    }
    for (int j = 0; j < p->topk; j++) {
        if (p->renormalize) w[j] = w[j] / s;
        w[j] = w[j] * p->routed_scaling_factor;
    }
}

static void route_sigmoid_group(const ep_route_params_t *p, const float *l, float *sig,
                                float *biased, float *gscore, uint8_t *taken, uint8_t *mask,
                                int32_t *gsel, int32_t *idx, float *w)
{
    int E = p->num_experts, G = p->num_groups, per = E / G;
    for (int e = 0; e < E; e++) {
        sig[e] = 1.0f / (1.0f + expf(-l[e]));
        biased[e] = sig[e] + (p->bias ? p->bias[e] : 0.0f);
    }
    for (int g = 0; g < G; g++) {
        const float *b = biased + (size_t)g * per;
        int first = 0;
        for (int i = 1; i < per; i++)
            if (b[i] > b[first]) first = i;
        float s = b[first];
        if (per > 1) {
            int second = -1;
            for (int i = 0; i < per; i++)
                if (i != first && (second < 0 || b[i] > b[second])) second = i;
            s = s + b[second];
        }
        gscore[g] = s;
    }
    keep_groups(p, gscore, taken, mask, gsel);
    pick_topk(biased, mask, taken, E, p->topk, idx);
    float s = 0.0f;
    for (int j = 0; j < p->topk; j++) {
        w[j] = sig[idx[j]];
        s += w[j];
    }
    for (int j = 0; j < p->topk; j++) {
        if (p->renormalize) w[j] = w[j] / (s + 1e-20f);
        w[j] = w[j] * p->routed_scaling_factor;
    }
}

int ep_route_ref(const ep_route_params_t *p, const float *logits, int num_tokens, int32_t *topk_idx,
                 float *topk_weights)
{
    int rc = -1;
    int E = p->num_experts, k = p->topk;
    /* Scratch on the stack for the usual sizes, the heap beyond. */
    enum { STACK_E = 512 };
    float fbuf[3 * STACK_E];
    uint8_t bbuf[2 * STACK_E];
    int32_t gsel[STACK_E];
    float *f = E <= STACK_E ? fbuf : malloc(sizeof(float) * 3 * (size_t)E);
    uint8_t *b = E <= STACK_E ? bbuf : malloc(2 * (size_t)E);
    int32_t *gs = E <= STACK_E ? gsel : malloc(sizeof(int32_t) * (size_t)E);
    if (!f || !b || !gs) goto out;
    for (int t = 0; t < num_tokens; t++) {
        const float *l = logits + (size_t)t * E;
        int32_t *idx = topk_idx + (size_t)t * k;
        float *w = topk_weights + (size_t)t * k;
        if (p->kind == EP_ROUTE_SIGMOID_GROUP)
            route_sigmoid_group(p, l, f, f + E, f + 2 * (size_t)E, b, b + E, gs, idx, w);
        else
            route_softmax(p, l, f, f + 2 * (size_t)E, b, b + E, gs, idx, w);
    }
    rc = 0;
out:
    if (f != fbuf) free(f);
    if (b != bbuf) free(b);
    if (gs != gsel) free(gs);
    return rc;
}
