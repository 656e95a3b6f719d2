/* Tokenizer building blocks: byte buffers, id vectors, the string and pair hash maps, UTF-8
 * validation/repair and GPT-2's byte-level alphabet. */
#include "tok_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tok_buf_reserve(tok_buf_t *b, size_t extra)
{
    if (b->cap - b->len >= extra) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

int tok_buf_append(tok_buf_t *b, const void *src, size_t n)
{
    if (tok_buf_reserve(b, n) < 0) return -1;
    if (n) memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

void tok_buf_fini(tok_buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

int tok_ids_push(epd_tok_ids_t *v, int32_t id)
{
    if (v->len == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *p = realloc(v->ids, cap * sizeof(*p));
        if (!p) return -1;
        v->ids = p;
        v->cap = cap;
    }
    v->ids[v->len++] = id;
    return 0;
}

void epd_tok_ids_fini(epd_tok_ids_t *v)
{
    if (!v) return;
    free(v->ids);
    memset(v, 0, sizeof(*v));
}

/* FNV-1a over bytes, finished with a multiply-xorshift so that the low bits mix well. */
uint32_t tok_hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    uint32_t r = (uint32_t)h;
    return r ? r : 1;
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n)
        c *= 2;
    return c;
}

int tok_strmap_init(tok_strmap_t *m, size_t expected)
{
    size_t cap = pow2_at_least(expected * 2 + 1); /* load factor <= 1/2 */
    m->slots = calloc(cap, sizeof(*m->slots));
    if (!m->slots) return -1;
    m->mask = cap - 1;
    m->count = 0;
    return 0;
}

void tok_strmap_fini(tok_strmap_t *m)
{
    free(m->slots);
    memset(m, 0, sizeof(*m));
}

static int strmap_grow(tok_strmap_t *m)
{
    size_t cap = (m->mask + 1) * 2;
    tok_strmap_slot_t *slots = calloc(cap, sizeof(*slots));
    if (!slots) return -1;
    for (size_t i = 0; i <= m->mask; i++) {
        tok_strmap_slot_t s = m->slots[i];
        if (!s.hash) continue;
        size_t j = s.hash & (cap - 1);
        while (slots[j].hash)
            j = (j + 1) & (cap - 1);
        slots[j] = s;
    }
    free(m->slots);
    m->slots = slots;
    m->mask = cap - 1;
    return 0;
}

int tok_strmap_put(tok_strmap_t *m, const tok_buf_t *pool, uint32_t off, uint32_t len, int32_t val)
{
    if ((m->count + 1) * 2 > m->mask + 1 && strmap_grow(m) < 0) return -1;
    const uint8_t *key = pool->p + off;
    uint32_t h = tok_hash_bytes(key, len);
    size_t i = h & m->mask;
    for (;;) {
        tok_strmap_slot_t *s = &m->slots[i];
        if (!s->hash) {
            *s = (tok_strmap_slot_t){.hash = h, .len = len, .off = off, .val = val};
            m->count++;
            return 0;
        }
        if (s->hash == h && s->len == len && memcmp(pool->p + s->off, key, len) == 0) {
            s->val = val;
            return 0;
        }
        i = (i + 1) & m->mask;
    }
}

int32_t tok_strmap_get(const tok_strmap_t *m, const tok_buf_t *pool, const uint8_t *key, size_t len)
{
    uint32_t h = tok_hash_bytes(key, len);
    size_t i = h & m->mask;
    for (;;) {
        const tok_strmap_slot_t *s = &m->slots[i];
        if (!s->hash) return -1;
        if (s->hash == h && s->len == len && memcmp(pool->p + s->off, key, len) == 0) return s->val;
        i = (i + 1) & m->mask;
    }
}

int tok_pairmap_init(tok_pairmap_t *m, size_t expected)
{
    size_t cap = pow2_at_least(expected * 2 + 1);
    m->slots = malloc(cap * sizeof(*m->slots));
    if (!m->slots) return -1;
    for (size_t i = 0; i < cap; i++)
        m->slots[i].key = TOK_PAIR_EMPTY;
    m->mask = cap - 1;
    return 0;
}

void tok_pairmap_fini(tok_pairmap_t *m)
{
    free(m->slots);
    memset(m, 0, sizeof(*m));
}

/* The caller sized the map for every pair it will insert (at most half full). */
void tok_pairmap_put(tok_pairmap_t *m, int32_t left, int32_t right, uint32_t rank, int32_t merged)
{
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h >> 40) & m->mask;
    while (m->slots[i].key != TOK_PAIR_EMPTY && m->slots[i].key != key)
        i = (i + 1) & m->mask;
    m->slots[i] = (tok_pair_slot_t){.key = key, .rank = rank, .merged = merged};
}

/* ---- UTF-8 ------------------------------------------------------------------------------- */

size_t tok_utf8_decode(const uint8_t *p, uint32_t *cp)
{
    uint8_t b = p[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    if (b < 0xE0) {
        *cp = (uint32_t)(b & 0x1F) << 6 | (p[1] & 0x3F);
        return 2;
    }
    if (b < 0xF0) {
        *cp = (uint32_t)(b & 0x0F) << 12 | (uint32_t)(p[1] & 0x3F) << 6 | (p[2] & 0x3F);
        return 3;
    }
    *cp = (uint32_t)(b & 0x07) << 18 | (uint32_t)(p[1] & 0x3F) << 12 |
          (uint32_t)(p[2] & 0x3F) << 6 | (p[3] & 0x3F);
    return 4;
}

size_t tok_utf8_encode(uint32_t cp, uint8_t out[4])
{
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | cp >> 6);
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | cp >> 12);
        out[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | cp >> 18);
    out[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* For a lead byte: how many continuation bytes follow and the allowed range of the first one
 * (Unicode Table 3-7, which excludes overlongs, surrogates and code points above U+10FFFF).
 * need < 0 for bytes that cannot start a sequence. */
static int utf8_lead(uint8_t b, uint8_t *lo, uint8_t *hi)
{
    *lo = 0x80;
    *hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) return 1;
    if (b == 0xE0) {
        *lo = 0xA0;
        return 2;
    }
    if (b == 0xED) {
        *hi = 0x9F;
        return 2;
    }
    if (b >= 0xE1 && b <= 0xEF) return 2;
    if (b == 0xF0) {
        *lo = 0x90;
        return 3;
    }
    if (b == 0xF4) {
        *hi = 0x8F;
        return 3;
    }
    if (b >= 0xF1 && b <= 0xF3) return 3;
    return -1;
}

/* Length of the maximal valid prefix of the sequence starting at p[0] (a non-ASCII byte), and
 * whether it is a whole character. */
static size_t utf8_subpart(const uint8_t *p, size_t n, bool *whole)
{
    uint8_t lo, hi;
    int need = utf8_lead(p[0], &lo, &hi);
    *whole = false;
    if (need < 0) return 1;
    size_t j = 1;
    for (int k = 0; k < need; k++, j++) {
        if (j >= n) return j;
        uint8_t c = p[j];
        if (c < (k == 0 ? lo : 0x80) || c > (k == 0 ? hi : 0xBF)) return j;
    }
    *whole = true;
    return j;
}

size_t tok_utf8_validate(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        bool whole;
        size_t k = utf8_subpart(p + i, n - i, &whole);
        if (!whole) return i;
        i += k;
    }
    return n;
}

ptrdiff_t tok_utf8_lossy(const uint8_t *p, size_t n, bool final, tok_buf_t *out)
{
    static const uint8_t fffd[3] = {0xEF, 0xBF, 0xBD};
    if (tok_buf_reserve(out, n) < 0) return -1;
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        while (run < n && p[run] < 0x80)
            run++;
        if (run > i) {
            if (tok_buf_append(out, p + i, run - i) < 0) return -1;
            i = run;
            if (i == n) break;
        }
        bool whole;
        size_t k = utf8_subpart(p + i, n - i, &whole);
        if (whole) {
            if (tok_buf_append(out, p + i, k) < 0) return -1;
        } else {
            /* A valid but unfinished prefix at the very end may still be completed. */
            if (!final && i + k == n && k < 4 && p[i] >= 0xC2 && p[i] <= 0xF4) return (ptrdiff_t)i;
            if (tok_buf_append(out, fffd, 3) < 0) return -1;
        }
        i += k;
    }
    return (ptrdiff_t)i;
}

/* ---- byte-level alphabet ------------------------------------------------------------------ */

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the other 68 bytes to U+0100 and
 * up in byte order, so every byte has a visible, non-space character. */
#define P(b) [b] = (b)
const uint16_t tok_byte_to_cp[256] = {
    [0] = 256,
    [1] = 257,
    [2] = 258,
    [3] = 259,
    [4] = 260,
    [5] = 261,
    [6] = 262,
    [7] = 263,
    [8] = 264,
    [9] = 265,
    [10] = 266,
    [11] = 267,
    [12] = 268,
    [13] = 269,
    [14] = 270,
    [15] = 271,
    [16] = 272,
    [17] = 273,
    [18] = 274,
    [19] = 275,
    [20] = 276,
    [21] = 277,
    [22] = 278,
    [23] = 279,
    [24] = 280,
    [25] = 281,
    [26] = 282,
    [27] = 283,
    [28] = 284,
    [29] = 285,
    [30] = 286,
    [31] = 287,
    [32] = 288,
    [127] = 289,
    [128] = 290,
    [129] = 291,
    [130] = 292,
    [131] = 293,
    [132] = 294,
    [133] = 295,
    [134] = 296,
    [135] = 297,
    [136] = 298,
    [137] = 299,
    [138] = 300,
    [139] = 301,
    [140] = 302,
    [141] = 303,
    [142] = 304,
    [143] = 305,
    [144] = 306,
    [145] = 307,
    [146] = 308,
    [147] = 309,
    [148] = 310,
    [149] = 311,
    [150] = 312,
    [151] = 313,
    [152] = 314,
    [153] = 315,
    [154] = 316,
    [155] = 317,
    [156] = 318,
    [157] = 319,
    [158] = 320,
    [159] = 321,
    [160] = 322,
    [173] = 323,
    /* identity ranges: 33..126, 161..172, 174..255 */
    P(33),
    P(34),
    P(35),
    P(36),
    P(37),
    P(38),
    P(39),
    P(40),
    P(41),
    P(42),
    P(43),
    P(44),
    P(45),
    P(46),
    P(47),
    P(48),
    P(49),
    P(50),
    P(51),
    P(52),
    P(53),
    P(54),
    P(55),
    P(56),
    P(57),
    P(58),
    P(59),
    P(60),
    P(61),
    P(62),
    P(63),
    P(64),
    P(65),
    P(66),
    P(67),
    P(68),
    P(69),
    P(70),
    P(71),
    P(72),
    P(73),
    P(74),
    P(75),
    P(76),
    P(77),
    P(78),
    P(79),
    P(80),
    P(81),
    P(82),
    P(83),
    P(84),
    P(85),
    P(86),
    P(87),
    P(88),
    P(89),
    P(90),
    P(91),
    P(92),
    P(93),
    P(94),
    P(95),
    P(96),
    P(97),
    P(98),
    P(99),
    P(100),
    P(101),
    P(102),
    P(103),
    P(104),
    P(105),
    P(106),
    P(107),
    P(108),
    P(109),
    P(110),
    P(111),
    P(112),
    P(113),
    P(114),
    P(115),
    P(116),
    P(117),
    P(118),
    P(119),
    P(120),
    P(121),
    P(122),
    P(123),
    P(124),
    P(125),
    P(126),
    P(161),
    P(162),
    P(163),
    P(164),
    P(165),
    P(166),
    P(167),
    P(168),
    P(169),
    P(170),
    P(171),
    P(172),
    P(174),
    P(175),
    P(176),
    P(177),
    P(178),
    P(179),
    P(180),
    P(181),
    P(182),
    P(183),
    P(184),
    P(185),
    P(186),
    P(187),
    P(188),
    P(189),
    P(190),
    P(191),
    P(192),
    P(193),
    P(194),
    P(195),
    P(196),
    P(197),
    P(198),
    P(199),
    P(200),
    P(201),
    P(202),
    P(203),
    P(204),
    P(205),
    P(206),
    P(207),
    P(208),
    P(209),
    P(210),
    P(211),
    P(212),
    P(213),
    P(214),
    P(215),
    P(216),
    P(217),
    P(218),
    P(219),
    P(220),
    P(221),
    P(222),
    P(223),
    P(224),
    P(225),
    P(226),
    P(227),
    P(228),
    P(229),
    P(230),
    P(231),
    P(232),
    P(233),
    P(234),
    P(235),
    P(236),
    P(237),
    P(238),
    P(239),
    P(240),
    P(241),
    P(242),
    P(243),
    P(244),
    P(245),
    P(246),
    P(247),
    P(248),
    P(249),
    P(250),
    P(251),
    P(252),
    P(253),
    P(254),
    P(255),
};
#undef P

int tok_cp_to_byte(uint32_t cp)
{
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255))
        return (int)cp;
    if (cp >= 256 && cp <= 323) {
        /* the 68 remapped bytes, in byte order */
        static const uint8_t remap[68] = {
            0,   1,   2,   3,   4,   5,   6,   7,   8,   9,   10,  11,  12,  13,  14,  15,  16,
            17,  18,  19,  20,  21,  22,  23,  24,  25,  26,  27,  28,  29,  30,  31,  32,  127,
            128, 129, 130, 131, 132, 133, 134, 135, 136, 137, 138, 139, 140, 141, 142, 143, 144,
            145, 146, 147, 148, 149, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 173,
        };
        return remap[cp - 256];
    }
    return -1;
}
