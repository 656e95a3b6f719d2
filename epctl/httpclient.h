/* A small blocking HTTP/1.1 client for epctl and the tests: one request per connection,
 * every wait (resolve excepted) bounded by one deadline, the response parsed by http-parser. */
#ifndef EPD_HTTPCLIENT_H
#define EPD_HTTPCLIENT_H

#include <stddef.h>

/* A response body larger than this is an error: the client talks to epd, not a file server. */
#define EPD_HTTPCLIENT_MAX_BODY (16u << 20)

typedef struct epd_http_response {
    int status;
    char *body; /* NUL-terminated, malloc'd */
    size_t body_len;
    char content_type[128];
} epd_http_response_t;

/* Performs `method path` against host:port within timeout_ms. Returns 0 with *resp filled
 * (free with epd_http_response_free), or a negative errno with a message in err:
 * -ETIMEDOUT, -ECONNREFUSED, -EHOSTUNREACH (resolve failed), -EPROTO (bad response), ... */
int epd_http_request(const char *host, int port, const char *method, const char *path,
                     const char *body, size_t body_len, int timeout_ms, epd_http_response_t *resp,
                     char *err, size_t errlen);
/* The same with extra header lines ("Name: value\r\n" each; NULL for none). */
int epd_http_request_h(const char *host, int port, const char *method, const char *path,
                       const char *headers, const char *body, size_t body_len, int timeout_ms,
                       epd_http_response_t *resp, char *err, size_t errlen);
void epd_http_response_free(epd_http_response_t *resp);

/* Splits "HOST:PORT" or "[V6]:PORT". Returns 0 or -EINVAL. */
int epd_http_parse_hostport(const char *s, char *host, size_t hostlen, int *port);

#endif /* EPD_HTTPCLIENT_H */
