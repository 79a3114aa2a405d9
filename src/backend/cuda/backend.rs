//! The CUDA [`Backend`]: activations are device `f32` buffers, weights are uploaded once in their
//! GGUF block format, and each layer's KV cache is the CPU policy (`kv::policy`, deciding
//! evictions from the attention mass copied back after each step) composed with a
//! [`DeviceCodec`] holding the tokens on the device.

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Weak};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaSlice, CudaView};

use super::kv::DeviceCodec;
use super::kv_fp16::Fp16DeviceCodec;
use super::quant::{DeviceWeight, MatmulKernel};
use super::{CudaRuntime, RopeShape};
use crate::backend::cpu::reference::RopeParams;
use crate::backend::Backend;
use crate::bench::memory::MemoryPlan;
use crate::kv::codec::KvBytes;
use crate::kv::policy::{make_policy, Policy};
use crate::kv::strategy::StrategySpec;
use crate::model::weights::Tensor;

/// The per-layer seed of a strategy's codec, derived as `kv::strategy::StrategyLayer::new` does.
pub fn layer_seed(spec: &StrategySpec, layer: usize) -> u64 {
    spec.seed ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The device codec a strategy names: `fp16` here; `uniform`, `group` and `gear` are the
/// compressed codecs of `backend::cuda::kvcodec`.
pub fn make_device_codec(
    rt: &CudaRuntime,
    spec: &StrategySpec,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    seed: u64,
) -> Result<Box<dyn DeviceCodec>> {
    match spec.codec.as_str() {
        "fp16" => Ok(Box::new(Fp16DeviceCodec::new(rt, n_kv_heads, head_dim, capacity)?)),
        c @ ("uniform" | "group" | "gear") => super::kvcodec::new_device_codec(rt, c, &spec.codec_params, n_kv_heads, head_dim, capacity, seed)
            .with_context(|| format!("the {c} codec of strategy {} on CUDA", spec.name)),
        other => bail!("unknown codec {other}"),
    }
}

/// Device bytes one layer's cache reserves up front under `spec` for `capacity` tokens: the
/// codec's storage (fp16: the whole capacity; compressed codecs: the arena they reserve for a
/// full context and their fp16 buffers) and the mass buffer of a policy that wants it.
pub fn layer_reserved_bytes(spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<usize> {
    let storage = match spec.codec.as_str() {
        "fp16" => Fp16DeviceCodec::reserved_bytes_for(n_kv_heads, head_dim, capacity),
        c => super::kvcodec::reserved_bytes_for(c, &spec.codec_params, n_kv_heads, head_dim, capacity)?,
    };
    let mass = if spec.policy == "h2o" || spec.policy == "sieve" { n_kv_heads * capacity * 4 } else { 0 };
    Ok(storage + mass)
}

/// One layer's cache on the device: a CPU policy over a device codec.
pub struct CudaKv {
    codec: Box<dyn DeviceCodec>,
    policy: Box<dyn Policy>,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    /// Attention mass of the current step, `[n_kv_heads, mass_stride]`, when the policy wants it.
    mass: Option<CudaSlice<f32>>,
    mass_stride: usize,
    host_mass: Vec<f32>,
    n_seen: usize,
    spec: StrategySpec,
    layer: usize,
}

/// The CUDA backend on one device.
pub struct Cuda {
    pub rt: CudaRuntime,
    name: String,
    /// Matrix kernel choice (benchmarks pin one; the forward pass uses Auto).
    pub matmul_kernel: Cell<MatmulKernel>,
    /// Weights uploaded so far, by host address and length (a tied output shares the embedding).
    uploaded: RefCell<Vec<(usize, usize, Weak<DeviceWeight>)>>,
    rope_factors: RefCell<Option<(Vec<f32>, CudaSlice<f32>)>>,
    /// Device memory in use (driver figure) when the backend started, and the most seen since.
    used_at_start: usize,
    used_peak: Cell<usize>,
}

impl Cuda {
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let rt = CudaRuntime::new(ordinal)?;
        let name = rt.device_name()?;
        let (free, total) = rt.memory()?;
        Ok(Cuda {
            rt,
            name: format!("cuda:{ordinal} ({name})"),
            matmul_kernel: Cell::new(MatmulKernel::Auto),
            uploaded: RefCell::new(Vec::new()),
            rope_factors: RefCell::new(None),
            used_at_start: total - free,
            used_peak: Cell::new(total - free),
        })
    }

    fn sample_memory(&self) {
        if let Ok((free, total)) = self.rt.memory() {
            self.used_peak.set(self.used_peak.get().max(total - free));
        }
    }

    fn check_kv(layer: &CudaKv, what: &str, have: usize, need: usize) -> Result<()> {
        if have < need {
            bail!("{what}: buffer of {have} values, the op needs {need} (layer {})", layer.layer);
        }
        Ok(())
    }
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        bail!("{what}: buffer of {have} values, the op needs {need}");
    }
    Ok(())
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Weight = Arc<DeviceWeight>;
    type KvLayer = CudaKv;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        let b = self.rt.zeros::<f32>(n.max(1))?;
        self.sample_memory();
        Ok(b)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        if data.is_empty() {
            return self.rt.zeros::<f32>(1);
        }
        self.rt.upload(data)
    }

    fn download(&self, buf: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        check_len("download", buf.len(), out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.rt
            .stream()
            .memcpy_dtoh(&buf.slice(..out.len()), out)
            .map_err(|e| anyhow!("copying {} values from the device (a kernel failed?): {e}", out.len()))?;
        self.rt.synchronize()?;
        self.sample_memory();
        Ok(())
    }

    fn weight(&self, t: &Tensor) -> Result<Arc<DeviceWeight>> {
        let key = (t.data().as_ptr() as usize, t.n_bytes());
        let mut up = self.uploaded.borrow_mut();
        up.retain(|(_, _, w)| w.strong_count() > 0);
        if let Some(w) = up.iter().find(|(p, n, _)| (*p, *n) == key).and_then(|(_, _, w)| w.upgrade()) {
            return Ok(w);
        }
        let w = Arc::new(self.rt.upload_weight(t)?);
        up.push((key.0, key.1, Arc::downgrade(&w)));
        Ok(w)
    }

    fn embed(&self, table: &Arc<DeviceWeight>, tokens: &[u32], out: &mut CudaSlice<f32>) -> Result<()> {
        self.rt.embed(table, tokens, out)
    }

    fn copy_rows(&self, src: &CudaSlice<f32>, row0: usize, n_rows: usize, row_len: usize, dst: &mut CudaSlice<f32>) -> Result<()> {
        let n = n_rows * row_len;
        check_len("copy_rows src", src.len(), (row0 + n_rows) * row_len)?;
        check_len("copy_rows dst", dst.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let from: CudaView<f32> = src.slice(row0 * row_len..row0 * row_len + n);
        self.rt
            .stream()
            .memcpy_dtod(&from, &mut dst.slice_mut(..n))
            .map_err(|e| anyhow!("copy_rows: device copy of {n} values: {e}"))
    }

    fn rmsnorm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, dim: usize, eps: f32, n_rows: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        self.rt.rmsnorm(x, w, eps, out, n_rows, dim)
    }

    fn matmul(&self, w: &Arc<DeviceWeight>, x: &CudaSlice<f32>, n_tokens: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        self.rt.matmul(w, x, n_tokens, out, self.matmul_kernel.get())
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, b: &CudaSlice<f32>, width: usize, n_tokens: usize) -> Result<()> {
        self.rt.add_bias(x, b, width, n_tokens)
    }

    fn rope(&self, x: &mut CudaSlice<f32>, n_tokens: usize, pos0: usize, p: &RopeParams) -> Result<()> {
        let shape = RopeShape::of(p);
        match p.freq_factors {
            None => self.rt.rope(x, n_tokens, pos0, &shape, None),
            Some(f) => {
                let mut cache = self.rope_factors.borrow_mut();
                if cache.as_ref().is_none_or(|(host, _)| host.as_slice() != f) {
                    *cache = Some((f.to_vec(), self.rt.upload(f)?));
                }
                let dev = cache.as_ref().map(|(_, d)| d);
                self.rt.rope(x, n_tokens, pos0, &shape, dev)
            }
        }
    }

    fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>, n: usize) -> Result<()> {
        self.rt.silu_mul(gate, up, n)
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        self.rt.add(x, y, n)
    }

    fn kv_layer(&self, spec: &StrategySpec, n_kv_heads: usize, head_dim: usize, capacity: usize, layer: usize) -> Result<CudaKv> {
        let codec = make_device_codec(&self.rt, spec, n_kv_heads, head_dim, capacity, layer_seed(spec, layer))?;
        let policy = make_policy(&spec.policy, &spec.policy_params, n_kv_heads)?;
        let mass = if policy.wants_mass() { Some(self.rt.zeros::<f32>(n_kv_heads * capacity.max(1))?) } else { None };
        self.sample_memory();
        Ok(CudaKv {
            codec,
            policy,
            n_kv_heads,
            head_dim,
            capacity,
            mass,
            mass_stride: 0,
            host_mass: Vec::new(),
            n_seen: 0,
            spec: spec.clone(),
            layer,
        })
    }

    fn kv_append(&self, l: &mut CudaKv, k: &CudaSlice<f32>, v: &CudaSlice<f32>, n_tokens: usize) -> Result<()> {
        let n = n_tokens * l.n_kv_heads * l.head_dim;
        Cuda::check_kv(l, "kv_append", k.len().min(v.len()), n)?;
        if l.n_seen + n_tokens > l.capacity {
            bail!("context full: {} tokens seen and {} more exceed the context of {} (raise --ctx)", l.n_seen, n_tokens, l.capacity);
        }
        l.codec.append(&self.rt, k, v, n_tokens)?;
        if let Some(m) = &mut l.mass {
            l.mass_stride = (0..l.n_kv_heads).map(|g| l.codec.len(g)).max().unwrap_or(0).max(1);
            let used = l.n_kv_heads * l.mass_stride;
            self.rt
                .stream()
                .memset_zeros(&mut m.slice_mut(..used))
                .map_err(|e| anyhow!("clearing the attention mass of layer {}: {e}", l.layer))?;
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        l: &mut CudaKv,
        n_tokens: usize,
        n_heads: usize,
        head_dim: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = n_tokens * n_heads * head_dim;
        Cuda::check_kv(l, "attention", q.len().min(out.len()), n)?;
        if head_dim != l.head_dim || n_heads % l.n_kv_heads != 0 {
            bail!("attention: {n_heads} heads of {head_dim} against {} KV heads of {}", l.n_kv_heads, l.head_dim);
        }
        let stride = l.mass_stride;
        let mass = l.mass.as_mut().map(|m| (m, stride));
        l.codec.attention(&self.rt, q, n_tokens, n_heads, out, mass)
    }

    fn kv_finish_step(&self, l: &mut CudaKv, n_new: usize, pos0: usize, prompt_len: usize) -> Result<()> {
        let mass = match &l.mass {
            Some(m) => {
                let used = l.n_kv_heads * l.mass_stride;
                l.host_mass.resize(used, 0.0);
                self.rt
                    .stream()
                    .memcpy_dtoh(&m.slice(..used), &mut l.host_mass[..])
                    .map_err(|e| anyhow!("copying the attention mass of layer {} back: {e}", l.layer))?;
                self.rt.synchronize()?;
                let per_head: Vec<Vec<f32>> = (0..l.n_kv_heads)
                    .map(|g| l.host_mass[g * l.mass_stride..g * l.mass_stride + l.codec.len(g)].to_vec())
                    .collect();
                Some(per_head)
            }
            None => None,
        };
        l.policy
            .observe(n_new, pos0, mass.as_deref(), prompt_len)
            .with_context(|| format!("policy of layer {}", l.layer))?;
        for (g, idx) in l.policy.evictions().into_iter().enumerate() {
            if !idx.is_empty() {
                l.codec.evict(&self.rt, g, &idx)?;
            }
        }
        l.n_seen = pos0 + n_new;
        l.codec.compress_due(&self.rt, pos0 < prompt_len || n_new > 1)
    }

    fn kv_bytes(&self, l: &CudaKv) -> KvBytes {
        let mut b = l.codec.bytes();
        b.policy += l.policy.bytes();
        b
    }

    fn kv_len(&self, l: &CudaKv) -> usize {
        l.n_seen
    }

    fn kv_truncate(&self, l: &mut CudaKv, n_tokens: usize) -> Result<()> {
        if n_tokens >= l.n_seen {
            return Ok(());
        }
        if n_tokens > 0 {
            bail!("a device cache can only be emptied, not cut at position {n_tokens}");
        }
        let fresh = self.kv_layer(&l.spec.clone(), l.n_kv_heads, l.head_dim, l.capacity, l.layer)?;
        *l = fresh;
        Ok(())
    }

    fn check_memory(&self, plan: &MemoryPlan) -> Result<()> {
        let (free, total) = self.rt.memory()?;
        let need = plan.total();
        if need > free as u64 {
            const GIB: f64 = (1u64 << 30) as f64;
            bail!(
                "this run needs {:.2} GiB of device memory (weights {:.2}, KV cache {:.2}, scratch {:.2}) but {} has {:.2} GiB free of {:.2}: \
                 lower --ctx or --batch, or pick a smaller strategy",
                need as f64 / GIB,
                plan.weight_bytes as f64 / GIB,
                plan.kv_reserved_bytes as f64 / GIB,
                plan.scratch_bytes as f64 / GIB,
                self.name,
                free as f64 / GIB,
                total as f64 / GIB
            );
        }
        Ok(())
    }

    fn device_memory_peak(&self) -> Option<usize> {
        self.sample_memory();
        Some(self.used_peak.get().saturating_sub(self.used_at_start))
    }

    fn copy_bandwidth_gb_s(&self) -> Result<Option<f64>> {
        super::selftest::copy_bandwidth_gb_s(&self.rt, 256 << 20, 10).map(Some)
    }
}

impl CudaKv {
    /// The device codec (tests and diagnostics).
    pub fn codec(&self) -> &dyn DeviceCodec {
        self.codec.as_ref()
    }
}
