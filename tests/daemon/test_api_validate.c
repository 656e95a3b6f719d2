/* Request validation (daemon/api_validate.c) on token-id prompts, no engine: every value the
 * engine or the sampler would refuse is a 400 naming the field, with a message that says why. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "api_internal.h"

static const epd_engine_info_t g_info = {
    .model_id = "oracle", .vocab_size = 384, .max_seq_len = 512};

/* Validates body as a completions request; returns the status (0: accepted). */
static int check(const char *body, verr_t *v, creq_t *q)
{
    epd_api_t a = {.tok_state = TOK_ABSENT};
    snprintf(a.tok_err, sizeof(a.tok_err), "no tokenizer");
    cJSON *root = cJSON_Parse(body);
    assert_non_null(root);
    memset(v, 0, sizeof(*v));
    int rc = api_parse_request(&a, root, &g_info, 0, q, v);
    cJSON_Delete(root);
    return rc ? v->status : 0;
}

static void expect_400(const char *body, const char *param, const char *msg_part)
{
    verr_t v;
    creq_t q;
    int st = check(body, &v, &q);
    api_creq_free(&q);
    if (st != 400 || strcmp(v.param, param) != 0 || !strstr(v.msg, msg_part))
        fail_msg("%s: status %d param '%s' message '%s'; expected 400 '%s' with '%s'", body, st,
                 v.param, v.msg, param, msg_part);
}

static void top_p_that_rounds_to_zero_is_a_400(void **state)
{
    expect_400("{\"prompt\":[1],\"top_p\":1e-46}", "top_p", "0 as the 32-bit float");
    expect_400("{\"prompt\":[1],\"top_p\":0}", "top_p", "'top_p' is 0");
    /* the smallest top_p the sampler takes */
    verr_t v;
    creq_t q;
    assert_int_equal(check("{\"prompt\":[1],\"top_p\":1e-45}", &v, &q), 0);
    api_creq_free(&q);
}

static void numbers_beyond_a_double_are_out_of_range(void **state)
{
    expect_400("{\"prompt\":[1],\"max_tokens\":1e400}", "max_tokens", "out of range");
    expect_400("{\"prompt\":[1],\"max_tokens\":-1e400}", "max_tokens", "out of range");
    expect_400("{\"prompt\":[1],\"max_tokens\":1e300}", "max_tokens", "out of range");
    expect_400("{\"prompt\":[1],\"max_tokens\":2.5}", "max_tokens", "not a fraction");
    expect_400("{\"prompt\":[1],\"temperature\":1e400}", "temperature", "it must be in [0, 2]");
    expect_400("{\"prompt\":[1],\"top_p\":-1e400}", "top_p", "it must be in (0, 1]");
    expect_400("{\"prompt\":[1],\"top_k\":1e400}", "top_k", "non-negative integer");
    expect_400("{\"prompt\":[1,1e400]}", "prompt", "outside the vocabulary");
}

static void accepted_values_reach_the_request(void **state)
{
    verr_t v;
    creq_t q;
    assert_int_equal(check("{\"prompt\":[1,2],\"max_tokens\":7,\"temperature\":1e-50,"
                           "\"top_p\":0.5,\"top_k\":3}",
                           &v, &q),
                     0);
    assert_int_equal(q.max_tokens, 7);
    assert_int_equal(q.top_k, 3);
    assert_int_equal(q.len[0], 2);
    api_creq_free(&q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(top_p_that_rounds_to_zero_is_a_400),
        cmocka_unit_test(numbers_beyond_a_double_are_out_of_range),
        cmocka_unit_test(accepted_values_reach_the_request),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
