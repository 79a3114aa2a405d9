//! `kvgear selftest`: every CUDA kernel against its CPU reference on random inputs, and a
//! bandwidth microbenchmark of the same kernels.
//!
//! Each case draws inputs from a splitmix64 stream seeded by the run seed (printed on every
//! failing line, so a failure reproduces with `--seed`), runs the CPU reference and the kernel,
//! and compares element by element: a value passes when `|got - want| <= atol + rtol * |want|`.
//! Device buffers are laid out as `[poison; offset] ++ data ++ [poison; GUARD]`, where poison is
//! a NaN with a payload arithmetic never produces. Outputs start fully poisoned, so an element
//! the kernel forgot to write fails; in-place kernels start from their input, which differs from
//! the expected result almost everywhere. The guards must still hold the poison afterwards, so a
//! write past either end fails too. An `offset` of 1 element misaligns the buffers and forces
//! the kernels' scalar (non-float4) paths.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaView, CudaViewMut};

use super::{nvcc_version, CudaRuntime, DeviceInfo, RopeShape, Unavailable};
use crate::backend::cpu::reference::{self, RopeParams, RopeStyle};

/// `run` found no device to test on; the checks did not run.
#[derive(Debug, thiserror::Error)]
#[error("skipped: no CUDA device")]
pub struct Skipped(#[source] pub Unavailable);

/// A value passes when `|got - want| <= atol + rtol * |want|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

/// rmsnorm: the kernel sums squares in f32 (strided per-thread partial sums, then a shuffle
/// tree), the reference in f64. At dim 11008 each of 1024 threads adds at most 12 terms and the
/// tree has 10 levels, so the sum is within ~22 * 2^-24 = 1.3e-6 relative; the square root
/// halves that in the scale, and division, sqrt and the two multiplies add ~4 roundings
/// (2.4e-7). 1e-5 leaves a 5x margin; everything is multiplicative, so no absolute term.
pub const RMSNORM_TOL: Tolerance = Tolerance {
    atol: 0.0,
    rtol: 1e-5,
};

/// rope: the angles are computed in f64 on both sides and agree to ~1e-11 rad even at position
/// 131071; what differs is the f32 rotation: cos and sin rounded to f32 (2^-24 relative each),
/// two products and a fused add, then the reference's own rounding, about 3.5e-7 for inputs of
/// magnitude up to 1 (the cases draw them from [-1, 1]). The error is absolute, not relative:
/// a rotated value near zero is a cancellation. 1e-6 is a 3x margin.
pub const ROPE_TOL: Tolerance = Tolerance {
    atol: 1e-6,
    rtol: 0.0,
};

/// silu_mul: CUDA's expf is within 2 ulp, Rust's f32::exp within 1; add, IEEE division (no
/// fast-math) and multiply round once each: ~6 ulp = 3.6e-7 relative, so 1e-6. The absolute
/// term covers gates near -88.7 where exp(-gate) overflows to inf on one side only (result -0
/// against ~3e-37).
pub const SILU_MUL_TOL: Tolerance = Tolerance {
    atol: 1e-35,
    rtol: 1e-6,
};

/// add: IEEE addition is correctly rounded on both sides, so the results are identical.
pub const ADD_TOL: Tolerance = Tolerance {
    atol: 0.0,
    rtol: 0.0,
};

/// argmax: indices must be identical, ties included (the first maximal index wins).
pub const ARGMAX_TOL: Tolerance = Tolerance {
    atol: 0.0,
    rtol: 0.0,
};

/// Relative errors are reported (not judged) only where `|want|` is at least this fraction of
/// the case's largest `|want|`: below it the ratio is noise and the absolute term governs.
const REL_ERR_FLOOR: f64 = 1e-3;

/// Guard elements after each device buffer.
const GUARD: usize = 64;

/// A quiet NaN whose payload no arithmetic produces (the GPU's computed NaN is 0x7fffffff).
const POISON_BITS: u32 = 0x7fc0_dead;

fn poison() -> f32 {
    f32::from_bits(POISON_BITS)
}

/// One checked case.
#[derive(Clone, Debug)]
pub struct SelftestLine {
    pub kernel: &'static str,
    pub shape: String,
    pub max_abs_err: f64,
    /// Largest `|got - want| / |want|` over elements with `|want|` above REL_ERR_FLOOR of the
    /// case's largest; 0 for argmax.
    pub max_rel_err: f64,
    pub tol: Tolerance,
    /// Elements (rows for argmax) outside the tolerance.
    pub mismatches: usize,
    pub pass: bool,
    /// Empty on success; otherwise the first bad element, a guard overwrite or the error.
    pub detail: String,
}

impl fmt::Display for SelftestLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:<20} {:<56} max_abs {:.2e}  max_rel {:.2e}  (atol {:.0e}, rtol {:.0e})",
            if self.pass { "PASS" } else { "FAIL" },
            self.kernel,
            self.shape,
            self.max_abs_err,
            self.max_rel_err,
            self.tol.atol,
            self.tol.rtol
        )?;
        if !self.pass {
            write!(f, "  {} mismatches: {}", self.mismatches, self.detail)?;
        }
        Ok(())
    }
}

/// What `kvgear selftest` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Seed of the random inputs; from the clock when absent (printed either way).
    pub seed: Option<u64>,
    /// Run the microbenchmark instead of the checks.
    pub bench: bool,
    /// Append the lines to this CSV file (with the device in every row).
    pub csv: Option<PathBuf>,
    /// Timed launches per kernel in the microbenchmark.
    pub iters: usize,
    /// Check whole-model agreement of CUDA with the CPU fast backend on this model file
    /// (`selftest_agree`) instead of the kernel checks.
    pub model: Option<PathBuf>,
    /// With `model`: the reference prompts (llama.cpp's greedy outputs) instead of random ones.
    pub reference: Option<PathBuf>,
    /// With `model`: run the agreement checks with the CPU reference backend in CUDA's place
    /// (no GPU needed), the spread between two correct implementations.
    pub cpu_baseline: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            seed: None,
            bench: false,
            csv: None,
            iters: 50,
            model: None,
            reference: None,
            cpu_baseline: false,
        }
    }
}

/// `kvgear selftest`: prints the device, then one line per check (or per benchmark), appends
/// them to the CSV file if asked. Exit code 0 when every check passed or there is no device to
/// check ("skipped: no CUDA device ..." is printed), 1 when a check failed; other problems
/// (kernels not embedded, a device that cannot be opened) are errors.
pub fn command(opts: &Options) -> Result<ExitCode> {
    let seed = opts.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    if let (true, Some(path)) = (opts.cpu_baseline, &opts.model) {
        println!("CPU baseline: the CPU reference backend checked against the CPU fast backend");
        let lines = super::selftest_agree::run_cpu_baseline(path, opts.reference.as_deref(), seed)?;
        for l in &lines {
            println!("{l}");
        }
        let failed = lines.iter().filter(|l| !l.pass).count();
        println!("{failed} of {} baseline checks outside the CUDA criteria (seed {seed})", lines.len());
        return Ok(ExitCode::SUCCESS);
    }
    let rt = match open(0) {
        Ok(rt) => rt,
        Err(e) if e.is::<Skipped>() => {
            println!("{e:#}");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    };
    let info = rt.info()?;
    const GIB: f64 = (1u64 << 30) as f64;
    println!(
        "device {}: {} (compute capability {}.{}, {} SMs, {:.1} of {:.1} GiB free), driver CUDA {}, kernels built by {}",
        info.ordinal,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors,
        info.free_bytes as f64 / GIB,
        info.total_bytes as f64 / GIB,
        info.driver_version,
        nvcc_version().unwrap_or("an unknown nvcc")
    );
    if opts.bench {
        let lines = microbench(&rt, opts.iters, seed)?;
        for l in &lines {
            println!("{l}");
        }
        if let Some(path) = &opts.csv {
            write_bench_csv(path, &info, &lines)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let lines = match &opts.model {
        Some(path) => super::selftest_agree::run(rt.context().ordinal(), path, opts.reference.as_deref(), seed)?,
        None => run_on(&rt, seed)?,
    };
    for l in &lines {
        println!("{l}");
    }
    if let Some(path) = &opts.csv {
        write_selftest_csv(path, &info, seed, &lines)?;
    }
    let failed = lines.iter().filter(|l| !l.pass).count();
    if failed > 0 {
        println!(
            "{failed} of {} checks FAILED (seed {seed}; rerun with --seed {seed})",
            lines.len()
        );
        Ok(ExitCode::FAILURE)
    } else {
        println!("all {} checks passed (seed {seed})", lines.len());
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs every check on device 0. Returns [`Skipped`] when there is no driver or no device;
/// any other error (kernels not embedded, a context that cannot be created) is a failure.
pub fn run(seed: u64) -> Result<Vec<SelftestLine>> {
    let rt = open(0)?;
    run_on(&rt, seed)
}

/// Opens device `ordinal` for the selftest, turning a missing driver or device into [`Skipped`].
pub fn open(ordinal: usize) -> Result<CudaRuntime> {
    CudaRuntime::new(ordinal).map_err(|e| match e.downcast::<Unavailable>() {
        Ok(u @ (Unavailable::NoDriver | Unavailable::NoDevice { .. })) => Skipped(u).into(),
        Ok(u) => u.into(),
        Err(e) => e,
    })
}

/// Runs every check on `rt`. A case whose launch or copy fails becomes a failing line (with the
/// error in `detail`) and the remaining cases still run.
pub fn run_on(rt: &CudaRuntime, seed: u64) -> Result<Vec<SelftestLine>> {
    let mut t = Tester {
        rt,
        rng: SplitMix64(seed),
        seed,
        lines: Vec::new(),
    };

    for &(n_rows, dim, offset) in &[
        (1, 1, 0),
        (1, 3, 0),
        (1, 4, 0),
        (3, 31, 0),
        (2, 33, 0),
        (5, 257, 0),
        (4, 576, 0),
        (1, 4096, 0),
        (7, 4096, 0),
        (64, 4096, 0),
        (2, 5120, 0),
        (3, 11008, 0),
        (1, 4096, 1),
        (17, 576, 1),
    ] {
        t.record(
            "rmsnorm",
            format!("n_rows {n_rows}, dim {dim}{}", offset_note(offset)),
            |t| t.rmsnorm(false, n_rows, dim, offset),
        );
    }
    for &(n_rows, dim) in &[(1, 4096), (3, 33), (7, 11008)] {
        t.record(
            "rmsnorm_naive",
            format!("n_rows {n_rows}, dim {dim}"),
            |t| t.rmsnorm(true, n_rows, dim, 0),
        );
    }

    use RopeStyle::{Neox, Norm};
    let rope_cases: &[RopeCase] = &[
        // Llama2-7B queries: decode at the start and end of its context, a short prefill.
        RopeCase::new(1, 32, 128, 128, Norm, 0, 1e4),
        RopeCase::new(1, 32, 128, 128, Norm, 4095, 1e4),
        RopeCase::new(7, 32, 128, 128, Norm, 100, 1e4),
        RopeCase::new(130, 32, 128, 128, Neox, 0, 1e4),
        // Llama 3.1 (rope_freqs): 8 KV heads (GQA) and 32 query heads, far into the context.
        RopeCase::new(5, 8, 128, 128, Norm, 8000, 5e5).factors(),
        RopeCase::new(3, 32, 128, 128, Neox, 131_000, 5e5).factors(),
        // SmolLM2-135M: 9 query heads, 3 KV heads of 64.
        RopeCase::new(11, 9, 64, 64, Norm, 0, 1e5),
        RopeCase::new(11, 3, 64, 64, Neox, 37, 1e5),
        // Partial rotation: the trailing dimensions must come back untouched.
        RopeCase::new(4, 16, 128, 64, Neox, 9, 1e4),
        RopeCase::new(4, 16, 128, 32, Norm, 9, 1e4),
        RopeCase::new(2, 32, 80, 32, Neox, 5, 1e4),
        // One pair; more pairs than threads in a block; wide heads; a misaligned buffer.
        RopeCase::new(1, 1, 2, 2, Norm, 1, 1e4),
        RopeCase::new(2, 64, 128, 128, Norm, 3, 1e4),
        RopeCase::new(2, 8, 256, 256, Neox, 12, 1e4),
        RopeCase::new(3, 4, 64, 64, Norm, 2, 1e4).offset(1),
    ];
    for c in rope_cases {
        t.record("rope", c.describe(), |t| t.rope(c));
    }

    let elementwise: &[(usize, usize)] = &[
        (1, 0),
        (3, 0),
        (4, 0),
        (5, 0),
        (31, 0),
        (33, 0),
        (257, 0),
        (1023, 0),
        (1025, 0),
        (11008, 0),
        (11008 * 5 + 3, 0),
        (33, 1),
        (11008, 1),
    ];
    for &(n, offset) in elementwise {
        t.record("silu_mul", format!("n {n}{}", offset_note(offset)), |t| {
            t.silu_mul(n, offset)
        });
    }
    for &(n, offset) in elementwise {
        t.record("add", format!("n {n}{}", offset_note(offset)), |t| {
            t.add(n, offset)
        });
    }

    use ArgmaxRows::{Continuous, Equal, Mixed, NegInf, Ties};
    for &(n_rows, n_cols, rows, offset) in &[
        (1, 1, Continuous, 0),
        (3, 3, Ties, 0),
        (2, 31, Continuous, 0),
        (2, 33, Ties, 0),
        (4, 257, Mixed, 0),
        (1, 4096, Continuous, 0),
        (2, 32000, Ties, 0),
        (3, 32000, Equal, 0),
        (2, 32000, NegInf, 0),
        (1, 49152, Continuous, 0),
        (1, 128_256, Ties, 0),
        (10, 4096, Mixed, 0),
        (2, 4096, Ties, 1),
    ] {
        t.record(
            "argmax",
            format!(
                "n_rows {n_rows}, n_cols {n_cols}, {rows:?}{}",
                offset_note(offset)
            ),
            |t| t.argmax(n_rows, n_cols, rows, offset),
        );
    }
    super::selftest_model::run_model_checks(&mut t);
    t.lines.extend(super::kvcodec::check::checks(rt, seed));
    Ok(t.lines)
}

fn offset_note(offset: usize) -> String {
    if offset == 0 {
        String::new()
    } else {
        format!(", offset {offset} (misaligned)")
    }
}

/// The outcome of one case before it becomes a line.
pub(super) struct Outcome {
    pub(super) tol: Tolerance,
    pub(super) max_abs_err: f64,
    pub(super) max_rel_err: f64,
    pub(super) mismatches: usize,
    /// First problem found, if any.
    pub(super) problem: Option<String>,
}

pub(super) struct Tester<'a> {
    pub(super) rt: &'a CudaRuntime,
    pub(super) rng: SplitMix64,
    pub(super) seed: u64,
    pub(super) lines: Vec<SelftestLine>,
}

impl Tester<'_> {
    pub(super) fn record(
        &mut self,
        kernel: &'static str,
        shape: String,
        case: impl FnOnce(&mut Self) -> Result<Outcome>,
    ) {
        let line = match case(self) {
            Ok(o) => SelftestLine {
                kernel,
                shape,
                max_abs_err: o.max_abs_err,
                max_rel_err: o.max_rel_err,
                tol: o.tol,
                mismatches: o.mismatches,
                pass: o.problem.is_none(),
                detail: o
                    .problem
                    .map(|p| format!("seed {}: {p}", self.seed))
                    .unwrap_or_default(),
            },
            Err(e) => SelftestLine {
                kernel,
                shape,
                max_abs_err: f64::NAN,
                max_rel_err: f64::NAN,
                tol: Tolerance {
                    atol: 0.0,
                    rtol: 0.0,
                },
                mismatches: 0,
                pass: false,
                detail: format!("seed {}: {e:#}", self.seed),
            },
        };
        self.lines.push(line);
    }

    fn guarded(&self, data: &[f32], offset: usize) -> Result<Guarded> {
        let mut host = vec![poison(); offset + data.len() + GUARD];
        host[offset..offset + data.len()].copy_from_slice(data);
        Ok(Guarded {
            buf: self.rt.upload(&host)?,
            offset,
            len: data.len(),
        })
    }

    fn rmsnorm(
        &mut self,
        naive: bool,
        n_rows: usize,
        dim: usize,
        offset: usize,
    ) -> Result<Outcome> {
        let n = n_rows * dim;
        let mut x = self.rng.vec(n, -2.0, 2.0);
        // Rows over six decades of magnitude, so the scale (and eps, at 1e-3) matters.
        for (r, row) in x.chunks_exact_mut(dim).enumerate() {
            let s = [1.0f32, 1e-3, 1e3][r % 3];
            row.iter_mut().for_each(|v| *v *= s);
        }
        let w = self.rng.vec(dim, -1.5, 1.5);
        let eps = 1e-5;
        let mut want = vec![0.0; n];
        reference::rmsnorm(&x, &w, eps, &mut want);

        let dx = self.guarded(&x, offset)?;
        let dw = self.guarded(&w, offset)?;
        let mut out = self.guarded(&vec![poison(); n], offset)?;
        if naive {
            self.rt.rmsnorm_naive(
                &dx.view(),
                &dw.view(),
                eps,
                &mut out.view_mut(),
                n_rows,
                dim,
            )?;
        } else {
            self.rt.rmsnorm(
                &dx.view(),
                &dw.view(),
                eps,
                &mut out.view_mut(),
                n_rows,
                dim,
            )?;
        }
        out.compare(self.rt, &want, RMSNORM_TOL)
    }

    fn rope(&mut self, c: &RopeCase) -> Result<Outcome> {
        let n = c.n_tokens * c.n_heads * c.head_dim;
        let x = self.rng.vec(n, -1.0, 1.0);
        let factors = c.freq_factors.then(|| self.rng.vec(c.n_rot / 2, 1.0, 8.0));
        let params = RopeParams {
            n_heads: c.n_heads,
            head_dim: c.head_dim,
            n_rot: c.n_rot,
            freq_base: c.freq_base,
            style: c.style,
            freq_factors: factors.as_deref(),
        };
        let mut want = x.clone();
        reference::rope(&mut want, c.pos0, &params);

        let mut dx = self.guarded(&x, c.offset)?;
        let dfactors = factors.as_deref().map(|f| self.rt.upload(f)).transpose()?;
        self.rt.rope(
            &mut dx.view_mut(),
            c.n_tokens,
            c.pos0,
            &RopeShape::of(&params),
            dfactors.as_ref(),
        )?;
        dx.compare(self.rt, &want, ROPE_TOL)
    }

    fn silu_mul(&mut self, n: usize, offset: usize) -> Result<Outcome> {
        let mut gate = self.rng.vec(n, -10.0, 10.0);
        // Where exp(-gate) overflows, underflows or is exactly 1.
        let special = [-100.0, -88.0, -0.0, 0.0, 88.0, 100.0];
        for (g, s) in gate.iter_mut().zip(special) {
            *g = s;
        }
        let up = self.rng.vec(n, -2.0, 2.0);
        let mut want = gate.clone();
        reference::silu_mul(&mut want, &up);

        let mut dg = self.guarded(&gate, offset)?;
        let du = self.guarded(&up, offset)?;
        self.rt.silu_mul(&mut dg.view_mut(), &du.view(), n)?;
        dg.compare(self.rt, &want, SILU_MUL_TOL)
    }

    fn add(&mut self, n: usize, offset: usize) -> Result<Outcome> {
        let x = self.rng.vec(n, -1e3, 1e3);
        let y = self.rng.vec(n, -1e3, 1e3);
        let mut want = x.clone();
        reference::add(&mut want, &y);

        let mut dx = self.guarded(&x, offset)?;
        let dy = self.guarded(&y, offset)?;
        self.rt.add(&mut dx.view_mut(), &dy.view(), n)?;
        dx.compare(self.rt, &want, ADD_TOL)
    }

    fn argmax(
        &mut self,
        n_rows: usize,
        n_cols: usize,
        rows: ArgmaxRows,
        offset: usize,
    ) -> Result<Outcome> {
        let mut x = Vec::with_capacity(n_rows * n_cols);
        for r in 0..n_rows {
            let kind = match rows {
                ArgmaxRows::Mixed => [
                    ArgmaxRows::Continuous,
                    ArgmaxRows::Ties,
                    ArgmaxRows::Equal,
                    ArgmaxRows::NegInf,
                ][r % 4],
                k => k,
            };
            let mut row: Vec<f32> = match kind {
                ArgmaxRows::Continuous | ArgmaxRows::Mixed => self.rng.vec(n_cols, -30.0, 30.0),
                ArgmaxRows::Ties => (0..n_cols)
                    .map(|_| (self.rng.next_u64() % 16) as f32)
                    .collect(),
                ArgmaxRows::Equal => vec![0.25; n_cols],
                ArgmaxRows::NegInf => vec![f32::NEG_INFINITY; n_cols],
            };
            // In some rows the maximum sits at the very end, the last element a thread sees.
            if kind == ArgmaxRows::Continuous && r % 2 == 1 {
                row[n_cols - 1] = 100.0;
            }
            x.extend_from_slice(&row);
        }
        let want: Vec<u32> = x
            .chunks_exact(n_cols)
            .map(|row| {
                reference::argmax(row)
                    .map(|i| i as u32)
                    .ok_or_else(|| anyhow!("empty row"))
            })
            .collect::<Result<_>>()?;

        let dx = self.guarded(&x, offset)?;
        let mut out = self.rt.upload(&vec![u32::MAX; n_rows + GUARD])?;
        self.rt.argmax(&dx.view(), &mut out, n_rows, n_cols)?;
        let got = self.rt.download(&out)?;

        let mut o = Outcome {
            tol: ARGMAX_TOL,
            max_abs_err: 0.0,
            max_rel_err: 0.0,
            mismatches: 0,
            problem: None,
        };
        for (r, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                o.mismatches += 1;
                o.max_abs_err = o.max_abs_err.max((g as f64 - w as f64).abs());
                if o.problem.is_none() {
                    o.problem = Some(format!("row {r}: index {g}, want {w}"));
                }
            }
        }
        if o.problem.is_none() && got[n_rows..].iter().any(|&v| v != u32::MAX) {
            o.problem = Some("write past the end of out".into());
        }
        Ok(o)
    }
}

/// A device buffer `[poison; offset] ++ data ++ [poison; GUARD]`.
struct Guarded {
    buf: CudaSlice<f32>,
    offset: usize,
    len: usize,
}

impl Guarded {
    /// The data and the trailing guard, as the kernel sees them.
    fn view(&self) -> CudaView<'_, f32> {
        self.buf.slice(self.offset..)
    }

    fn view_mut(&mut self) -> CudaViewMut<'_, f32> {
        self.buf.slice_mut(self.offset..)
    }

    /// Downloads the buffer, checks the guards and compares the data with `want`.
    fn compare(&self, rt: &CudaRuntime, want: &[f32], tol: Tolerance) -> Result<Outcome> {
        let all = rt.download(&self.buf)?;
        let got = &all[self.offset..self.offset + self.len];
        let mut o = compare(got, want, tol);
        let guards_intact = all[..self.offset]
            .iter()
            .chain(&all[self.offset + self.len..])
            .all(|v| v.to_bits() == POISON_BITS);
        if !guards_intact && o.problem.is_none() {
            o.problem = Some("write outside the buffer (a guard element changed)".into());
        }
        Ok(o)
    }
}

pub(super) fn compare(got: &[f32], want: &[f32], tol: Tolerance) -> Outcome {
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let rel_floor = scale * REL_ERR_FLOOR;
    let mut o = Outcome {
        tol,
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        mismatches: 0,
        problem: None,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g64, w64) = (g as f64, w as f64);
        let err = if g == w {
            0.0
        } else if g.is_nan() || w.is_nan() {
            f64::INFINITY
        } else {
            (g64 - w64).abs()
        };
        o.max_abs_err = o.max_abs_err.max(err);
        if w64.abs() >= rel_floor && w64 != 0.0 {
            o.max_rel_err = o.max_rel_err.max(err / w64.abs());
        }
        // err == 0 first: an exact match passes even where rtol * |want| is 0 * inf.
        if !(err == 0.0 || err <= tol.atol + tol.rtol * w64.abs()) {
            o.mismatches += 1;
            if o.problem.is_none() {
                let what = if g.to_bits() == POISON_BITS {
                    " (never written)"
                } else {
                    ""
                };
                o.problem = Some(format!("element {i}: got {g:e}{what}, want {w:e}"));
            }
        }
    }
    o
}

struct RopeCase {
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    n_rot: usize,
    style: RopeStyle,
    pos0: usize,
    freq_base: f32,
    freq_factors: bool,
    offset: usize,
}

impl RopeCase {
    const fn new(
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        n_rot: usize,
        style: RopeStyle,
        pos0: usize,
        freq_base: f32,
    ) -> RopeCase {
        RopeCase {
            n_tokens,
            n_heads,
            head_dim,
            n_rot,
            style,
            pos0,
            freq_base,
            freq_factors: false,
            offset: 0,
        }
    }

    const fn factors(self) -> RopeCase {
        RopeCase {
            freq_factors: true,
            ..self
        }
    }

    const fn offset(self, offset: usize) -> RopeCase {
        RopeCase { offset, ..self }
    }

    fn describe(&self) -> String {
        format!(
            "{:?} {}x{}x{} n_rot {} pos0 {} base {:e}{}{}",
            self.style,
            self.n_tokens,
            self.n_heads,
            self.head_dim,
            self.n_rot,
            self.pos0,
            self.freq_base,
            if self.freq_factors { " factors" } else { "" },
            offset_note(self.offset)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArgmaxRows {
    /// Uniform values; odd rows have their maximum in the last column.
    Continuous,
    /// Integers 0..16: many ties for the maximum.
    Ties,
    /// Every value equal: the answer is 0.
    Equal,
    /// Every value -inf: the answer is 0.
    NegInf,
    /// The kinds above in turn, one per row.
    Mixed,
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough for test inputs.
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    pub(super) fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// One microbenchmark measurement.
#[derive(Clone, Debug)]
pub struct BenchLine {
    pub kernel: &'static str,
    pub shape: String,
    /// Bytes the kernel must read and write at least (each input and output once).
    pub bytes: u64,
    pub iters: usize,
    pub median_us: f64,
    pub min_us: f64,
    /// `bytes / median`, in 1e9 bytes per second.
    pub gb_s: f64,
    /// For a kernel with a `_naive` baseline: baseline median / this median, same run.
    pub speedup_vs_naive: Option<f64>,
}

impl fmt::Display for BenchLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<20} {:<40} {:>10.1} us median {:>10.1} us min {:>8.1} GB/s",
            self.kernel, self.shape, self.median_us, self.min_us, self.gb_s
        )?;
        if let Some(s) = self.speedup_vs_naive {
            write!(f, "  {s:.2}x vs naive")?;
        }
        Ok(())
    }
}

/// Untimed launches before the measured ones, to warm caches and clocks.
const BENCH_WARMUP: usize = 5;

/// Times each kernel at a large size with CUDA events: `iters` launches after a warm-up, each
/// between its own pair of events, reporting the median and minimum.
pub fn microbench(rt: &CudaRuntime, iters: usize, seed: u64) -> Result<Vec<BenchLine>> {
    if iters == 0 {
        bail!("microbench: iters must be at least 1");
    }
    let mut rng = SplitMix64(seed);
    let mut lines = Vec::new();
    const F32: u64 = 4;
    super::selftest_model::microbench_model(rt, iters, seed, &mut lines)?;

    let (n_rows, dim) = (4096usize, 4096usize);
    let x = rt.upload(&rng.vec(n_rows * dim, -2.0, 2.0))?;
    let w = rt.upload(&rng.vec(dim, -1.5, 1.5))?;
    let mut out = rt.zeros::<f32>(n_rows * dim)?;
    let bytes = (2 * n_rows * dim + dim) as u64 * F32;
    let shape = format!("{n_rows}x{dim}");
    let naive = time(rt, iters, || {
        rt.rmsnorm_naive(&x, &w, 1e-5, &mut out, n_rows, dim)
    })?;
    let fast = time(rt, iters, || {
        rt.rmsnorm(&x, &w, 1e-5, &mut out, n_rows, dim)
    })?;
    lines.push(bench_line(
        "rmsnorm",
        shape.clone(),
        bytes,
        iters,
        fast,
        Some(naive.0 / fast.0),
    ));
    lines.push(bench_line(
        "rmsnorm_naive",
        shape,
        bytes,
        iters,
        naive,
        None,
    ));
    drop((x, w, out));

    let (n_tokens, n_heads, head_dim) = (4096usize, 32usize, 128usize);
    let mut q = rt.upload(&rng.vec(n_tokens * n_heads * head_dim, -1.0, 1.0))?;
    for style in [RopeStyle::Norm, RopeStyle::Neox] {
        let shape_r = RopeShape {
            n_heads,
            head_dim,
            n_rot: head_dim,
            freq_base: 1e4,
            style,
        };
        let t = time(rt, iters, || rt.rope(&mut q, n_tokens, 0, &shape_r, None))?;
        let bytes = (2 * n_tokens * n_heads * head_dim) as u64 * F32;
        lines.push(bench_line(
            "rope",
            format!("{style:?} {n_tokens}x{n_heads}x{head_dim}"),
            bytes,
            iters,
            t,
            None,
        ));
    }
    drop(q);

    let n = 4096 * 11008;
    let mut gate = rt.upload(&rng.vec(n, -4.0, 4.0))?;
    let up = rt.upload(&rng.vec(n, -1.0, 1.0))?;
    let t = time(rt, iters, || rt.silu_mul(&mut gate, &up, n))?;
    lines.push(bench_line(
        "silu_mul",
        format!("n {n} (4096x11008)"),
        3 * n as u64 * F32,
        iters,
        t,
        None,
    ));
    drop((gate, up));

    let n = 4096 * 4096;
    let mut a = rt.upload(&rng.vec(n, -1.0, 1.0))?;
    let b = rt.upload(&rng.vec(n, -1.0, 1.0))?;
    let t = time(rt, iters, || rt.add(&mut a, &b, n))?;
    lines.push(bench_line(
        "add",
        format!("n {n} (4096x4096)"),
        3 * n as u64 * F32,
        iters,
        t,
        None,
    ));
    drop((a, b));

    let (n_rows, n_cols) = (256usize, 32000usize);
    let logits = rt.upload(&rng.vec(n_rows * n_cols, -30.0, 30.0))?;
    let mut idx = rt.zeros::<u32>(n_rows)?;
    let t = time(rt, iters, || rt.argmax(&logits, &mut idx, n_rows, n_cols))?;
    let bytes = (n_rows * n_cols) as u64 * F32 + n_rows as u64 * 4;
    lines.push(bench_line(
        "argmax",
        format!("{n_rows}x{n_cols}"),
        bytes,
        iters,
        t,
        None,
    ));
    lines.extend(super::kvcodec::check::bench(rt, iters, seed)?);
    Ok(lines)
}

/// Device-to-device copy bandwidth: `iters` timed copies of `bytes` bytes (after a warm-up),
/// (read + written bytes) / median time, in 1e9 bytes per second.
pub fn copy_bandwidth_gb_s(rt: &CudaRuntime, bytes: usize, iters: usize) -> Result<f64> {
    let n = bytes / 4;
    let src = rt.zeros::<f32>(n)?;
    let mut dst = rt.zeros::<f32>(n)?;
    let (median_ms, _) = time(rt, iters.max(1), || {
        rt.stream().memcpy_dtod(&src, &mut dst).map_err(|e| anyhow!("device copy of {bytes} bytes: {e}"))
    })?;
    Ok(2.0 * (n * 4) as f64 / (median_ms * 1e-3) / 1e9)
}

pub(super) fn bench_line(
    kernel: &'static str,
    shape: String,
    bytes: u64,
    iters: usize,
    (median_ms, min_ms): (f64, f64),
    speedup_vs_naive: Option<f64>,
) -> BenchLine {
    BenchLine {
        kernel,
        shape,
        bytes,
        iters,
        median_us: median_ms * 1e3,
        min_us: min_ms * 1e3,
        gb_s: bytes as f64 / (median_ms * 1e-3) / 1e9,
        speedup_vs_naive,
    }
}

/// (median, min) in milliseconds of `iters` timed launches of `launch`, each alone between its
/// own pair of events.
pub(super) fn time(rt: &CudaRuntime, iters: usize, mut launch: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    time_stream(rt, iters, 1, |_| launch())
}

/// (median, min) in milliseconds per launch of `iters` samples, each `reps` launches back to back
/// between one pair of events: `launch(i)` for i = 0.. (the caller rotates its inputs by i, so
/// that buffers larger together than the L2 cache are read from device memory). This is the
/// kernel's own time with the launch gaps of a busy stream, as a decode step's chain of kernels
/// sees it; `time` gives one launch alone, latency included.
pub(super) fn time_stream(
    rt: &CudaRuntime,
    iters: usize,
    reps: usize,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Result<(f64, f64)> {
    let reps = reps.max(1);
    for i in 0..BENCH_WARMUP.max(reps) {
        launch(i)?;
    }
    rt.synchronize()?;
    let ctx = rt.context();
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| anyhow!("creating a CUDA event: {e}"))
    };
    let (start, end) = (event()?, event()?);
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        start
            .record(rt.stream())
            .map_err(|e| anyhow!("recording a CUDA event: {e}"))?;
        for i in 0..reps {
            launch(i)?;
        }
        end.record(rt.stream())
            .map_err(|e| anyhow!("recording a CUDA event: {e}"))?;
        ms.push(
            start
                .elapsed_ms(&end)
                .map_err(|e| anyhow!("reading a CUDA event timer: {e}"))? as f64
                / reps as f64,
        );
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[0]))
}

const SELFTEST_COLUMNS: [&str; 15] = [
    "unix_time",
    "device",
    "compute_capability",
    "driver_cuda",
    "nvcc",
    "seed",
    "kernel",
    "shape",
    "max_abs_err",
    "max_rel_err",
    "atol",
    "rtol",
    "mismatches",
    "pass",
    "detail",
];

const BENCH_COLUMNS: [&str; 13] = [
    "unix_time",
    "device",
    "compute_capability",
    "driver_cuda",
    "nvcc",
    "kernel",
    "shape",
    "bytes",
    "iters",
    "median_us",
    "min_us",
    "gb_s",
    "speedup_vs_naive",
];

fn device_columns(info: &DeviceInfo) -> Vec<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    vec![
        now.to_string(),
        info.name.clone(),
        format!(
            "{}.{}",
            info.compute_capability.0, info.compute_capability.1
        ),
        info.driver_version.clone(),
        nvcc_version().unwrap_or("").to_string(),
    ]
}

/// Appends the selftest lines to a CSV file (header written when the file is new).
pub fn write_selftest_csv(
    path: &Path,
    info: &DeviceInfo,
    seed: u64,
    lines: &[SelftestLine],
) -> Result<()> {
    let rows = lines.iter().map(|l| {
        let mut r = device_columns(info);
        r.extend([
            seed.to_string(),
            l.kernel.to_string(),
            l.shape.clone(),
            format!("{:e}", l.max_abs_err),
            format!("{:e}", l.max_rel_err),
            format!("{:e}", l.tol.atol),
            format!("{:e}", l.tol.rtol),
            l.mismatches.to_string(),
            l.pass.to_string(),
            l.detail.clone(),
        ]);
        r
    });
    append_csv(path, &SELFTEST_COLUMNS, rows)
}

/// Appends the microbenchmark lines to a CSV file (header written when the file is new).
pub fn write_bench_csv(path: &Path, info: &DeviceInfo, lines: &[BenchLine]) -> Result<()> {
    let rows = lines.iter().map(|l| {
        let mut r = device_columns(info);
        r.extend([
            l.kernel.to_string(),
            l.shape.clone(),
            l.bytes.to_string(),
            l.iters.to_string(),
            format!("{:.3}", l.median_us),
            format!("{:.3}", l.min_us),
            format!("{:.2}", l.gb_s),
            l.speedup_vs_naive
                .map(|s| format!("{s:.3}"))
                .unwrap_or_default(),
        ]);
        r
    });
    append_csv(path, &BENCH_COLUMNS, rows)
}

/// Appends rows; a new or empty file gets the header first, an existing one must have the
/// same header.
fn append_csv(
    path: &Path,
    columns: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<()> {
    let existing = fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false);
    if existing {
        let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut first = String::new();
        BufReader::new(file)
            .read_line(&mut first)
            .with_context(|| format!("reading {}", path.display()))?;
        if first.trim_end() != columns.join(",") {
            bail!(
                "{} exists with other columns than {}",
                path.display(),
                columns.join(",")
            );
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(file);
    if !existing {
        w.write_record(columns)?;
    }
    for r in rows {
        w.write_record(&r)?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_flags_poison_and_tolerance() {
        let tol = Tolerance {
            atol: 0.0,
            rtol: 1e-3,
        };
        let o = compare(&[1.0, 2.0005, 3.0], &[1.0, 2.0, 3.0], tol);
        assert_eq!(o.mismatches, 0);
        let o = compare(&[1.0, poison(), 3.01], &[1.0, 2.0, 3.0], tol);
        assert_eq!(o.mismatches, 2);
        assert!(o.problem.unwrap().contains("never written"));
        let o = compare(&[f32::NEG_INFINITY], &[f32::NEG_INFINITY], ADD_TOL);
        assert_eq!(o.mismatches, 0);
    }

    #[test]
    fn splitmix_is_seeded_and_in_range() {
        let (mut a, mut b) = (SplitMix64(7), SplitMix64(7));
        assert_eq!(a.next_u64(), b.next_u64());
        assert!(a
            .vec(1000, -2.0, 2.0)
            .iter()
            .all(|v| (-2.0..2.0).contains(v)));
    }

    #[test]
    fn csv_appends_under_one_header() {
        let dir = std::env::temp_dir().join(format!("kvgear-selftest-csv-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.csv");
        let info = DeviceInfo {
            ordinal: 0,
            name: "Test GPU".into(),
            compute_capability: (9, 0),
            multiprocessors: 132,
            driver_version: "13.0".into(),
            total_bytes: 1,
            free_bytes: 1,
        };
        let line = bench_line("add", "n 4".into(), 48, 3, (0.001, 0.0009), None);
        write_bench_csv(&path, &info, std::slice::from_ref(&line)).unwrap();
        write_bench_csv(&path, &info, &[line]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with(&BENCH_COLUMNS.join(",")));
        assert!(write_selftest_csv(&path, &info, 1, &[]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
