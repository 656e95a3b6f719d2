/* libFuzzer target for the tokenizer's untrusted inputs: text to encode (any bytes, valid UTF-8
 * or not) and ids to decode. A synthetic byte-level tokenizer with Qwen3's Split regex, NFC and
 * added tokens is written once at start-up. Checks, besides memory safety: encoding fails only on
 * ill-formed UTF-8, valid text never decodes to a U+FFFD it did not contain, and the streaming
 * decoder's pieces add up to the one-shot decoding.
 * Input: first byte < 0x80: the rest is text; otherwise the rest is little-endian int32 ids. */
#define _GNU_SOURCE /* memmem */
#include "epd_tok.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static epd_tok_t *g_tok;

static const char k_qwen_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| "
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+";

/* Byte b's character in GPT-2's byte-level alphabet, as UTF-8. */
static void byte_char(unsigned b, char out[3])
{
    unsigned cp = b, n = 0;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
        for (unsigned x = 0; x < b; x++)
            n += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174);
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char dir[] = "/tmp/epd_tok_fuzz_XXXXXX", path[64];
    epd_err_t err = {0};
    if (!mkdtemp(dir)) abort();
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) abort();
    fprintf(f,
            "{\"added_tokens\": [{\"id\": 300, \"content\": \"<|im_start|>\", \"special\": true,"
            " \"normalized\": false}, {\"id\": 301, \"content\": \"<think>\", \"special\": false,"
            " \"normalized\": false}, {\"id\": 302, \"content\": \"\\u00c5\\u65e5\", "
            "\"special\": false, \"normalized\": true}],"
            " \"normalizer\": {\"type\": \"NFC\"},"
            " \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": ["
            "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"%s\"}, \"behavior\": \"Isolated\","
            " \"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false,"
            " \"use_regex\": false}]}, \"decoder\": {\"type\": \"ByteLevel\"},"
            " \"model\": {\"type\": \"BPE\", \"vocab\": {",
            k_qwen_regex);
    for (unsigned b = 0; b < 256; b++) {
        char c[3];
        byte_char(b, c);
        fprintf(f, "%s\"%s%s\": %u", b ? ", " : "", (c[0] == '"' || c[0] == '\\') ? "\\" : "", c,
                b);
    }
    /* a few merges, so that BPE has work: "Ġt" "he" "Ġthe" "ĠĠ" "in" */
    fprintf(f, ", \"\\u0120t\": 256, \"he\": 257, \"\\u0120the\": 258, \"\\u0120\\u0120\": 259,"
               " \"in\": 260}, \"merges\": [\"\\u0120 t\", \"h e\", [\"\\u0120t\", \"he\"],"
               " \"\\u0120 \\u0120\", \"i n\"]}}");
    fclose(f);
    if (epd_tok_load_files(path, NULL, NULL, NULL, &g_tok, &err) != 0) {
        fprintf(stderr, "fuzz_tok: %s\n", err.msg);
        abort();
    }
    unlink(path);
    rmdir(dir);
    return 0;
}

static void check_stream(const int32_t *ids, size_t n, const char *want, size_t want_len)
{
    epd_tok_stream_t *s;
    epd_err_t err = {0};
    if (epd_tok_stream_create(g_tok, 0, &s) != 0) abort();
    size_t off = 0;
    for (size_t i = 0; i <= n; i++) {
        const char *t;
        size_t tl;
        if (i < n) {
            if (epd_tok_stream_push(s, ids[i], &t, &tl, &err) != 0) abort();
        } else if (epd_tok_stream_flush(s, &t, &tl) != 0) {
            abort();
        }
        if (off + tl > want_len || memcmp(want + off, t, tl) != 0) abort();
        off += tl;
    }
    if (off != want_len) abort();
    epd_tok_stream_destroy(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    epd_err_t err = {0};
    if (size == 0) return 0;
    if (data[0] < 0x80) {
        epd_tok_ids_t ids = {0};
        int st = epd_tok_encode(g_tok, (const char *)data + 1, size - 1, 0, &ids, &err);
        if (st == 0) {
            char *out;
            size_t len;
            if (epd_tok_decode(g_tok, ids.ids, ids.len, 0, &out, &len, &err) != 0) abort();
            /* valid UTF-8 in, whole tokens out: no replacement characters can appear unless
             * the input had them (an added token spelled entirely in the byte-level alphabet,
             * like "\u00e9", would decode to raw byte 0xE9 as Hugging Face's ByteLevel decoder
             * does; this tokenizer has none) */
            if (memmem(out, len, "\xEF\xBF\xBD", 3) &&
                !memmem(data + 1, size - 1, "\xEF\xBF\xBD", 3))
                abort();
            check_stream(ids.ids, ids.len, out, len);
            free(out);
        } else if (st != -EINVAL) {
            abort();
        }
        epd_tok_ids_fini(&ids);
    } else {
        size_t n = (size - 1) / 4;
        int32_t *ids = malloc((n ? n : 1) * sizeof(*ids));
        if (!ids) return 0;
        for (size_t i = 0; i < n; i++) {
            uint32_t v;
            memcpy(&v, data + 1 + 4 * i, 4);
            ids[i] = (int32_t)(v % 320); /* ids 261..299 and 303.. are holes */
        }
        char *out = NULL;
        size_t len;
        int st = epd_tok_decode(g_tok, ids, n, 0, &out, &len, &err);
        if (st == 0) {
            check_stream(ids, n, out, len);
            free(out);
        } else if (st != -EINVAL) {
            abort();
        }
        free(ids);
    }
    return 0;
}
