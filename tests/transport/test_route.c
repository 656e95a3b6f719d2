/* ep_route_host: softmax top-k, softmax group-limited (DeepSeek-V2) and sigmoid group-limited
 * (DeepSeek-V3) top-k against a naive reference in
 * double precision that sorts every candidate (ties to the lower id). */
#include "harness.h"

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

struct cand {
    double score;
    int id;
};

static int by_score(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->id - y->id;
}

static void ref_route(const ep_route_params_t *p, const float *l, int32_t *idx, float *w)
{
    int E = p->num_experts, k = p->topk;
    struct cand c[1024];
    double val[1024], sum = 0;
    if (p->kind != EP_ROUTE_SIGMOID_GROUP) {
        double mx = -INFINITY;
        for (int e = 0; e < E; e++)
            mx = fmax(mx, l[e]);
        for (int e = 0; e < E; e++)
            sum += (val[e] = exp(l[e] - mx));
        for (int e = 0; e < E; e++)
            c[e] = (struct cand){val[e] / sum, e};
        for (int e = 0; e < E; e++)
            val[e] = val[e] / sum;
        if (p->kind == EP_ROUTE_SOFTMAX_GROUP) {
            /* a group's score is its best p; keep the best groups' experts only */
            int G = p->num_groups, per = E / G, n = 0;
            struct cand gs[256];
            for (int g = 0; g < G; g++) {
                double b = val[g * per];
                for (int i = 1; i < per; i++)
                    b = fmax(b, val[g * per + i]);
                gs[g] = (struct cand){b, g};
            }
            qsort(gs, (size_t)G, sizeof gs[0], by_score);
            for (int i = 0; i < p->topk_groups; i++)
                for (int e = 0; e < per; e++)
                    c[n++] = (struct cand){val[gs[i].id * per + e], gs[i].id * per + e};
            E = n;
        }
        qsort(c, (size_t)E, sizeof c[0], by_score);
    } else {
        int G = p->num_groups, per = E / G, n = 0;
        double biased[1024];
        struct cand gs[256];
        for (int e = 0; e < E; e++) {
            val[e] = 1.0 / (1.0 + exp(-(double)l[e]));
            biased[e] = val[e] + (p->bias ? p->bias[e] : 0.0);
        }
        for (int g = 0; g < G; g++) {
            struct cand in[1024];
            for (int i = 0; i < per; i++)
                in[i] = (struct cand){biased[g * per + i], i};
            qsort(in, (size_t)per, sizeof in[0], by_score);
            gs[g] = (struct cand){in[0].score + (per > 1 ? in[1].score : 0.0), g};
        }
        qsort(gs, (size_t)G, sizeof gs[0], by_score);
        for (int i = 0; i < p->topk_groups; i++)
            for (int e = 0; e < per; e++) {
                int id = gs[i].id * per + e;
                c[n++] = (struct cand){biased[id], id};
            }
        qsort(c, (size_t)n, sizeof c[0], by_score);
    }
    double s = 0;
    for (int j = 0; j < k; j++)
        s += val[c[j].id];
    for (int j = 0; j < k; j++) {
        idx[j] = c[j].id;
        double v = val[c[j].id];
        if (p->renormalize) v /= s;
        w[j] = (float)(v * p->routed_scaling_factor);
    }
}

static void check_case(rng_t *r, ep_route_params_t *p, int T)
{
    int E = p->num_experts, k = p->topk;
    float *logits = malloc(sizeof(float) * (size_t)T * E);
    float *bias = malloc(sizeof(float) * (size_t)E);
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)T * k);
    float *w = malloc(sizeof(float) * (size_t)T * k);
    /* Logits on a 1/64 grid: distinct values are far apart after exp, equal ones tie. */
    for (int i = 0; i < T * E; i++)
        logits[i] = (float)rng_int(r, -256, 256) / 64.0f;
    for (int e = 0; e < E; e++)
        bias[e] = (float)rng_int(r, -8, 8) / 256.0f;
    if (p->kind == EP_ROUTE_SIGMOID_GROUP && rng_int(r, 0, 1)) p->bias = bias;
    assert_int_equal(ep_route_host(p, logits, T, idx, w), EP_OK);
    for (int t = 0; t < T; t++) {
        int32_t ridx[EP_MAX_TOPK];
        float rw[EP_MAX_TOPK];
        ref_route(p, logits + (size_t)t * E, ridx, rw);
        for (int j = 0; j < k; j++) {
            assert_int_equal(idx[t * k + j], ridx[j]);
            assert_true(fabsf(w[t * k + j] - rw[j]) <= 1e-5f * fabsf(rw[j]) + 1e-7f);
        }
    }
    p->bias = NULL;
    free(logits);
    free(bias);
    free(idx);
    free(w);
}

static void softmax_topk_matches_reference(void **state)
{
    (void)state;
    rng_t r = {21};
    for (int it = 0; it < 60; it++) {
        ep_route_params_t p = {.kind = EP_ROUTE_SOFTMAX_TOPK};
        p.num_experts = rng_int(&r, 1, 300);
        p.topk = rng_int(&r, 1, p.num_experts < 8 ? p.num_experts : 8);
        p.renormalize = rng_int(&r, 0, 1);
        p.routed_scaling_factor = rng_int(&r, 0, 1) ? 1.0f : 2.5f;
        check_case(&r, &p, rng_int(&r, 0, 40));
    }
}

/* 60 random group-limited cases of a kind: 1, 2, 4 or 8 groups, any of them kept. */
static void group_cases(ep_route_kind_t kind, uint64_t seed, float big_scaling)
{
    rng_t r = {seed};
    static const int groups[] = {1, 2, 4, 8};
    for (int it = 0; it < 60; it++) {
        ep_route_params_t p = {.kind = kind};
        p.num_groups = groups[rng_int(&r, 0, 3)];
        p.num_experts = p.num_groups * rng_int(&r, 1, 32);
        p.topk_groups = rng_int(&r, 1, p.num_groups);
        int cand = p.topk_groups * (p.num_experts / p.num_groups);
        p.topk = rng_int(&r, 1, cand < 8 ? cand : 8);
        p.renormalize = rng_int(&r, 0, 1);
        p.routed_scaling_factor = rng_int(&r, 0, 1) ? 1.0f : big_scaling;
        check_case(&r, &p, rng_int(&r, 0, 40));
    }
}

static void sigmoid_group_matches_reference(void **state)
{
    (void)state;
    group_cases(EP_ROUTE_SIGMOID_GROUP, 22, 2.5f);
}

static void softmax_group_matches_reference(void **state)
{
    (void)state;
    group_cases(EP_ROUTE_SOFTMAX_GROUP, 23, 16.0f);
}

static void ties_go_to_the_lower_expert(void **state)
{
    (void)state;
    float l[8] = {1, 3, 3, 0, 3, 2, 2, 0};
    int32_t idx[4];
    float w[4];
    ep_route_params_t p = {.kind = EP_ROUTE_SOFTMAX_TOPK,
                           .num_experts = 8,
                           .topk = 4,
                           .renormalize = 1,
                           .routed_scaling_factor = 1.0f};
    assert_int_equal(ep_route_host(&p, l, 1, idx, w), EP_OK);
    assert_int_equal(idx[0], 1);
    assert_int_equal(idx[1], 2);
    assert_int_equal(idx[2], 4);
    assert_int_equal(idx[3], 5);
    assert_true(fabsf(w[0] + w[1] + w[2] + w[3] - 1.0f) < 1e-6f);
    /* DeepSeek-style: 4 groups of 2; group scores are sums of both members. */
    float l2[8] = {0, 0, 2, 2, -1, 5, 1, 1};
    ep_route_params_t q = {.kind = EP_ROUTE_SIGMOID_GROUP,
                           .num_experts = 8,
                           .topk = 2,
                           .renormalize = 0,
                           .routed_scaling_factor = 1.0f,
                           .num_groups = 4,
                           .topk_groups = 1};
    assert_int_equal(ep_route_host(&q, l2, 1, idx, w), EP_OK);
    /* group 1 (2+2 -> 2 sigmoid(2)=1.76) beats group 2 (sigmoid(-1)+sigmoid(5)=1.26) */
    assert_int_equal(idx[0], 2);
    assert_int_equal(idx[1], 3);
    assert_true(fabsf(w[0] - 1.0f / (1.0f + expf(-2.0f))) < 1e-6f);
}

static void bad_params_are_rejected(void **state)
{
    (void)state;
    float l[8] = {0};
    int32_t idx[8];
    float w[8];
    ep_route_params_t p = {
        .kind = EP_ROUTE_SOFTMAX_TOPK, .num_experts = 8, .topk = 9, .routed_scaling_factor = 1};
    assert_int_equal(ep_route_host(&p, l, 1, idx, w), EP_ERR_INVALID);
    assert_non_null(strstr(ep_group_last_error(NULL), "topk"));
    p.topk = 2;
    assert_int_equal(ep_route_host(&p, NULL, 1, idx, w), EP_ERR_INVALID);
    assert_int_equal(ep_route_host(&p, l, -1, idx, w), EP_ERR_INVALID);
    ep_route_params_t q = {.kind = EP_ROUTE_SIGMOID_GROUP,
                           .num_experts = 8,
                           .topk = 4,
                           .routed_scaling_factor = 1,
                           .num_groups = 3,
                           .topk_groups = 1};
    assert_int_equal(ep_route_host(&q, l, 1, idx, w), EP_ERR_INVALID);
    q.num_groups = 4; /* 1 group of 2 experts cannot give 4 */
    assert_int_equal(ep_route_host(&q, l, 1, idx, w), EP_ERR_INVALID);
    q.topk_groups = 2;
    assert_int_equal(ep_route_host(&q, l, 1, idx, w), EP_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(softmax_topk_matches_reference),
        cmocka_unit_test(softmax_group_matches_reference),
        cmocka_unit_test(sigmoid_group_matches_reference),
        cmocka_unit_test(ties_go_to_the_lower_expert),
        cmocka_unit_test(bad_params_are_rejected),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
