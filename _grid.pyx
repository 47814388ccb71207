# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Gaussian gridding of a source catalog (paper §2.3.2).

The frames and pixel conventions are those of wlcnn.py's docstring ("Conventions");
the NumPy reference ``wlcnn.grid_catalog_numpy`` computes the same sums plainly.

Called only through ``wlcnn.grid_catalog``, which validates every input, so
this loop trusts its arguments.  Accumulation is in float64; the five sums of a
pixel sit next to each other in memory.  Sources are visited row by row, and a
row is finished (written out) as soon as no later source can reach it, so the
sums live in a ring of a few rows that stays in cache instead of a full-grid
buffer that would go through main memory twice.
"""
from libc.math cimport exp, sqrt
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

import numpy as np


cdef struct Source:
    # What the sweep needs of a source besides its three exp(): u, u ε1,
    # u ε2 and the footprint.
    double u, ue1, ue2
    int nrow, j0, ncol


cdef inline Py_ssize_t floor_in(double v, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """floor(v) clipped to [lo, hi], exactly and without a libm call."""
    cdef Py_ssize_t t
    if v < lo:
        return lo
    if v >= hi:
        return hi
    t = <Py_ssize_t> v
    return t - (t > v)


cdef inline Py_ssize_t ceil_in(double v, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """ceil(v) clipped to [lo, hi]."""
    return -floor_in(-v, -hi, -lo)


def grid(const double[::1] x, const double[::1] y, const double[::1] e1,
         const double[::1] e2, const double[::1] sigma, double pixel_arcsec,
         double rcut, double k, double empty_error, double density_norm,
         double[:, :, ::1] out):
    """Accumulate the Gaussian-weighted sums and write (ε̄1, ε̄2, Δε, n).

    Source s (pixel coordinates xp = x/pixel_arcsec - 1/2, likewise yp)
    covers the rows and columns within ``rcut`` of it, clipped to the grid.
    Its weight there is W = exp(-k d²), k = 1/(2σ²) in pixels: W is
    separable, and along a row or column g(d + 1) = g(d) r(d) with
    r(d + 1) = r(d) step, step = exp(-2k), so three exp() a source, none a tap.
    Weights are u = 1/σ_e².  Sources and sums are kept in buffers of this
    call (a ring of as many grid rows as a footprint spans), not of the grid.

    out : (4, ny, nx) float64 result, overwritten.
    """
    cdef Py_ssize_t n = x.shape[0], ny = out.shape[1], nx = out.shape[2]
    # slot: a source's place in row order; kend: the end of row i's sources there
    cdef Py_ssize_t s, t, i, j, slot, kend, i0, i1, j0, ncol, ir, m, nring = 1
    cdef double xp, yp, dx, dy, g, r, rx, wy, gj, gj2, inv
    cdef double step = exp(-2.0 * k)  # the ratio of successive ratios r(d + 1) / r(d)
    cdef double row_terms[4]  # W_y (u, u ε1, u ε2, W_y u) of one source on one row
    cdef double *sums  # the five sums of a ring pixel
    cdef double *o1
    cdef double *o2
    cdef double *o3
    cdef double *o4
    cdef Source *src
    cdef double[:, ::1] w
    # A counting sort of the sources on their first row.  (Sorting them on
    # the column within a row as well measured no faster: the ring is in L2.)
    # One zeroed block, one free: the counts then starts of the rows (ny + 1) and
    # each source's key, its first row (n), behind them.
    cdef Py_ssize_t *start = <Py_ssize_t *> calloc(ny + 1 + n, sizeof(Py_ssize_t))
    cdef Py_ssize_t *key = start + ny + 1
    # + 1: with no sources malloc(0) may return NULL, which would read as out of memory
    cdef Source *sources = <Source *> malloc(n * sizeof(Source) + 1)
    cdef double *gx = <double *> malloc(2 * (nx + 1) * sizeof(double))
    cdef double *ring = NULL
    try:
        if start == NULL or sources == NULL or gx == NULL:
            raise MemoryError()
        with nogil:
            # Footprints, clipped to the grid before any cast to an integer
            # so that sources far outside the field cannot overflow it.
            for s in range(n):
                xp = x[s] / pixel_arcsec - 0.5
                yp = y[s] / pixel_arcsec - 0.5
                i0 = ceil_in(yp - rcut, 0, ny)
                i1 = floor_in(yp + rcut, -1, ny - 1)
                j0 = ceil_in(xp - rcut, 0, nx)
                if i1 < i0 or floor_in(xp + rcut, -1, nx - 1) < j0:
                    key[s] = -1  # reaches no pixel
                    continue
                key[s] = i0
                start[key[s] + 1] += 1
                if i1 - i0 + 1 > nring:
                    nring = i1 - i0 + 1
            for i in range(ny):
                start[i + 1] += start[i]
        # For each source that reaches the grid, in row order: W at the
        # first tap (i0, j0) and the first ratios along x and y, as exponents
        # first, then through NumPy's vectorised exp() (libm's, one call at a
        # time, made the whole call about 8 % slower).
        m = start[ny]
        w = warr = np.empty((3, m))
        # A source reaches at most `nring` rows, so grid row i can live in
        # ring row i % nring.
        ring = <double *> calloc(nring * nx * 5, sizeof(double))
        if ring == NULL:
            raise MemoryError()
        with nogil:
            # The sources in row order, so that the sweep reads them in
            # sequence.
            for s in range(n):
                if key[s] < 0:
                    continue
                i0 = key[s]  # the footprint's first row, found in the first pass
                slot = start[i0]
                start[i0] += 1
                src = &sources[slot]
                xp = x[s] / pixel_arcsec - 0.5
                yp = y[s] / pixel_arcsec - 0.5
                j0 = ceil_in(xp - rcut, 0, nx)
                src.nrow = floor_in(yp + rcut, -1, ny - 1) - i0 + 1
                src.j0 = j0
                src.ncol = floor_in(xp + rcut, -1, nx - 1) - j0 + 1
                dx = j0 - xp
                dy = i0 - yp
                w[0, slot] = -k * (dx * dx + dy * dy)
                w[1, slot] = -k * (2.0 * dx + 1.0)
                w[2, slot] = -k * (2.0 * dy + 1.0)
                src.u = 1.0 / (sigma[s] * sigma[s])
                src.ue1 = src.u * e1[s]
                src.ue2 = src.u * e2[s]
        np.exp(warr, out=warr)
        with nogil:
            # (start[i] now ends the sources of row i.)
            slot = 0
            for i in range(ny):
                # Add the sources whose footprint starts on row i; after them
                # no source reaches row i, which is then finished.
                kend = start[i]
                while slot < kend:
                    src = &sources[slot]
                    ncol = src.ncol
                    gj = 1.0
                    rx = w[1, slot]
                    for j in range(ncol):
                        gx[2 * j] = gj
                        gx[2 * j + 1] = gj * gj
                        gj = gj * rx
                        rx = rx * step
                    g = w[0, slot]
                    r = w[2, slot]
                    slot += 1
                    ir = i % nring
                    for t in range(src.nrow):
                        wy = g
                        g = g * r
                        r = r * step
                        # Per row row_terms = W_y (u, u ε1, u ε2, W_y u); per tap the
                        # sums gain g_x row_terms, with g_x² for the W² term
                        # (Σ W² u² σ² = Σ W² u).
                        row_terms[0] = wy * src.u
                        row_terms[1] = wy * src.ue1
                        row_terms[2] = wy * src.ue2
                        row_terms[3] = row_terms[0] * wy
                        sums = ring + (ir * nx + src.j0) * 5
                        ir = ir + 1
                        if ir == nring:
                            ir = 0
                        for j in range(ncol):
                            # locals: the compiler cannot rule out gx aliasing
                            # ring.  (g_x, g_x²) side by side load as one pair.
                            gj = gx[2 * j]
                            gj2 = gx[2 * j + 1]
                            sums[0] += gj * row_terms[0]
                            sums[1] += gj * row_terms[1]
                            sums[2] += gj * row_terms[2]
                            sums[3] += gj2 * row_terms[3]
                            sums[4] += gj * wy
                            sums += 5

                # Write row i out, then zero its ring row for row i + nring.
                o1 = &out[0, i, 0]
                o2 = &out[1, i, 0]
                o3 = &out[2, i, 0]
                o4 = &out[3, i, 0]
                sums = ring + (i % nring) * nx * 5
                for j in range(nx):
                    if sums[0] > 0.0:
                        inv = 1.0 / sums[0]
                        o1[j] = sums[1] * inv
                        o2[j] = sums[2] * inv
                        o3[j] = sqrt(sums[3]) * inv
                    else:
                        o1[j] = 0.0
                        o2[j] = 0.0
                        o3[j] = empty_error
                    o4[j] = sums[4] * density_norm
                    sums += 5
                memset(ring + (i % nring) * nx * 5, 0, nx * 5 * sizeof(double))
    finally:
        free(ring)
        free(sources)
        free(gx)
        free(start)
