//! The node's error types: start-up failures, and refusals reported to clients.

use std::path::PathBuf;

use hearth_client_api::ErrorCode;

use crate::store::StoreError;

/// Why the node could not start or an admin command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A setting is missing, malformed or out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// Another running node holds the data folder.
    #[error("the data folder {0} is in use by a running node; stop it first")]
    DataDirLocked(PathBuf),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An admin command was refused.
    #[error("{0}")]
    Refused(#[from] ApiError),
    /// Binding or serving a socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A request refused (the client's mistake) or failed (ours), as the client sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human explanation; never carries internals.
    pub message: String,
}

impl ApiError {
    /// A refusal with the given code and explanation.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        // Logged here, once, as the server's fault; the client only learns that it failed.
        tracing::error!(error = %err, "store operation failed");
        ApiError::new(ErrorCode::Internal, "the server failed; try again")
    }
}

/// Shorthand for service results.
pub type ApiResult<T> = Result<T, ApiError>;
