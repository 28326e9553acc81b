//! Core errors as `pathflow.exceptions` (see `pathflow_core::error`).

use pathflow_core::CoreError;
use pyo3::prelude::*;

pyo3::import_exception!(pathflow.exceptions, InvalidArgumentError);
pyo3::import_exception!(pathflow.exceptions, CorruptSlideError);

pub(crate) fn to_py(e: CoreError) -> PyErr {
    match e {
        CoreError::InvalidArgument(m) | CoreError::Shape(m) => InvalidArgumentError::new_err(m),
        CoreError::Io(io) => io.into(),
        CoreError::Corrupt(m) => CorruptSlideError::new_err(m),
    }
}

/// The message of a per-sample failure (without the error kind's prefix).
pub(crate) fn reason(e: CoreError) -> String {
    match e {
        CoreError::Corrupt(m) => m,
        e => e.to_string(),
    }
}
