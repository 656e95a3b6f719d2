/* Tokenizer internals shared by the tokenizer's files: the loaded tables, byte buffers, the hash
 * maps behind the vocabulary and the merges, UTF-8 helpers and error formatting. */
#ifndef EPD_TOK_INTERNAL_H
#define EPD_TOK_INTERNAL_H

#include "epd_tok.h"

#include <errno.h>

#include <cJSON.h>
#include <pthread.h>
#include <stdarg.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/* A growable byte buffer. */
typedef struct tok_buf {
    uint8_t *p;
    size_t len;
    size_t cap;
} tok_buf_t;

int tok_buf_reserve(tok_buf_t *b, size_t extra);
int tok_buf_append(tok_buf_t *b, const void *src, size_t n);
void tok_buf_fini(tok_buf_t *b);

int tok_ids_push(epd_tok_ids_t *v, int32_t id);

/* Open-addressing map from a byte string (stored in a caller-owned pool) to an int32 value. */
typedef struct tok_strmap_slot {
    uint32_t hash; /* 0 marks an empty slot (real hashes are forced non-zero) */
    uint32_t len;
    uint32_t off; /* key = pool->p[off .. off+len) */
    int32_t val;
} tok_strmap_slot_t;

typedef struct tok_strmap {
    tok_strmap_slot_t *slots;
    size_t mask;
    size_t count;
} tok_strmap_t;

uint32_t tok_hash_bytes(const uint8_t *p, size_t n);
int tok_strmap_init(tok_strmap_t *m, size_t expected);
void tok_strmap_fini(tok_strmap_t *m);
/* Inserts or overwrites. The key bytes must already be in pool at off. */
int tok_strmap_put(tok_strmap_t *m, const tok_buf_t *pool, uint32_t off, uint32_t len, int32_t val);
/* -1 when absent. */
int32_t tok_strmap_get(const tok_strmap_t *m, const tok_buf_t *pool, const uint8_t *key,
                       size_t len);

/* Merge table: (left id, right id) -> (rank, merged id). Later duplicates overwrite earlier ones
 * (what both tokenizers implementations do when a merges list repeats a pair). */
typedef struct tok_pair_slot {
    uint64_t key; /* left << 32 | right; TOK_PAIR_EMPTY when free */
    uint32_t rank;
    int32_t merged;
} tok_pair_slot_t;

#define TOK_PAIR_EMPTY UINT64_MAX

typedef struct tok_pairmap {
    tok_pair_slot_t *slots;
    size_t mask;
} tok_pairmap_t;

int tok_pairmap_init(tok_pairmap_t *m, size_t expected);
void tok_pairmap_fini(tok_pairmap_t *m);
void tok_pairmap_put(tok_pairmap_t *m, int32_t left, int32_t right, uint32_t rank, int32_t merged);
static inline const tok_pair_slot_t *tok_pairmap_get(const tok_pairmap_t *m, int32_t left,
                                                     int32_t right)
{
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h >> 40) & m->mask;
    for (;;) {
        const tok_pair_slot_t *s = &m->slots[i];
        if (s->key == key) return s;
        if (s->key == TOK_PAIR_EMPTY) return NULL;
        i = (i + 1) & m->mask;
    }
}

/* Word cache: pre-token bytes -> ids, direct mapped (a colliding word replaces the old one), so
 * memory stays bounded in a long-running daemon. */
typedef struct tok_cache_entry {
    uint32_t hash;
    uint32_t klen;
    uint32_t nids;
    uint8_t *blob; /* key bytes, then nids int32 ids (aligned) */
} tok_cache_entry_t;

#define TOK_MAX_SPLITS 8 /* Split pre-tokenizers in a Sequence; real ones have 1 to 3 */

#define TOK_CACHE_SLOTS 16384
#define TOK_CACHE_MAX_WORD 256 /* longer words are rare and not worth keeping */

typedef struct tok_added {
    uint32_t off; /* content bytes in tok->pool */
    uint32_t len;
    int32_t id;
    bool special;
    bool normalized; /* matched after normalization instead of on the raw text */
} tok_added_t;

enum tok_id_flags {
    TOK_ID_PRESENT = 1u << 0,
    TOK_ID_ADDED = 1u << 1,
    TOK_ID_SPECIAL = 1u << 2,
};

struct epd_tok {
    tok_buf_t pool; /* every byte string the tables point at */

    /* ids: [n_ids] — the bytes an id decodes to (pool offsets) and its flags */
    size_t n_ids;
    uint32_t *id_off;
    uint32_t *id_len;
    uint8_t *id_flags;

    tok_strmap_t vocab; /* raw bytes of a model token -> id */
    int32_t byte_id[256];
    tok_pairmap_t merges;
    bool ignore_merges;

    tok_added_t *added; /* sorted by descending length, so the first match is the longest */
    size_t n_added;
    uint8_t added_first[256]; /* bit 0: a raw-text token starts with this byte; bit 1: normalized */

    bool nfc;
    const void *nfc_norm; /* const UNormalizer2 * */

    /* the pre-tokenizer's Split regexes, applied in order: each splits the pieces of the one
     * before (a Sequence of Splits, as DeepSeek-V3 has); [n_re] */
    pcre2_code *re[TOK_MAX_SPLITS];
    size_t n_re;

    pthread_mutex_t cache_mu;
    tok_cache_entry_t *cache; /* [TOK_CACHE_SLOTS] */

    int32_t *eos;
    size_t n_eos;
    int32_t bos;
    int32_t pad;
    int32_t cfg_eos; /* tokenizer_config.json's eos_token (what add_eos_token appends); -1 */
    /* tokenizer_config.json's add_bos_token / add_eos_token: what EPD_TOK_ENCODE_ADD_SPECIAL
     * adds around a text (transformers' add_special_tokens=True) */
    bool add_bos, add_eos;
    char *bos_text; /* bos_token's content, as a template's {{ bos_token }} renders it; NULL */
    epd_tok_chat_kind_t chat;
};

/* GPT-2's byte-level alphabet: byte -> code point and back (-1 for code points outside it). */
extern const uint16_t tok_byte_to_cp[256];
int tok_cp_to_byte(uint32_t cp);

/* Decodes one UTF-8 code point from valid UTF-8 (caller validated); returns its length. */
size_t tok_utf8_decode(const uint8_t *p, uint32_t *cp);
size_t tok_utf8_encode(uint32_t cp, uint8_t out[4]);
/* Offset of the first ill-formed byte, or n when p[0..n) is well-formed UTF-8. */
size_t tok_utf8_validate(const uint8_t *p, size_t n);
/* Appends p[0..n) to out, each maximal ill-formed subpart replaced by U+FFFD. With final false
 * an unfinished but so-far valid sequence at the end is left unconsumed. Returns bytes consumed
 * or -1 on allocation failure. */
ptrdiff_t tok_utf8_lossy(const uint8_t *p, size_t n, bool final, tok_buf_t *out);

/* Parsing tokenizer.json (tok_load.c), the two config files and chat_template.jinja
 * (tok_config.c); any path but tokenizer.json's may be NULL. */
int tok_load_tokenizer_json(epd_tok_t *tok, const char *path, epd_err_t *err);
int tok_load_configs(epd_tok_t *tok, const char *tokenizer_config_path,
                     const char *chat_template_path, const char *generation_config_path,
                     epd_err_t *err);
int tok_read_file(const char *path, char **out, size_t *len, epd_err_t *err);
/* Reads and parses a JSON file whose top level must be an object; a syntax error names the byte
 * offset and line. */
int tok_parse_json_file(const char *path, cJSON **root, epd_err_t *err);

/* Model-level BPE of one pre-token (tok_bpe.c): appends the ids of word[0..n). */
int tok_bpe_word(const epd_tok_t *tok, const uint8_t *word, size_t n, epd_tok_ids_t *out);
void tok_cache_clear(epd_tok_t *tok);

/* NFC normalization (tok_norm.c). *out is NULL when the text is already NFC. */
int tok_nfc(const epd_tok_t *tok, const uint8_t *p, size_t n, tok_buf_t *out, epd_err_t *err);
int tok_nfc_init(epd_tok_t *tok, epd_err_t *err);

/* Chat template recognition (tok_chat.c); where names the template in messages
 * ("<file>: chat_template", or the .jinja file's path). */
/* A byte range [off, off + len) of a text. */
typedef struct tok_range {
    size_t off, len;
} tok_range_t;

/* epd_tok_encode where special added tokens are not matched where they would overlap one of
 * `plain` (sorted, disjoint ranges of text: message fields inside a rendered chat). The text
 * between matched added tokens is still encoded in one piece, so text without special-token
 * spellings gets the very ids epd_tok_encode gives. */
/* tok_encode_masked's flag: no added token at all, special or not, matches where it overlaps
 * `plain` (a template whose markers are non-special tokens, as DeepSeek-V3's <｜User｜>). */
#define TOK_ENCODE_MASK_ADDED (1u << 31)

int tok_encode_masked(const epd_tok_t *tok, const char *text, size_t len, unsigned flags,
                      const tok_range_t *plain, size_t n_plain, epd_tok_ids_t *out, epd_err_t *err);

int tok_chat_detect(const char *tmpl, const char *where, epd_tok_chat_kind_t *kind, epd_err_t *err);

#endif /* EPD_TOK_INTERNAL_H */
