/* Test helper for the serving tests: reads the oracle's expected.json and checks the shape of
 * epd's completion responses (JSON and server-sent events), printing what the shell compares.
 *
 *   json_check cases EXPECTED.json     one line per case: "PROMPT_IDS TOKENS" (comma lists)
 *   json_check completion FILE         one line per choice: "INDEX TOKENS FINISH"; checks the
 *                                      OpenAI shape and that usage adds up
 *   json_check sse FILE                the same from an event stream ending in [DONE]
 *   json_check error FILE              the error message; checks OpenAI's error shape
 *   json_check bytetok ID              prints a byte-level tokenizer.json of 256 ids, byte b
 *                                      being id b except that byte 0x00 and byte ID swap ids
 *                                      (so that a generated ID decodes to U+0000)
 * Exit 0 on success, 1 (with a message on stderr) if the input is not what it must be. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CHOICES 64
#define MAX_TOKENS 4096

static int fail(const char *what, const char *file)
{
    fprintf(stderr, "json_check: %s: %s\n", file, what);
    return 1;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    for (size_t r; buf && (r = fread(buf + n, 1, cap - n, f)) > 0;) {
        n += r;
        if (n == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf) buf[n] = 0;
    *len = n;
    return buf;
}

static void print_ids(const cJSON *arr)
{
    int first = 1;
    for (const cJSON *v = arr ? arr->child : NULL; v; v = v->next) {
        printf("%s%d", first ? "" : ",", v->valueint);
        first = 0;
    }
    if (first) printf("-");
}

static int cases(const char *path)
{
    size_t len;
    char *text = slurp(path, &len);
    cJSON *root = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    const cJSON *cs = cJSON_GetObjectItemCaseSensitive(root, "cases");
    if (!cJSON_IsArray(cs)) return fail("no cases", path);
    for (const cJSON *c = cs->child; c; c = c->next) {
        print_ids(cJSON_GetObjectItemCaseSensitive(c, "prompt"));
        printf(" ");
        print_ids(cJSON_GetObjectItemCaseSensitive(c, "tokens"));
        printf("\n");
    }
    cJSON_Delete(root);
    return 0;
}

static int check_head(const cJSON *doc, const char *file)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(doc, "id");
    const cJSON *obj = cJSON_GetObjectItemCaseSensitive(doc, "object");
    if (!cJSON_IsString(id) || strncmp(id->valuestring, "cmpl-", 5) != 0)
        return fail("id is not \"cmpl-...\"", file);
    if (!cJSON_IsString(obj) || strcmp(obj->valuestring, "text_completion") != 0)
        return fail("object is not \"text_completion\"", file);
    if (!cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(doc, "created")) ||
        !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(doc, "model")) ||
        !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(doc, "choices")))
        return fail("created/model/choices missing", file);
    return 0;
}

static int check_choice(const cJSON *ch, int stream, const char *file)
{
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(ch, "text");
    const cJSON *fr = cJSON_GetObjectItemCaseSensitive(ch, "finish_reason");
    if (!cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(ch, "index")))
        return fail("choice without index", file);
    if (!cJSON_IsString(text) || text->valuestring[0]) return fail("choice text is not \"\"", file);
    if (!cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(ch, "token_ids")))
        return fail("choice without token_ids", file);
    if (!(stream && cJSON_IsNull(fr)) &&
        !(cJSON_IsString(fr) &&
          (!strcmp(fr->valuestring, "length") || !strcmp(fr->valuestring, "stop"))))
        return fail("finish_reason is not length/stop", file);
    return 0;
}

static int check_usage(const cJSON *u, int completion_tokens, const char *file)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(u, "prompt_tokens");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(u, "completion_tokens");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(u, "total_tokens");
    if (!cJSON_IsNumber(p) || !cJSON_IsNumber(c) || !cJSON_IsNumber(t))
        return fail("usage incomplete", file);
    if (c->valueint != completion_tokens) return fail("usage.completion_tokens is wrong", file);
    if (t->valueint != p->valueint + c->valueint) return fail("usage.total_tokens is wrong", file);
    return 0;
}

static int completion(const char *path)
{
    size_t len;
    char *text = slurp(path, &len);
    cJSON *doc = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    if (!doc) return fail("not JSON", path);
    int rc = check_head(doc, path), total = 0;
    const cJSON *chs = cJSON_GetObjectItemCaseSensitive(doc, "choices");
    int i = 0;
    for (const cJSON *ch = chs ? chs->child : NULL; !rc && ch; ch = ch->next, i++) {
        if ((rc = check_choice(ch, 0, path))) break;
        if (cJSON_GetObjectItemCaseSensitive(ch, "index")->valueint != i)
            rc = fail("choices out of order", path);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(ch, "token_ids");
        total += cJSON_GetArraySize(ids);
        printf("%d ", i);
        print_ids(ids);
        printf(" %s\n", cJSON_GetObjectItemCaseSensitive(ch, "finish_reason")->valuestring);
    }
    if (!rc) rc = check_usage(cJSON_GetObjectItemCaseSensitive(doc, "usage"), total, path);
    cJSON_Delete(doc);
    return rc;
}

static int sse(const char *path)
{
    size_t len;
    char *text = slurp(path, &len);
    if (!text) return fail("cannot read", path);
    static int toks[MAX_CHOICES][MAX_TOKENS];
    int ntok[MAX_CHOICES] = {0}, nchoices = 0, done = 0, rc = 0, total = 0;
    char finish[MAX_CHOICES][16] = {{0}};
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && !rc;
         line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '\r' || line[0] == 0) continue;
        if (strncmp(line, "data: ", 6) != 0) {
            rc = fail("a line that is not \"data: ...\"", path);
            break;
        }
        if (done) {
            rc = fail("data after [DONE]", path);
            break;
        }
        if (!strcmp(line + 6, "[DONE]")) {
            done = 1;
            continue;
        }
        cJSON *doc = cJSON_Parse(line + 6);
        if (!doc) {
            rc = fail("a chunk that is not JSON", path);
            break;
        }
        if (cJSON_GetObjectItemCaseSensitive(doc, "error")) {
            fprintf(stderr, "json_check: %s: error event: %s\n", path, line + 6);
            rc = 1;
        }
        if (!rc) rc = check_head(doc, path);
        const cJSON *chs = cJSON_GetObjectItemCaseSensitive(doc, "choices");
        const cJSON *usage = cJSON_GetObjectItemCaseSensitive(doc, "usage");
        if (!rc && usage) rc = check_usage(usage, total, path);
        for (const cJSON *ch = chs ? chs->child : NULL; !rc && ch; ch = ch->next) {
            if ((rc = check_choice(ch, 1, path))) break;
            int i = cJSON_GetObjectItemCaseSensitive(ch, "index")->valueint;
            if (i < 0 || i >= MAX_CHOICES || finish[i][0]) {
                rc = fail("a chunk for a finished or impossible choice", path);
                break;
            }
            if (i >= nchoices) nchoices = i + 1;
            const cJSON *ids = cJSON_GetObjectItemCaseSensitive(ch, "token_ids");
            for (const cJSON *v = ids->child; v && ntok[i] < MAX_TOKENS; v = v->next) {
                toks[i][ntok[i]++] = v->valueint;
                total++;
            }
            const cJSON *fr = cJSON_GetObjectItemCaseSensitive(ch, "finish_reason");
            if (cJSON_IsString(fr)) snprintf(finish[i], sizeof(finish[i]), "%s", fr->valuestring);
        }
        cJSON_Delete(doc);
    }
    free(text);
    if (!rc && !done) rc = fail("the stream does not end with data: [DONE]", path);
    for (int i = 0; !rc && i < nchoices; i++) {
        if (!finish[i][0]) {
            rc = fail("a choice without finish_reason", path);
            break;
        }
        printf("%d ", i);
        for (int j = 0; j < ntok[i]; j++)
            printf("%s%d", j ? "," : "", toks[i][j]);
        printf("%s %s\n", ntok[i] ? "" : "-", finish[i]);
    }
    return rc;
}

static int error(const char *path)
{
    size_t len;
    char *text = slurp(path, &len);
    cJSON *doc = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(doc, "error");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(e, "message");
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "type");
    int rc = 0;
    if (!cJSON_IsString(m) || !cJSON_IsString(t) || !cJSON_GetObjectItemCaseSensitive(e, "param") ||
        !cJSON_GetObjectItemCaseSensitive(e, "code"))
        rc = fail("not {\"error\":{\"message\",\"type\",\"param\",\"code\"}}", path);
    else
        printf("%s\n", m->valuestring);
    cJSON_Delete(doc);
    return rc;
}

/* GPT-2's bytes_to_unicode: printable bytes keep their value, the others get 256, 257, ...
 * in byte order; written as UTF-8. */
static void spell_byte(unsigned b, char out[3])
{
#define PRINTABLE(x) (((x) >= 33 && (x) <= 126) || ((x) >= 161 && (x) <= 172) || (x) >= 174)
    unsigned cp = b;
    if (!PRINTABLE(b)) {
        cp = 256;
        for (unsigned x = 0; x < b; x++)
            cp += !PRINTABLE(x);
    }
#undef PRINTABLE
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

static int bytetok(const char *arg)
{
    int swap = atoi(arg);
    if (swap < 0 || swap > 255) return fail("the id must be in 0..255", arg);
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "version", "1.0");
    cJSON_AddArrayToObject(root, "added_tokens");
    cJSON_AddNullToObject(root, "normalizer");
    cJSON *bl = cJSON_CreateObject();
    cJSON_AddStringToObject(bl, "type", "ByteLevel");
    cJSON_AddFalseToObject(bl, "add_prefix_space");
    cJSON_AddFalseToObject(bl, "trim_offsets");
    cJSON_AddFalseToObject(bl, "use_regex");
    cJSON_AddItemToObject(root, "pre_tokenizer", cJSON_Duplicate(bl, 1));
    cJSON_AddItemToObject(root, "post_processor", cJSON_Duplicate(bl, 1));
    cJSON_AddItemToObject(root, "decoder", bl);
    cJSON *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddNullToObject(model, "unk_token");
    cJSON_AddFalseToObject(model, "byte_fallback");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    cJSON_AddArrayToObject(model, "merges");
    for (int b = 0; b < 256; b++) {
        char t[3];
        spell_byte((unsigned)b, t);
        cJSON_AddNumberToObject(vocab, t, b == 0 ? swap : b == swap ? 0 : b);
    }
    char *s = cJSON_Print(root);
    printf("%s\n", s);
    cJSON_free(s);
    cJSON_Delete(root);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: json_check cases|completion|sse|error FILE\n");
        return 2;
    }
    if (!strcmp(argv[1], "cases")) return cases(argv[2]);
    if (!strcmp(argv[1], "completion")) return completion(argv[2]);
    if (!strcmp(argv[1], "sse")) return sse(argv[2]);
    if (!strcmp(argv[1], "error")) return error(argv[2]);
    if (!strcmp(argv[1], "bytetok")) return bytetok(argv[2]);
    fprintf(stderr, "json_check: unknown command %s\n", argv[1]);
    return 2;
}
