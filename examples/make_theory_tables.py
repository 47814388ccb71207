"""Regenerate the ΛCDM tables that the sky simulator (examples/skies.py) reads.

For one flat ΛCDM cosmology and one source plane z_s: ``theory_cl.ecsv``, the
convergence C_ℓ of sources at z_s (Limber, nonlinear P(k)), and
``theory_hmf.ecsv``, the Tinker et al. (2008) dn/dlnM for M200c [comoving
Mpc⁻³] on a mass × redshift grid, 0 < z < z_s.

Only this script needs pyccl (the LSST DESC Core Cosmology Library) and CAMB;
the simulator itself reads the ECSV files with astropy.  Install them in a
separate environment, e.g. ``pip install pyccl camb`` (both ship wheels).

Usage (the shipped tables were made with the defaults)::

    python make_theory_tables.py --out-dir DIR \
        [--h 0.7] [--omega-m 0.3] [--omega-b 0.046] [--n-s 0.97] \
        [--a-s 2.1e-9 | --sigma8 S8] [--z-source 1.5] [--pk halofit]

Choices and their sources
-------------------------
* Cosmology: the paper's flat ΛCDM, H0 = 70 km/s/Mpc, Ωm = 0.3 (Hong et al.
  2021 §1).  The paper leaves Ωb, n_s and the amplitude open; we take the
  MassiveNuS fiducial values (Liu et al. 2018, MNRAS 481, 1337, §2): Ωb = 0.046,
  n_s = 0.97, A_s = 2.1e-9, with massless neutrinos (the paper's own maps had
  Σm_ν = 0.177 eV and Ωm = 0.2485, which §2.3.1 states do not matter here).
  T_CMB = 2.7255 K (Fixsen 2009), N_eff = 3.046 (CCL default).
* Linear P(k): CAMB (Lewis, Challinor & Lasenby 2000) through CCL.
* Nonlinear P(k): halofit as revised by Takahashi et al. (2012, ApJ 761, 152),
  CCL's ``halofit``.  ``--pk linear`` is available for comparison.
* C_ℓ: first-order Born, Limber (LoVerde & Afshordi 2008, k = (ℓ + ½)/χ) for a
  single source plane,
  C_ℓ = ∫₀^χs dχ q(χ)² / χ² P((ℓ + ½)/χ, z(χ)),
  q(χ) = (3/2) Ωm (H0/c)² χ (χs − χ) / χs (1 + z)     [Bartelmann & Schneider
  2001, eq. 6.21].  Cross-checked against CCL's ``angular_cl`` with a narrow
  source n(z).
* Mass function: Tinker et al. (2008, ApJ 688, 709) for M200c (CCL converts the
  overdensity to Δ_m = 200/Ωm(z) and interpolates the fit's parameters).
* Halo-model one-halo C_ℓ above a mass cut (column ``cl_1h_ccl``): NFW truncated
  at R200c, Duffy et al. (2008, MNRAS 390, L64) c(M) for M200c (full sample),
  Tinker 2008 mass function.  Informational only: the simulator recomputes its
  own one-halo term from the mass-function table and the exact profile it
  paints (skies.py, ``halo_cl_1h``); the tests use this column as a cross-check.
"""
import argparse
import os
import time

import numpy as np
from astropy.table import Table

try:  # the `theory` extra; --help works without it
    import pyccl as ccl
except ImportError:
    ccl = None

C_KM_S = 299792.458  # speed of light [km/s]


def rounded(x, digits):
    """Round to ``digits`` significant digits so the ECSV text stays small."""
    return np.array([float(f"{v:.{digits - 1}e}") for v in np.ravel(x)])


def build_cosmology(args):
    """Return the pyccl.Cosmology described by the command line."""
    omega_c = args.omega_m - args.omega_b
    amplitude = ({"sigma8": args.sigma8} if args.sigma8 is not None
                 else {"A_s": args.a_s})
    return ccl.Cosmology(Omega_c=omega_c, Omega_b=args.omega_b, h=args.h,
                         n_s=args.n_s, m_nu=0.0, T_CMB=2.7255,
                         transfer_function="boltzmann_camb",
                         matter_power_spectrum=args.pk, **amplitude)


def limber_cl(cosmo, ell, z_source, n_chi=2000):
    """Convergence C_ℓ [sr] of one source plane by the Limber integral (Simpson, n_chi nodes)."""
    from scipy.integrate import simpson
    a_s = 1.0 / (1.0 + z_source)
    chi_s = ccl.comoving_radial_distance(cosmo, a_s)
    # Start just off the observer: the integrand vanishes there as χ⁰ but k → ∞.
    chi = np.linspace(chi_s * 1e-4, chi_s * (1 - 1e-6), n_chi)
    a = ccl.scale_factor_of_chi(cosmo, chi)
    h0_over_c = cosmo["h"] * 100.0 / C_KM_S  # [1/Mpc]
    q = 1.5 * cosmo["Omega_m"] * h0_over_c**2 * chi * (chi_s - chi) / chi_s / a
    k = (ell[:, None] + 0.5) / chi[None, :]
    pk = np.empty_like(k)
    for j in range(chi.size):
        pk[:, j] = ccl.nonlin_matter_power(cosmo, k[:, j], a[j])
    return simpson(q**2 / chi**2 * pk, x=chi, axis=1)


def ccl_cl_check(cosmo, ell, z_source, width=0.002):
    """C_ℓ from CCL's own tracer machinery with a narrow Gaussian n(z)."""
    z = np.linspace(z_source - 6 * width, z_source + 6 * width, 241)
    nz = np.exp(-0.5 * ((z - z_source) / width) ** 2)
    tracer = ccl.WeakLensingTracer(cosmo, dndz=(z, nz))
    return ccl.angular_cl(cosmo, tracer, tracer, ell)


def one_halo_cl(cosmo, ell, z_source, m_min_msun, m_max_msun, n_mass=200):
    """Halo-model one-halo C_ℓ of halos with m_min < M200c < m_max.

    P_1h(k, a) = ∫ dlnM dn/dlnM |M u(k|M)|² / ρ̄_m²  (Cooray & Sheth 2002,
    eq. 97), integrated here directly: CCL's ``HMCalculator`` would assign the
    mass below ``log10M_min`` to halos at the cut (its large-scale
    normalisation fix for the 2-halo term), which is wrong for a one-halo term
    restricted to a mass range.
    """
    mdef = ccl.halos.MassDef200c
    hmf = ccl.halos.MassFuncTinker08(mass_def=mdef)
    conc = ccl.halos.ConcentrationDuffy08(mass_def=mdef)
    prof = ccl.halos.HaloProfileNFW(mass_def=mdef, concentration=conc,
                                    truncated=True, fourier_analytic=True)
    rho_m0 = ccl.rho_x(cosmo, 1.0, "matter")  # comoving mean matter density
    lnm = np.linspace(np.log(m_min_msun), np.log(m_max_msun), n_mass)
    m = np.exp(lnm)
    a_arr = np.linspace(1.0 / (1.0 + z_source) - 0.01, 1.0, 64)
    lk = np.linspace(np.log(1e-4), np.log(1e2), 200)
    pk = np.empty((a_arr.size, lk.size))
    for i, a in enumerate(a_arr):
        n = hmf(cosmo, m, a) / np.log(10.0)  # dn/dlnM
        uk = prof.fourier(cosmo, np.exp(lk), m, a)  # (n_mass, n_k), [Msun]
        pk[i] = np.trapezoid(n[:, None] * uk**2, lnm, axis=0) / rho_m0**2
    pk1h = ccl.Pk2D(a_arr=a_arr, lk_arr=lk, pk_arr=np.log(pk), is_logp=True,
                    extrap_order_lok=0, extrap_order_hik=2)
    z = np.linspace(z_source - 0.012, z_source + 0.012, 241)
    nz = np.exp(-0.5 * ((z - z_source) / 0.002) ** 2)
    tracer = ccl.WeakLensingTracer(cosmo, dndz=(z, nz))
    return ccl.angular_cl(cosmo, tracer, tracer, ell, p_of_k_a=pk1h)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=".",
                   help="directory of the tables, created with its parents if missing")
    p.add_argument("--h", type=float, default=0.7, help="H0 / 100 km/s/Mpc")
    p.add_argument("--omega-m", type=float, default=0.3)
    p.add_argument("--omega-b", type=float, default=0.046)
    p.add_argument("--n-s", type=float, default=0.97)
    p.add_argument("--a-s", type=float, default=2.1e-9)
    p.add_argument("--sigma8", type=float, default=None,
                   help="normalise by σ8 instead of A_s")
    p.add_argument("--z-source", type=float, default=1.5)
    p.add_argument("--pk", default="halofit", choices=["halofit", "linear"])
    p.add_argument("--n-ell", type=int, default=120)
    p.add_argument("--n-mass", type=int, default=50)
    p.add_argument("--n-z", type=int, default=40)
    p.add_argument("--m-min", type=float, default=1e12, help="[Msun]")
    p.add_argument("--m-max", type=float, default=3e15, help="[Msun]")
    p.add_argument("--z-min", type=float, default=0.02)
    p.add_argument("--one-halo-m-min", type=float, default=3e13,
                   help="mass cut of the cl_1h_ccl column [Msun]")
    args = p.parse_args(argv)
    # --out-dir is made with its parents: what exists of its path must be a directory.
    path = os.path.abspath(args.out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        p.error(f"--out-dir: {path} is not a directory")
    if ccl is None:
        raise SystemExit('make_theory_tables: needs pyccl and camb: pip install -e ".[theory]"')
    t0 = time.time()
    cosmo = build_cosmology(args)
    # Every option spelled out, so the tables say exactly how to remake them.
    command = "python make_theory_tables.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v is not None and k != "out_dir")
    meta = {
        "H0": 100.0 * args.h, "Om0": args.omega_m, "Ob0": args.omega_b,
        "n_s": args.n_s, "A_s": None if args.sigma8 else args.a_s,
        "sigma8": float(ccl.sigma8(cosmo)), "m_nu_eV": 0.0, "Tcmb0": 2.7255,
        "z_source": args.z_source, "pk_model": args.pk,
        "pk_reference": ("Takahashi et al. 2012 (halofit), CAMB linear"
                         if args.pk == "halofit" else "CAMB linear"),
        "pyccl_version": ccl.__version__,
        "command": command.strip(),
    }

    # --- C_ℓ --------------------------------------------------------------
    ell = np.logspace(1, 5, args.n_ell)
    cl = limber_cl(cosmo, ell, args.z_source)
    cl_ccl = ccl_cl_check(cosmo, ell, args.z_source)
    rel = np.max(np.abs(cl_ccl / cl - 1)[(ell > 50) & (ell < 3e4)])
    print(f"Limber vs CCL angular_cl: max |rel dev| = {rel:.3%} (50 < ℓ < 3e4)")
    cl_1h = one_halo_cl(cosmo, ell, args.z_source, args.one_halo_m_min,
                        args.m_max)
    t_cl = Table({"ell": rounded(ell, 6), "cl_kappa": rounded(cl, 6),
                  "cl_1h_ccl": rounded(cl_1h, 6)},
                 meta=dict(meta, description=(
                     "Convergence power spectrum of sources at z_source "
                     "(Limber, first-order Born); cl_1h_ccl: halo-model "
                     "one-halo term of halos above one_halo_m_min_msun "
                     "(truncated NFW, Duffy08 c(M), Tinker08)"),
                     one_halo_m_min_msun=args.one_halo_m_min,
                     one_halo_m_max_msun=args.m_max))
    os.makedirs(args.out_dir, exist_ok=True)
    t_cl.write(f"{args.out_dir}/theory_cl.ecsv", overwrite=True)

    # --- mass function ----------------------------------------------------
    mdef = ccl.halos.MassDef200c
    hmf = ccl.halos.MassFuncTinker08(mass_def=mdef)
    log10m = np.linspace(np.log10(args.m_min), np.log10(args.m_max),
                         args.n_mass)
    z = np.linspace(args.z_min, args.z_source, args.n_z)
    rows_z, rows_m, rows_n = [], [], []
    for zi in z:
        # CCL returns dn/dlog10M [Mpc⁻³, comoving]; convert to dn/dlnM.
        n = hmf(cosmo, 10**log10m, 1.0 / (1.0 + zi)) / np.log(10.0)
        rows_z.append(np.full_like(log10m, zi))
        rows_m.append(log10m)
        rows_n.append(n)
    t_mf = Table({"z": rounded(np.concatenate(rows_z), 6),
                  "log10_m200c_msun": rounded(np.concatenate(rows_m), 6),
                  "dn_dlnm_mpc3": rounded(np.concatenate(rows_n), 6)},
                 meta=dict(meta, description=(
                     "Tinker et al. 2008 halo mass function, M200c, "
                     "comoving number density per ln M [Mpc^-3]")))
    t_mf.write(f"{args.out_dir}/theory_hmf.ecsv", overwrite=True)

    # --- c(M) cross-check: the simulator codes Duffy08 in closed form -------
    conc = ccl.halos.ConcentrationDuffy08(mass_def=mdef)
    h = args.h
    for m, zz in ((1e14, 0.5), (1e15, 0.2)):
        c_ccl = conc(cosmo, m, 1.0 / (1.0 + zz))
        c_closed = 5.71 * (m / (2e12 / h)) ** -0.084 * (1 + zz) ** -0.47
        print(f"c200c(M={m:.0e}, z={zz}) CCL {c_ccl:.4f} closed form "
              f"{c_closed:.4f}")
    print(f"sigma8 = {meta['sigma8']:.4f}; wrote theory_cl.ecsv "
          f"({len(t_cl)} rows), theory_hmf.ecsv ({len(t_mf)} rows) in "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
