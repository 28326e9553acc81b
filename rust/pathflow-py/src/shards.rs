//! WebDataset shard writer and keys (see `pathflow_core::shards`).

use pathflow_core::{shards, CoreError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{to_py, InvalidArgumentError};

/// WebDataset shard writer (see `pathflow_core::shards`).
#[pyclass(module = "pathflow._core", name = "ShardWriter", unsendable)]
pub(crate) struct PyShardWriter {
    inner: Option<shards::ShardWriter>,
}

pub(crate) fn shard_info_dict<'py>(
    py: Python<'py>,
    s: &shards::ShardInfo,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", s.index)?;
    d.set_item("name", &s.name)?;
    d.set_item("count", s.count)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("first_sample", s.first_sample)?;
    Ok(d)
}

#[pymethods]
impl PyShardWriter {
    #[new]
    #[pyo3(signature = (dir, prefix, max_count, max_bytes, start_index=0, start_sample=0))]
    fn new(
        dir: std::path::PathBuf,
        prefix: String,
        max_count: usize,
        max_bytes: u64,
        start_index: usize,
        start_sample: u64,
    ) -> PyResult<Self> {
        let cfg = shards::ShardConfig {
            dir,
            prefix,
            max_count,
            max_bytes,
            start_index,
            start_sample,
        };
        Ok(Self {
            inner: Some(shards::ShardWriter::new(cfg).map_err(to_py)?),
        })
    }

    /// Appends samples: `keys[i]` with files `files[i]` = list of `(ext, bytes)`.
    fn add_many(
        &mut self,
        py: Python<'_>,
        keys: Vec<String>,
        files: Vec<Vec<(String, Vec<u8>)>>,
    ) -> PyResult<()> {
        if keys.len() != files.len() {
            return Err(InvalidArgumentError::new_err(
                "keys and files differ in length",
            ));
        }
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| InvalidArgumentError::new_err("shard writer is closed"))?;
        py.detach(|| {
            for (k, fs) in keys.iter().zip(&files) {
                let refs: Vec<(&str, &[u8])> =
                    fs.iter().map(|(e, d)| (e.as_str(), d.as_slice())).collect();
                w.add(k, &refs)?;
            }
            Ok::<(), CoreError>(())
        })
        .map_err(to_py)
    }

    /// Global index of the next sample.
    #[getter]
    fn next_sample(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.next_sample())
    }

    /// Shards finished so far, as dicts.
    fn finished<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let w = self.inner.as_ref();
        w.map_or(Ok(Vec::new()), |w| {
            w.finished()
                .iter()
                .map(|s| shard_info_dict(py, s))
                .collect()
        })
    }

    /// Publishes the open shard; returns every shard this writer finished.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| InvalidArgumentError::new_err("shard writer is closed"))?;
        let done = py.detach(|| w.finish()).map_err(to_py)?;
        done.iter().map(|s| shard_info_dict(py, s)).collect()
    }

    /// Drops the open shard without publishing it.
    fn abort(&mut self) {
        if let Some(w) = self.inner.take() {
            w.abort();
        }
    }
}

/// A dot-free WebDataset key for an identifier (hash-suffixed when changed or too long).
#[pyfunction]
#[pyo3(signature = (id, max_len=60))]
pub(crate) fn sanitize_key(id: &str, max_len: usize) -> String {
    shards::sanitize_key(id, max_len)
}
