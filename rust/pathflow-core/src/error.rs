//! Error type of the core crate.

use thiserror::Error;

/// Everything that can go wrong inside `pathflow-core`.
///
/// The Python binding maps each variant onto `pathflow.exceptions`.
#[derive(Debug, Error)]
pub enum CoreError {
    /// A parameter is out of range or inconsistent with another one.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An image buffer does not have the shape that was announced.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Slide data (a JPEG stream, a tile table) is malformed or truncated.
    #[error("corrupt slide data: {0}")]
    Corrupt(String),
}

/// Result alias of the core crate.
pub type Result<T> = std::result::Result<T, CoreError>;

pub(crate) fn invalid(msg: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(msg.into())
}
