use calico_model::{Kind, ValidationErrors};

/// Errors at the datastore's boundary. Each names the resource it concerns.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("{kind} {name} does not exist")]
    NotFound { kind: Kind, name: String },
    #[error("{kind} {name} already exists")]
    AlreadyExists { kind: Kind, name: String },
    #[error("{kind} {name} was changed by someone else (resourceVersion {expected} is stale; now {actual})")]
    Conflict {
        kind: Kind,
        name: String,
        expected: String,
        actual: String,
    },
    #[error("{kind} {name} is invalid: {errors}")]
    Invalid {
        kind: Kind,
        name: String,
        errors: ValidationErrors,
    },
    #[error("{kind} {name}: {message}")]
    BadRequest {
        kind: Kind,
        name: String,
        message: String,
    },
    #[error("etcd at {endpoints} is unavailable: {source}")]
    Unavailable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} refused the credentials: {message}")]
    Unauthorized { endpoints: String, message: String },
    #[error("etcd configuration: {0}")]
    Config(String),
    #[error("stored value at {key} cannot be read: {message}")]
    Corrupt { key: String, message: String },
    /// A delete that succeeded, of a value that could not be read: the key is gone, there is
    /// just no object to return.
    #[error("deleted {key}, whose stored value could not be read: {message}")]
    DeletedUnreadable { key: String, message: String },
    /// etcd's answer was larger than this client accepts (`EtcdConfig::max_message_bytes`):
    /// not an outage, and retrying will not help.
    #[error("etcd's answer for {key} is larger than this client's {limit}-byte message limit")]
    TooLarge { key: String, limit: usize },
}

impl DatastoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, DatastoreError::Unavailable { .. })
    }
}
