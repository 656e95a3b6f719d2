/* epd_json: what cJSON leaves to its callers, for every JSON document epd reads (API bodies,
 * the config, tokenizer files, config.json, safetensors headers): duplicate keys (cJSON keeps
 * both members as siblings), the length of strings that hold U+0000 (cJSON's valuestring is
 * NUL-terminated), and writing such strings (cJSON's printer stops at the NUL). */
#ifndef EPD_JSON_H
#define EPD_JSON_H

#include <cjson/cJSON.h>
#include <stddef.h>

/* The first member, in document order, whose key repeats an earlier key of the same object;
 * NULL if there is none. path (may be NULL) gets that member's JSON path, e.g.
 * "messages[0].role" ("a.b" for a key "b" of the top-level member "a"). */
const cJSON *epd_json_find_duplicate(const cJSON *root, char *path, size_t path_len);

/* cJSON_ParseWithLengthOpts(text, len, end, 0) that also records the byte length of every
 * string value, so that epd_json_strlen sees past a U+0000 (a "\u0000" escape or a raw NUL
 * byte). The length is kept in the string item's valueint, which cJSON leaves unused for
 * strings. NULL: not valid JSON (*end, when given, points at the error as cJSON's does). */
cJSON *epd_json_parse(const char *text, size_t len, const char **end);

/* The byte length of a string value: all of it for items parsed by epd_json_parse, else
 * strlen(valuestring). 0 for anything that is not a string. */
size_t epd_json_strlen(const cJSON *s);

/* An item that prints as the JSON string s[0..n), which may hold NUL bytes (written as
 * \u0000): a cJSON string, or a raw item holding the escaped literal when s has a NUL.
 * NULL: out of memory. */
cJSON *epd_json_string_n(const char *s, size_t n);

/* What an item is, for error messages: "null", "a boolean", "a number", "a string", "an array"
 * or "an object" ("missing" for NULL) (API bodies: "'n' must be a number, not a string"). */
const char *epd_json_type_name(const cJSON *v);

#endif /* EPD_JSON_H */
