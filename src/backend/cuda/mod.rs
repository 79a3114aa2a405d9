//! CUDA runtime: loads the embedded fatbin and launches kernels.
//!
//! build.rs compiles every `cuda/*.cu` into one fatbin (SASS for sm_80, sm_86, sm_89, sm_90 and
//! compute_80 PTX) that this module embeds. A binary built without nvcc embeds nothing:
//! [`kernels_embedded`] says which, and [`CudaRuntime::new`] then fails with
//! [`Unavailable::NoKernels`].
//!
//! The driver library is loaded at run time (cudarc's `dynamic-loading`), so the same binary
//! starts on machines without one; [`CudaRuntime::new`] checks for it before any driver call.
//!
//! Kernels are launched on the context's default stream. Launch wrappers (in `layers`) validate
//! shapes, return errors that name the kernel, and do not synchronise: an error raised while a
//! kernel runs surfaces at the next synchronising call ([`CudaRuntime::synchronize`] or a
//! download).

mod attention;
pub mod backend;
pub mod ffi;
pub mod kv;
pub mod kv_fp16;
pub mod kvcodec;
mod layers;
pub mod quant;
pub mod selftest;
pub mod selftest_agree;
mod selftest_model;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    DriverError,
};
use cudarc::nvrtc::Ptx;

pub use attention::AttnShape;
pub use backend::{make_device_codec, Cuda};
pub use layers::RopeShape;
pub use quant::DeviceWeight;

/// The fatbin build.rs produced; empty when nvcc was not found at build time.
static KERNELS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// ptxas' per-kernel report (registers, shared memory, stack, spills) from the build.
pub const RESOURCE_USAGE: &str = include_str!(concat!(env!("OUT_DIR"), "/resource-usage.txt"));

/// Whether the CUDA kernels were compiled into this binary.
pub fn kernels_embedded() -> bool {
    !KERNELS.is_empty()
}

/// The embedded fatbin (empty when built without nvcc).
pub fn fatbin() -> &'static [u8] {
    KERNELS
}

/// The release line of the nvcc that compiled the kernels, if any.
pub fn nvcc_version() -> Option<&'static str> {
    Some(env!("KVGEAR_NVCC_VERSION")).filter(|v| !v.is_empty())
}

/// Why no CUDA runtime could be created.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("no CUDA driver found (libcuda could not be loaded)")]
    NoDriver,
    #[error(
        "no CUDA device: the driver reports {count} device(s), ordinal {ordinal} was asked for"
    )]
    NoDevice { count: usize, ordinal: usize },
    #[error(
        "built without CUDA kernels: nvcc was not found when kvgear was built \
         (set NVCC or CUDA_HOME and rebuild, or build with --features cuda to require it)"
    )]
    NoKernels,
}

/// What the driver says about the device and itself.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for H100.
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// The CUDA version the driver supports, e.g. "13.0".
    pub driver_version: String,
    pub total_bytes: usize,
    pub free_bytes: usize,
}

/// The layer kernels of `cuda/layers.cu`, looked up once when the runtime starts.
struct LayerKernels {
    rmsnorm: CudaFunction,
    rmsnorm_naive: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    add: CudaFunction,
    argmax: CudaFunction,
}

/// The kernels added for the whole forward pass: `layers.cu` (bias, row gather / scatter),
/// `quant.cu` and `attention.cu`.
struct ModelKernels {
    add_bias: CudaFunction,
    gather_rows: CudaFunction,
    scatter_rows: CudaFunction,
    /// Per GGML type id: (GEMV for 1 token, GEMV for up to KV_GEMV_MAX_TOKENS, f16 tensor-core
    /// GEMM, integer tensor-core GEMM for the types of `quant::gemm_is_integer`).
    matmul: HashMap<u32, (CudaFunction, CudaFunction, CudaFunction, Option<CudaFunction>)>,
    gemv_naive: CudaFunction,
    quantize_q8: CudaFunction,
    embed: CudaFunction,
    /// Per head_dim: (decode, decode with mass, prefill, prefill with mass).
    attention: HashMap<usize, [CudaFunction; 4]>,
    attn_combine: CudaFunction,
    attn_mass: CudaFunction,
    attn_naive: CudaFunction,
    cache_append: CudaFunction,
}

/// Device scratch shared by every layer (attention partials and scores, eviction rows): one
/// growable buffer per element type, used by one launch sequence at a time.
#[derive(Default)]
struct ScratchPool {
    f32: Option<CudaSlice<f32>>,
    u32: Option<CudaSlice<u32>>,
    /// x quantized for the integer GEMM (quant.rs `q8_scratch_words`).
    q8: Option<CudaSlice<u32>>,
}

/// One CUDA device with the embedded kernels loaded.
pub struct CudaRuntime {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    layers: LayerKernels,
    model: ModelKernels,
    multiprocessors: usize,
    /// Dynamic shared memory one block of the integer GEMV may use (the device's opt-in limit).
    gemv_smem_max_bytes: usize,
    /// Blocks of an integer GEMV kernel the whole device holds at once, by (type id, wide
    /// variant, dynamic shared memory): the occupancy API's figure times the multiprocessors.
    gemv_resident: Mutex<HashMap<(u32, bool, usize), usize>>,
    scratch: Mutex<ScratchPool>,
}

impl CudaRuntime {
    /// Opens device `ordinal` and loads the embedded kernels. Fails with [`Unavailable`] when
    /// there is no driver, no such device, or no kernels in this binary.
    pub fn new(ordinal: usize) -> Result<CudaRuntime> {
        // SAFETY: only tries to dlopen libcuda; cudarc panics on driver calls without it.
        if !unsafe { sys::is_culib_present() } {
            return Err(Unavailable::NoDriver.into());
        }
        let count = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
            Err(e) => return Err(anyhow!("initialising the CUDA driver: {e}")),
        };
        if ordinal >= count {
            return Err(Unavailable::NoDevice { count, ordinal }.into());
        }
        if !kernels_embedded() {
            return Err(Unavailable::NoKernels.into());
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("creating a context on CUDA device {ordinal}: {e}"))?;
        let stream = ctx.default_stream();
        let module = ctx.load_module(Ptx::from_binary(KERNELS.to_vec())).map_err(|e| {
            let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
            anyhow!(
                "loading the embedded kernels (SASS sm_80/86/89/90, PTX compute_80, built by {}) on a \
                 compute capability {major}.{minor} device: {e}",
                nvcc_version().unwrap_or("an unknown nvcc")
            )
        })?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| anyhow!("kernel {name} is not in the embedded fatbin: {e}"))
        };
        let layers = LayerKernels {
            rmsnorm: load("kv_rmsnorm_f32")?,
            rmsnorm_naive: load("kv_rmsnorm_naive_f32")?,
            rope: load("kv_rope_f32")?,
            silu_mul: load("kv_silu_mul_f32")?,
            add: load("kv_add_f32")?,
            argmax: load("kv_argmax_f32")?,
        };
        // The integer GEMV keeps the quantized activation in dynamic shared memory: allow it the
        // device's opt-in maximum per block (quant.rs splits the tokens of a launch to fit it).
        let gemv_smem_max_bytes = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| anyhow!("querying the shared memory per block: {e}"))?
            .max(0);
        let mut matmul = HashMap::new();
        for (name, ty) in quant::KERNEL_TYPES {
            let f = (
                load(&format!("kv_gemv_{name}_t1"))?,
                load(&format!("kv_gemv_{name}_t4"))?,
                load(&format!("kv_gemm_{name}"))?,
                if quant::gemm_is_integer(ty) { Some(load(&format!("kv_gemm_q8_{name}"))?) } else { None },
            );
            if quant::gemv_is_integer(ty) {
                for g in [&f.0, &f.1] {
                    g.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, gemv_smem_max_bytes)
                        .map_err(|e| anyhow!("allowing kv_gemv_{name} {gemv_smem_max_bytes} bytes of shared memory: {e}"))?;
                }
            }
            matmul.insert(ty.id(), f);
        }
        let mut attention = HashMap::new();
        for d in attention::HEAD_DIMS {
            attention.insert(
                d,
                [
                    load(&format!("kv_attn_decode_d{d}"))?,
                    load(&format!("kv_attn_decode_d{d}_mass"))?,
                    load(&format!("kv_attn_prefill_d{d}"))?,
                    load(&format!("kv_attn_prefill_d{d}_mass"))?,
                ],
            );
        }
        let model = ModelKernels {
            add_bias: load("kv_add_bias_f32")?,
            gather_rows: load("kv_gather_rows_u32")?,
            scatter_rows: load("kv_scatter_rows_u32")?,
            matmul,
            gemv_naive: load("kv_gemv_naive")?,
            quantize_q8: load("kv_quantize_q8")?,
            embed: load("kv_embed")?,
            attention,
            attn_combine: load("kv_attn_combine")?,
            attn_mass: load("kv_attn_mass")?,
            attn_naive: load("kv_attn_naive")?,
            cache_append: load("kv_cache_append")?,
        };
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("querying the multiprocessor count: {e}"))?
            .max(1) as usize;
        Ok(CudaRuntime {
            ctx,
            stream,
            _module: module,
            layers,
            model,
            multiprocessors,
            gemv_smem_max_bytes: gemv_smem_max_bytes as usize,
            gemv_resident: Mutex::new(HashMap::new()),
            scratch: Mutex::new(ScratchPool::default()),
        })
    }

    /// Blocks of `f` (`threads` per block, `smem` bytes of dynamic shared memory) resident on the
    /// whole device at once, at least 1; asked of the driver once per `key`.
    pub(crate) fn resident_blocks(&self, key: (u32, bool, usize), f: &CudaFunction, threads: u32, smem: usize) -> Result<usize> {
        let mut cache = self.gemv_resident.lock().map_err(|_| anyhow!("the occupancy cache lock is poisoned"))?;
        if let Some(&n) = cache.get(&key) {
            return Ok(n);
        }
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem, None)
            .map_err(|e| anyhow!("querying the occupancy of a GEMV kernel: {e}"))? as usize;
        let n = per_sm.max(1) * self.multiprocessors;
        cache.insert(key, n);
        Ok(n)
    }

    /// Runs `f` with the scratch buffer `pick` selects from the pool, grown to at least `len`
    /// elements (the pool's lock held meanwhile).
    fn with_scratch<T, R>(
        &self,
        len: usize,
        pick: impl FnOnce(&mut ScratchPool) -> &mut Option<CudaSlice<T>>,
        f: impl FnOnce(&mut CudaSlice<T>) -> Result<R>,
    ) -> Result<R>
    where
        T: DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let mut pool = self.scratch.lock().map_err(|_| anyhow!("the device scratch lock is poisoned"))?;
        let slot = pick(&mut pool);
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            *slot = None;
            *slot = Some(self.zeros::<T>(len.max(1))?);
        }
        f(slot.as_mut().expect("allocated above"))
    }

    /// Runs `f` with the shared f32 scratch grown to at least `len` elements.
    pub(crate) fn with_scratch_f32<R>(&self, len: usize, f: impl FnOnce(&mut CudaSlice<f32>) -> Result<R>) -> Result<R> {
        self.with_scratch(len, |p| &mut p.f32, f)
    }

    /// Runs `f` with the shared u32 scratch grown to at least `len` elements.
    pub(crate) fn with_scratch_u32<R>(&self, len: usize, f: impl FnOnce(&mut CudaSlice<u32>) -> Result<R>) -> Result<R> {
        self.with_scratch(len, |p| &mut p.u32, f)
    }

    /// Runs `f` with the scratch of quantized activations grown to at least `len` words.
    pub(crate) fn with_scratch_q8<R>(&self, len: usize, f: impl FnOnce(&mut CudaSlice<u32>) -> Result<R>) -> Result<R> {
        self.with_scratch(len, |p| &mut p.q8, f)
    }

    /// Bytes the shared scratch holds now.
    pub fn scratch_bytes(&self) -> usize {
        self.scratch
            .lock()
            .map(|p| [&p.u32, &p.q8].iter().map(|b| b.as_ref().map_or(0, |b| b.num_bytes())).sum::<usize>() + p.f32.as_ref().map_or(0, |b| b.num_bytes()))
            .unwrap_or(0)
    }

    /// Streaming multiprocessors of the device.
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// A kernel of the embedded fatbin by name (for launch wrappers outside this module).
    pub(crate) fn function(&self, name: &str) -> Result<CudaFunction> {
        self._module
            .load_function(name)
            .map_err(|e| anyhow!("kernel {name} is not in the embedded fatbin: {e}"))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every wrapper launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn device_name(&self) -> Result<String> {
        self.ctx
            .name()
            .map_err(|e| anyhow!("querying the device name: {e}"))
    }

    /// The CUDA version the driver supports, as "major.minor" (e.g. "13.0").
    pub fn driver_version(&self) -> Result<String> {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: writes one int; the driver library is loaded (checked in `new`).
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| anyhow!("querying the driver version: {e}"))?;
        Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| anyhow!("querying device memory: {e}"))
    }

    pub fn info(&self) -> Result<DeviceInfo> {
        let (free_bytes, total_bytes) = self.memory()?;
        Ok(DeviceInfo {
            ordinal: self.ctx.ordinal(),
            name: self.device_name()?,
            compute_capability: self
                .ctx
                .compute_capability()
                .map_err(|e| anyhow!("querying compute capability: {e}"))?,
            multiprocessors: self
                .ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| anyhow!("querying the multiprocessor count: {e}"))?,
            driver_version: self.driver_version()?,
            total_bytes,
            free_bytes,
        })
    }

    /// Waits for all launched work; reports any error a kernel raised while running.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA stream synchronize (a kernel failed while running?): {e}"))
    }

    /// Copies `data` into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(data).map_err(|e| {
            anyhow!(
                "copying {} bytes to the device: {e}",
                std::mem::size_of_val(data)
            )
        })
    }

    /// Copies a device buffer (or view) back; waits for the work that writes it.
    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, src: &S) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(src)
            .map_err(|e| anyhow!("copying {} bytes from the device: {e}", src.num_bytes()))
    }

    /// A device buffer of `len` zeroed elements.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).with_context(|| {
            format!(
                "allocating {} bytes on the device",
                len * std::mem::size_of::<T>()
            )
        })
    }
}
