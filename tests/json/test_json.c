/* epd_json on hand-written documents: the first duplicate key and its path, in document
 * order, at any depth and in objects large enough for the hash set; string lengths that see
 * past "\u0000" and raw NUL bytes; strings with NUL written back as \u0000. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "epd_json.h"

/* The path of the first duplicate in text, or "" when there is none. */
static void expect_dup(const char *text, const char *want_path, const char *want_key)
{
    cJSON *root = epd_json_parse(text, strlen(text), NULL);
    assert_non_null(root);
    char path[256];
    const cJSON *d = epd_json_find_duplicate(root, path, sizeof(path));
    if (!want_path) {
        if (d) fail_msg("%s: unexpected duplicate at %s", text, path);
    } else {
        if (!d) fail_msg("%s: no duplicate found, expected %s", text, want_path);
        assert_string_equal(path, want_path);
        assert_string_equal(d->string, want_key);
    }
    cJSON_Delete(root);
}

static void duplicates_are_found_with_their_path(void **state)
{
    expect_dup("{\"prompt\":[1,2],\"prompt\":[1]}", "prompt", "prompt");
    expect_dup("{\"a\":1,\"b\":2,\"a\":3}", "a", "a");
    expect_dup("{\"messages\":[{\"role\":\"user\"},{\"role\":\"user\",\"content\":\"x\","
               "\"role\":\"system\"}]}",
               "messages[1].role", "role");
    expect_dup("{\"a\":{\"b\":{\"c\":1,\"c\":2}}}", "a.b.c", "c");
    expect_dup("[[{}],[{\"x\":1,\"y\":{\"x\":2},\"x\":3}]]", "[1][0].x", "x");
    /* document order: a nested duplicate before a later repeated top-level key */
    expect_dup("{\"a\":{\"x\":1,\"x\":2},\"a\":3}", "a.x", "x");
    expect_dup("{\"a\":3,\"a\":{\"x\":1,\"x\":2}}", "a", "a");
}

static void no_false_duplicates(void **state)
{
    expect_dup("{}", NULL, NULL);
    expect_dup("{\"a\":{\"a\":{\"a\":1}},\"b\":[{\"a\":1},{\"a\":2}]}", NULL, NULL);
    expect_dup("{\"A\":1,\"a\":2}", NULL, NULL);
    expect_dup("[1,\"x\",null,true]", NULL, NULL);
}

/* Objects past the linear scan's size go through the hash set. */
static void large_objects(void **state)
{
    enum { N = 5000 };
    char *text = malloc(N * 24 + 64), *o = text;
    o += sprintf(o, "{\"vocab\":{");
    for (int i = 0; i < N; i++)
        o += sprintf(o, "%s\"t%d\":%d", i ? "," : "", i, i);
    sprintf(o, "}}");
    expect_dup(text, NULL, NULL);
    sprintf(o, ",\"t4321\":7}}");
    expect_dup(text, "vocab.t4321", "t4321");
    free(text);
}

static void lengths_see_past_nul(void **state)
{
    const char text[] =
        "{\"p\":\"a\\u0000b\",\"q\":\"\\u00e9\\ud83d\\ude00\\n\",\"r\":[\"x\\u0000\"],"
        "\"raw\":\"c\0d\",\"e\":\"\"}";
    cJSON *root = epd_json_parse(text, sizeof(text) - 1, NULL);
    assert_non_null(root);
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "p");
    assert_int_equal(epd_json_strlen(p), 3);
    assert_memory_equal(p->valuestring, "a\0b", 3);
    /* é (2 bytes) + U+1F600 (4 bytes) + \n */
    assert_int_equal(epd_json_strlen(cJSON_GetObjectItemCaseSensitive(root, "q")), 7);
    assert_int_equal(epd_json_strlen(cJSON_GetObjectItemCaseSensitive(root, "r")->child), 2);
    const cJSON *raw = cJSON_GetObjectItemCaseSensitive(root, "raw");
    assert_int_equal(epd_json_strlen(raw), 3);
    assert_memory_equal(raw->valuestring, "c\0d", 3);
    assert_int_equal(epd_json_strlen(cJSON_GetObjectItemCaseSensitive(root, "e")), 0);
    assert_int_equal(epd_json_strlen(root), 0);
    cJSON_Delete(root);
    /* items built in memory: strlen */
    cJSON *s = cJSON_CreateString("abc");
    assert_int_equal(epd_json_strlen(s), 3);
    cJSON_Delete(s);
}

static void strings_with_nul_are_written_escaped(void **state)
{
    cJSON *doc = cJSON_CreateObject();
    cJSON_AddItemToObject(doc, "t", epd_json_string_n("a\0\"b\\\n\x01", 7));
    cJSON_AddItemToObject(doc, "u", epd_json_string_n("plain \"q\"", 9));
    char *out = cJSON_PrintUnformatted(doc);
    assert_string_equal(out, "{\"t\":\"a\\u0000\\\"b\\\\\\n\\u0001\",\"u\":\"plain \\\"q\\\"\"}");
    /* and it reads back whole */
    cJSON *back = epd_json_parse(out, strlen(out), NULL);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(back, "t");
    assert_int_equal(epd_json_strlen(t), 7);
    assert_memory_equal(t->valuestring, "a\0\"b\\\n\x01", 7);
    cJSON_Delete(back);
    cJSON_free(out);
    cJSON_Delete(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(duplicates_are_found_with_their_path),
        cmocka_unit_test(no_false_duplicates),
        cmocka_unit_test(large_objects),
        cmocka_unit_test(lengths_see_past_nul),
        cmocka_unit_test(strings_with_nul_are_written_escaped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
