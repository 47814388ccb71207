# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Gaussian gridding of a source catalog (paper §2.3.2; DESIGN.md "Gridding").

Called only through ``wlcnn.grid_catalog``, which validates every input, so
this loop trusts its arguments.  Accumulation is in float64; the five sums of a
pixel sit next to each other in memory (``acc[i, j, :]``), and sources are
visited row by row, so the rows being written stay in cache.
"""
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memset


def grid(const Py_ssize_t[::1] i0s, const Py_ssize_t[::1] i1s,
         const Py_ssize_t[::1] j0s, const Py_ssize_t[::1] j1s,
         const double[::1] g0, const double[::1] rx0, const double[::1] ry0,
         const double[::1] e1, const double[::1] e2, const double[::1] w,
         double c, double empty_error, double density_norm,
         double[:, :, ::1] acc, double[:, :, ::1] out):
    """Accumulate the Gaussian-weighted sums and write (ε̄1, ε̄2, Δε, n).

    Source s covers rows i0s..i1s and columns j0s..j1s (inclusive, inside
    the grid).  Its weight there is W = g0 Π r_y Π r_x: the Gaussian is
    separable, and along a row or column g(d + 1) = g(d) r(d) with
    r(d + 1) = r(d) c, c = exp(-1/σ²); g0 is W at (i0, j0) and rx0, ry0 the
    first ratios, computed (vectorised) by the caller.
    w : inverse-variance weights u = 1/σ².
    acc : (ny, nx, 5) float64 work buffer: all zero on entry, left all zero.
    out : (4, ny, nx) float64 result, overwritten.
    """
    cdef Py_ssize_t n = g0.shape[0]
    cdef Py_ssize_t ny = acc.shape[0], nx = acc.shape[1]
    cdef Py_ssize_t s, k, i, j, row, ncol
    cdef double g, r, rx, wy, gj, gj2, inv
    cdef double v[4]
    cdef double *a
    cdef double *o1
    cdef double *o2
    cdef double *o3
    cdef double *o4
    cdef double *gx = <double *> malloc(2 * (nx + 1) * sizeof(double))
    cdef double *gx2 = gx + nx + 1
    cdef Py_ssize_t nbx = nx // 8 + 1, nb = ny * nbx
    cdef Py_ssize_t *start = <Py_ssize_t *> malloc((nb + 1 + n) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *order = start + nb + 1
    if gx == NULL or start == NULL:
        free(gx)
        free(start)
        raise MemoryError()
    with nogil:
        # A counting sort of the sources on (first row, first column // 8):
        # neighbouring sources then write neighbouring sums, which stay in the
        # fastest cache, and the buckets are few enough to count quickly.
        memset(start, 0, (nb + 1) * sizeof(Py_ssize_t))
        for s in range(n):
            start[i0s[s] * nbx + j0s[s] // 8 + 1] += 1
        for row in range(nb):
            start[row + 1] += start[row]
        for s in range(n):
            row = i0s[s] * nbx + j0s[s] // 8
            order[start[row]] = s
            start[row] += 1

        for k in range(n):
            s = order[k]
            ncol = j1s[s] - j0s[s] + 1
            gj = 1.0
            rx = rx0[s]
            for j in range(ncol):
                gx[j] = gj
                gx2[j] = gj * gj
                gj = gj * rx
                rx = rx * c
            g = g0[s]
            r = ry0[s]
            for i in range(i0s[s], i1s[s] + 1):
                wy = g
                g = g * r
                r = r * c
                # Per row v = W_y (u, u ε1, u ε2, W_y u); per tap the sums gain
                # g_x v, with g_x² for the W² term (Σ W² u² σ² = Σ W² u).
                v[0] = wy * w[s]
                v[1] = v[0] * e1[s]
                v[2] = v[0] * e2[s]
                v[3] = v[0] * wy
                a = &acc[i, j0s[s], 0]
                for j in range(ncol):
                    # locals: the compiler cannot rule out gx aliasing acc
                    gj = gx[j]
                    gj2 = gx2[j]
                    a[0] += gj * v[0]
                    a[1] += gj * v[1]
                    a[2] += gj * v[2]
                    a[3] += gj2 * v[3]
                    a[4] += gj * wy
                    a += 5

        # Read the sums out and zero them for the next call (one pass over
        # `acc` rather than a separate clearing pass).
        o1 = &out[0, 0, 0]
        o2 = &out[1, 0, 0]
        o3 = &out[2, 0, 0]
        o4 = &out[3, 0, 0]
        a = &acc[0, 0, 0]
        for k in range(ny * nx):
            if a[0] > 0.0:
                inv = 1.0 / a[0]
                o1[k] = a[1] * inv
                o2[k] = a[2] * inv
                o3[k] = sqrt(a[3]) * inv
            else:
                o1[k] = 0.0
                o2[k] = 0.0
                o3[k] = empty_error
            o4[k] = a[4] * density_norm
            a[0] = a[1] = a[2] = a[3] = a[4] = 0.0
            a += 5
    free(gx)
    free(start)
