/* The tests' deterministic random numbers: splitmix64 (Vigna), its uniform doubles and
 * Box-Muller normals, on a state the test owns (header-only). */
#ifndef EPD_TEST_RNG_H
#define EPD_TEST_RNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

static inline uint64_t test_splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1), 53 random bits. */
static inline double test_rng_unit(uint64_t *s)
{
    return (double)(test_splitmix64(s) >> 11) / 9007199254740992.0;
}

/* Standard normal (Box-Muller on two uniforms). */
static inline float test_rng_normal(uint64_t *s)
{
    double a = test_rng_unit(s) + 1e-300, b = test_rng_unit(s);
    return (float)(sqrt(-2 * log(a)) * cos(6.283185307179586 * b));
}

/* Uniform in [-a, a) as a float. */
static inline float test_rng_sym(uint64_t *s, float a)
{
    return (float)(a * (2.0 * test_rng_unit(s) - 1.0));
}

/* x[0..n) uniform in [-a, a). */
static inline void test_rng_fill(uint64_t *s, float *x, size_t n, float a)
{
    for (size_t i = 0; i < n; i++)
        x[i] = test_rng_sym(s, a);
}

#endif /* EPD_TEST_RNG_H */
