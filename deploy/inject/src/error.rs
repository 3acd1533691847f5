//! Why an injection was refused.

/// Why a pod, a manifest or an admission request could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A `fleet-ipc.io/*` annotation has a value the sidecar would refuse.
    #[error("annotation {key}: {value:?}: {reason}")]
    InvalidAnnotation {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The object is not shaped like a pod (template) where the injection needs it.
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    /// A document of a manifest is not valid YAML.
    #[error("YAML document {index}: {source}")]
    Yaml {
        /// 1-based position of the document in the stream.
        index: usize,
        source: serde_yaml::Error,
    },
}

impl InjectError {
    pub(crate) fn malformed(what: impl Into<String>, reason: impl Into<String>) -> Self {
        InjectError::Malformed {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
