//! Fork-safe thread pool: a pool built in a parent process has no threads in a forked child
//! (DataLoader workers, multiprocessing), so the pool is keyed by process id and rebuilt.
//! Sized by `PATHFLOW_NUM_THREADS` (default: the cores) or `set_num_threads`.

use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use crate::errors::InvalidArgumentError;

static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
static THREADS: Mutex<Option<usize>> = Mutex::new(None);

pub(crate) fn default_threads() -> usize {
    if let Some(n) = *THREADS.lock().unwrap_or_else(|p| p.into_inner()) {
        return n;
    }
    std::env::var("PATHFLOW_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub(crate) fn pool() -> Arc<rayon::ThreadPool> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, p)) = guard.as_ref() {
        if *owner == pid {
            return Arc::clone(p);
        }
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(default_threads())
            .thread_name(|i| format!("pathflow-{i}"))
            .build()
            .expect("cannot start the pathflow thread pool"),
    );
    *guard = Some((pid, Arc::clone(&p)));
    p
}

/// Runs `f` without the GIL on pathflow's pool.
pub(crate) fn run<R: Send>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> R {
    let p = pool();
    py.detach(|| p.install(f))
}

/// Number of threads pathflow's Rust pool uses (env `PATHFLOW_NUM_THREADS`, default: cores).
#[pyfunction]
pub(crate) fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Sets the size of pathflow's Rust pool (takes effect immediately).
#[pyfunction]
pub(crate) fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(InvalidArgumentError::new_err(
            "number of threads must be >= 1",
        ));
    }
    *THREADS.lock().unwrap_or_else(|p| p.into_inner()) = Some(n);
    *POOL.lock().unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}
