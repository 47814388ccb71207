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
    w : inverse-variance weights u = 1/σ².
    acc : (ny, nx, 5) float64 work buffer, overwritten.
    out : (4, ny, nx) float64 result, overwritten.
    """
    cdef Py_ssize_t n = xp.shape[0]
    cdef Py_ssize_t ny = acc.shape[0], nx = acc.shape[1]
    cdef Py_ssize_t ntap = <Py_ssize_t>(2 * ceil(rcut_pix) + 3)
    cdef Py_ssize_t s, k, i, j, i0, i1, j0, j1, jlo, jhi, row
    cdef double x, y, d, g, r, h, wy, gj, gj2, inv
    cdef double v[4]
    cdef double r2 = rcut_pix * rcut_pix
    cdef double inv2s2 = 0.5 / (sigma_pix * sigma_pix)
    cdef double c = exp(-2.0 * inv2s2)
    cdef double *a
    cdef double *o1
    cdef double *o2
    cdef double *o3
    cdef double *o4
    cdef double *gx = <double *> malloc(2 * ntap * sizeof(double))
    cdef double *gx2 = gx + ntap
    cdef Py_ssize_t *start = <Py_ssize_t *> malloc((ny * nx + 1 + n) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *order = start + ny * nx + 1
    if gx == NULL or start == NULL:
        free(gx)
        free(start)
        raise MemoryError()
    with nogil:
        memset(&acc[0, 0, 0], 0, ny * nx * 5 * sizeof(double))
        # A counting sort of the sources on their nearest pixel: neighbouring
        # sources then write neighbouring sums, which stay in the fastest cache.
        memset(start, 0, (ny * nx + 1) * sizeof(Py_ssize_t))
        for s in range(n):
            start[_row(yp[s], ny) * nx + _row(xp[s], nx) + 1] += 1
        for row in range(ny * nx):
            start[row + 1] += start[row]
        for s in range(n):
            row = _row(yp[s], ny) * nx + _row(xp[s], nx)
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
            # four exp() calls a source instead of one per tap.
            d = j0 - x
            g = exp(-d * d * inv2s2)
            r = exp(-(2.0 * d + 1.0) * inv2s2)
            for j in range(j1 - j0 + 1):
                gx[j] = g
                gx2[j] = g * g
                g = g * r
                r = r * c
            d = i0 - y
            g = exp(-d * d * inv2s2)
            r = exp(-(2.0 * d + 1.0) * inv2s2)
            for i in range(i0, i1 + 1):
                wy = g
                g = g * r
                r = r * c
                d = (i - y) * (i - y)
                if d > r2:
                    continue
                # The circular cut as this row's column range, |j - x| <= h.
                h = sqrt(r2 - d)
                jlo = _ceil(x - h)
                jhi = _floor(x + h)
                if jlo < j0:
                    jlo = j0
                if jhi > j1:
                    jhi = j1
                # Per row v = W_y (u, u ε1, u ε2, W_y u); per tap the sums gain
                # g v, with g² for the W² term (Σ W² u² σ² = Σ W² u, u σ² = 1).
                v[0] = wy * w[s]
                v[1] = v[0] * e1[s]
                v[2] = v[0] * e2[s]
                v[3] = v[0] * wy
                a = &acc[i, jlo, 0]
                for j in range(jlo - j0, jhi - j0 + 1):
                    # locals: the compiler cannot rule out gx aliasing acc, and
                    # the pairs (a0, a1), (a2, a3) then map onto vector registers
                    gj = gx[j]
                    gj2 = gx2[j]
                    a[0] += gj * v[0]
                    a[1] += gj * v[1]
                    a[2] += gj * v[2]
                    a[3] += gj2 * v[3]
                    a[4] += gj * wy
                    a += 5

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
            a += 5
    free(gx)
    free(start)
