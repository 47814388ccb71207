# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Gaussian gridding of a source catalog (paper §2.3.2; DESIGN.md "Gridding").

Called only through ``wlcnn.grid_catalog``, which validates every input, so
this loop trusts its arguments.  Accumulation is in float64; the five sums of a
pixel sit next to each other in memory (``acc[i, j, :]``), and sources are
visited row by row, so the rows being written stay in cache.
"""
from libc.math cimport exp, sqrt, ceil
from libc.stdlib cimport malloc, free
from libc.string cimport memset


cdef inline Py_ssize_t _row(double y, Py_ssize_t ny) noexcept nogil:
    """Nearest row (or column) of a position, clamped to the grid."""
    if y < 0.0:
        return 0
    if y > ny - 1:
        return ny - 1
    return <Py_ssize_t>(y + 0.5)


cdef inline Py_ssize_t _floor(double v) noexcept nogil:
    """floor(v) for |v| < 2**30 by one truncation (cheaper than libm's floor)."""
    return <Py_ssize_t>(v + 1073741824.0) - 1073741824


cdef inline Py_ssize_t _ceil(double v) noexcept nogil:
    return -_floor(-v)


def grid(const double[::1] xp, const double[::1] yp,
         const double[::1] e1, const double[::1] e2, const double[::1] w,
         double sigma_pix, double rcut_pix, double empty_error, double density_norm,
         double[:, :, ::1] acc, double[:, :, ::1] out):
    """Accumulate the Gaussian-weighted sums and write (ε̄1, ε̄2, Δε, n).

    xp, yp : source positions in pixel units (pixel j's centre is at j).
    rcut_pix : the kernel is zero where |Δx| or |Δy| exceeds it (a square
        cut: separable, and symmetric under the grid's 90° rotations and
        mirrors).
    w : inverse-variance weights u = 1/σ².
    acc : (ny, nx, 5) float64 work buffer: all zero on entry, left all zero.
    out : (4, ny, nx) float64 result, overwritten.
    """
    cdef Py_ssize_t n = xp.shape[0]
    cdef Py_ssize_t ny = acc.shape[0], nx = acc.shape[1]
    cdef Py_ssize_t ntap = <Py_ssize_t>(2 * ceil(rcut_pix) + 3)
    cdef Py_ssize_t s, k, i, j, i0, i1, j0, j1, row
    cdef double x, y, d, g, r, rx, wy, gj, gj2, inv
    cdef double v[4]
    cdef double inv2s2 = 0.5 / (sigma_pix * sigma_pix)
    cdef double c = exp(-2.0 * inv2s2)
    cdef double *a
    cdef double *o1
    cdef double *o2
    cdef double *o3
    cdef double *o4
    cdef double *gx = <double *> malloc(2 * ntap * sizeof(double))
    cdef double *gx2 = gx + ntap
    cdef Py_ssize_t nbx = nx // 8 + 1, nb = ny * nbx
    cdef Py_ssize_t *start = <Py_ssize_t *> malloc((nb + 1 + n) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *order = start + nb + 1
    if gx == NULL or start == NULL:
        free(gx)
        free(start)
        raise MemoryError()
    with nogil:
        # A counting sort of the sources on (nearest row, nearest column // 8):
        # neighbouring sources then write neighbouring sums, which stay in the
        # fastest cache, and the buckets are few enough to count quickly.
        memset(start, 0, (nb + 1) * sizeof(Py_ssize_t))
        for s in range(n):
            start[_row(yp[s], ny) * nbx + _row(xp[s], nx) // 8 + 1] += 1
        for row in range(nb):
            start[row + 1] += start[row]
        for s in range(n):
            row = _row(yp[s], ny) * nbx + _row(xp[s], nx) // 8
            order[start[row]] = s
            start[row] += 1

        for k in range(n):
            s = order[k]
            x = xp[s]
            y = yp[s]
            j0 = _ceil(x - rcut_pix)
            j1 = _floor(x + rcut_pix)
            i0 = _ceil(y - rcut_pix)
            i1 = _floor(y + rcut_pix)
            if j0 < 0:
                j0 = 0
            if i0 < 0:
                i0 = 0
            if j1 > nx - 1:
                j1 = nx - 1
            if i1 > ny - 1:
                i1 = ny - 1
            if j1 < j0 or i1 < i0:
                continue  # a source farther than rcut from every pixel centre
            # The Gaussian is separable, and along a row or column it obeys
            # g(d + 1) = g(d) r(d), r(d + 1) = r(d) c with c = exp(-1/σ²):
            # three exp() calls a source (the corner tap and the two first
            # ratios) instead of one per tap.  gx holds the column factors
            # relative to column j0; the corner value starts the rows.
            d = j0 - x
            g = exp(-d * d * inv2s2 - (i0 - y) * (i0 - y) * inv2s2)
            rx = exp(-(2.0 * d + 1.0) * inv2s2)
            gj = 1.0
            for j in range(j1 - j0 + 1):
                gx[j] = gj
                gx2[j] = gj * gj
                gj = gj * rx
                rx = rx * c
            d = i0 - y
            r = exp(-(2.0 * d + 1.0) * inv2s2)
            for i in range(i0, i1 + 1):
                wy = g
                g = g * r
                r = r * c
                # Per row v = W_y (u, u ε1, u ε2, W_y u); per tap the sums gain
                # g_x v, with g_x² for the W² term (Σ W² u² σ² = Σ W² u).
                v[0] = wy * w[s]
                v[1] = v[0] * e1[s]
                v[2] = v[0] * e2[s]
                v[3] = v[0] * wy
                a = &acc[i, j0, 0]
                for j in range(j1 - j0 + 1):
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
