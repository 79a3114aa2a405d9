//! The thread pool of the fast CPU backend's hot loops (matmul rows, attention heads).
//!
//! A decode step of a small model runs hundreds of parallel loops of a few microseconds each.
//! Handing each one to rayon's pool from the caller's thread costs a sleep and a wake-up on both
//! sides (futex and `sched_yield` were a third of decode time in `perf`). Here the calling thread
//! takes part in the work, and `threads - 1` workers that live for the whole run wait by spinning
//! on a generation counter, so a loop starts and ends without a system call. A worker that has
//! seen no work for [`SPIN`] parks on a condition variable and is woken by the next loop.
//!
//! Tasks are handed out one index at a time through an atomic counter. A loop started while
//! another is running (from inside a task, or from a second thread) runs on its caller alone.
//! The thread count is rayon's global pool's, read when the pool is first used, so `--threads`
//! (which builds rayon's pool before any model runs) sets both.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per loop; a worker runs a loop when it sees a generation it has not run.
    generation: AtomicUsize,
    /// `*const Task` of the running loop, valid until every worker has counted itself `done`.
    task: AtomicPtr<()>,
    n_tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: &'static Shared,
    n_workers: usize,
    busy: AtomicBool,
}

static POOL: OnceLock<Pool> = OnceLock::new();

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            task: AtomicPtr::new(std::ptr::null_mut()),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut n_workers = 0;
        for i in 1..rayon::current_num_threads() {
            let spawned = std::thread::Builder::new().name(format!("kvgear-cpu-{i}")).spawn(move || worker(shared));
            if spawned.is_ok() {
                n_workers += 1;
            }
        }
        Pool { shared, n_workers, busy: AtomicBool::new(false) }
    })
}

/// Threads that run a loop: the caller and the workers.
pub fn n_threads() -> usize {
    pool().n_workers + 1
}

/// Runs `f(i)` for every `i` in `0..n_tasks`, in any order and on any of the pool's threads,
/// and returns when all have run. A panic in a task is raised again here once every thread has
/// left the loop.
pub fn for_each<F: Fn(usize) + Sync>(n_tasks: usize, f: F) {
    if n_tasks == 0 {
        return;
    }
    let p = pool();
    if n_tasks == 1 || p.n_workers == 0 || p.busy.swap(true, Ordering::Acquire) {
        (0..n_tasks).for_each(f);
        return;
    }
    let s = p.shared;
    let task: Task = &f;
    s.task.store(&task as *const Task as *mut (), Ordering::Relaxed);
    s.n_tasks.store(n_tasks, Ordering::Relaxed);
    s.next.store(0, Ordering::Relaxed);
    s.done.store(0, Ordering::Relaxed);
    s.panicked.store(false, Ordering::Relaxed);
    s.generation.fetch_add(1, Ordering::SeqCst);
    if s.sleepers.load(Ordering::SeqCst) > 0 {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    run_tasks(s);
    let mut spins = 0u32;
    while s.done.load(Ordering::Acquire) < p.n_workers {
        spins = spins.saturating_add(1);
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    let panicked = s.panicked.load(Ordering::Relaxed);
    p.busy.store(false, Ordering::Release);
    if panicked {
        panic!("a task of the CPU thread pool panicked");
    }
}

/// A pointer to the elements of a slice, shared by tasks that each take distinct elements.
struct SlicePtr<T>(*mut T);
unsafe impl<T: Send> Sync for SlicePtr<T> {}

/// Runs `f(i, &mut items[i * chunk..][..chunk])` for every chunk of `items` (the last may be
/// shorter), as [`for_each`] does.
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(items: &mut [T], chunk: usize, f: F) {
    let chunk = chunk.max(1);
    let len = items.len();
    let base = SlicePtr(items.as_mut_ptr());
    for_each(len.div_ceil(chunk), |i| {
        let base = &base;
        let start = i * chunk;
        // SAFETY: chunk `i` covers `start..min(start + chunk, len)`, inside `items`, and no other
        // task touches it; `items` is borrowed mutably for the whole loop.
        let part = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), chunk.min(len - start)) };
        f(i, part)
    });
}

/// Runs `f(i, &mut items[i])` for every element of `items`, as [`for_each`] does.
pub fn for_each_mut<T: Send, F: Fn(usize, &mut T) + Sync>(items: &mut [T], f: F) {
    for_each_chunk_mut(items, 1, |i, one| f(i, &mut one[0]));
}

fn run_tasks(s: &Shared) {
    // SAFETY: the pointer was stored before the generation was bumped (this thread saw the bump
    // with Acquire, or is the thread that stored it) and stays valid until this thread counts
    // itself done, which the caller of `for_each` waits for.
    let task: Task = unsafe { *(s.task.load(Ordering::Relaxed) as *const Task) };
    let n = s.n_tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        if catch_unwind(AssertUnwindSafe(|| task(i))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// A worker's life: it is spawned before the first loop, at generation 0, and runs every
/// generation after that.
fn worker(s: &'static Shared) {
    let mut seen = 0;
    loop {
        seen = wait_for_work(s, seen);
        run_tasks(s);
        s.done.fetch_add(1, Ordering::Release);
    }
}

/// Waits for a generation other than `seen` and returns it: spinning for [`SPIN`], then parked.
fn wait_for_work(s: &Shared, seen: usize) -> usize {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let g = s.generation.load(Ordering::Acquire);
        if g != seen {
            return g;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
            let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            loop {
                let g = s.generation.load(Ordering::SeqCst);
                if g != seen {
                    s.sleepers.fetch_sub(1, Ordering::SeqCst);
                    return g;
                }
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        for n in [0usize, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        for (len, chunk) in [(0usize, 3usize), (10, 3), (12, 4), (5, 9)] {
            let mut v = vec![0usize; len];
            for_each_chunk_mut(&mut v, chunk, |i, part| {
                for (j, x) in part.iter_mut().enumerate() {
                    *x += i * chunk + j + 1;
                }
            });
            assert_eq!(v, (1..=len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn nested_and_concurrent_loops_run_every_task() {
        let total = AtomicU64::new(0);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        for_each(8, |i| {
                            for_each(4, |j| {
                                total.fetch_add((i * 4 + j) as u64, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * (0..32u64).sum::<u64>());
    }

    #[test]
    fn a_parked_worker_wakes_for_the_next_loop() {
        let sum = AtomicU64::new(0);
        for_each(64, |i| {
            sum.fetch_add(i as u64, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 3);
        for_each(64, |i| {
            sum.fetch_add(i as u64, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 2 * (0..64u64).sum::<u64>());
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_still_works() {
        let r = catch_unwind(|| for_each(16, |i| assert_ne!(i, 7, "task seven")));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        for_each(16, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }
}
