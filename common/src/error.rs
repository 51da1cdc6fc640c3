//! Configuration errors. Each names the key (as written in the job file), the value and what is
//! allowed, so that a user can fix the file without reading our code.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The text is not TOML, or a value has the wrong type, or a key is unknown.
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// A required table or key is absent.
    #[error("{origin}: missing {what}")]
    Missing { origin: String, what: String },
    /// A key holds a value outside what is allowed.
    #[error("{key} = {value}: {allowed}")]
    Invalid {
        key: String,
        value: String,
        allowed: String,
    },
}

impl ConfigError {
    pub fn invalid(key: &str, value: impl std::fmt::Display, allowed: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
