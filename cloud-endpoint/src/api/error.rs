//! API errors in vAPI's standard kinds. An [`ApiError`] says nothing about the wire: REST
//! renders it as an HTTP status plus `{"error_type","messages"}` (here), the vAPI JSON-RPC
//! protocol will render the same kind as `com.vmware.vapi.std.errors.*` inside a 200.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use gateway::qemu::QemuError;

use crate::hosts::HostError;
use crate::inventory::InventoryError;
use crate::logins::LoginError;

/// The vAPI standard error kinds this API produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A bad argument: an unknown enum value in a filter, a malformed id.
    InvalidArgument,
    /// No session, an expired or unknown one, or bad credentials.
    Unauthenticated,
    /// A session whose role may not do this.
    Unauthorized,
    /// No such object, or no such path under /api.
    NotFound,
    /// No such operation on a path (e.g. PUT on a list).
    OperationNotFound,
    /// More results than a list may return; a VM the host has no memory left for.
    UnableToAllocateResource,
    /// The object is already in the state asked for (power on a powered-on VM).
    AlreadyInDesiredState,
    /// The operation needs another state first (reset a powered-off VM).
    NotAllowedInCurrentState,
    /// The request took longer than the server allows.
    TimedOut,
    /// The endpoint is too busy to take this now (too many logins waiting, every session
    /// slot taken); the client tries again later.
    ServiceUnavailable,
    /// Anything else: the database failed, a worker panicked.
    Error,
}

const ALL_KINDS: [ErrorKind; 11] = [
    ErrorKind::InvalidArgument,
    ErrorKind::Unauthenticated,
    ErrorKind::Unauthorized,
    ErrorKind::NotFound,
    ErrorKind::OperationNotFound,
    ErrorKind::UnableToAllocateResource,
    ErrorKind::AlreadyInDesiredState,
    ErrorKind::NotAllowedInCurrentState,
    ErrorKind::TimedOut,
    ErrorKind::ServiceUnavailable,
    ErrorKind::Error,
];

impl ErrorKind {
    /// `error_type` as vAPI spells it.
    pub fn error_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::Unauthenticated => "UNAUTHENTICATED",
            ErrorKind::Unauthorized => "UNAUTHORIZED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::OperationNotFound => "OPERATION_NOT_FOUND",
            ErrorKind::UnableToAllocateResource => "UNABLE_TO_ALLOCATE_RESOURCE",
            ErrorKind::AlreadyInDesiredState => "ALREADY_IN_DESIRED_STATE",
            ErrorKind::NotAllowedInCurrentState => "NOT_ALLOWED_IN_CURRENT_STATE",
            ErrorKind::TimedOut => "TIMED_OUT",
            ErrorKind::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            ErrorKind::Error => "ERROR",
        }
    }

    /// The kind whose `error_type` is `text` (a peer endpoint's answer); ERROR if none.
    pub fn of_error_type(text: &str) -> ErrorKind {
        ALL_KINDS
            .into_iter()
            .find(|k| k.error_type() == text)
            .unwrap_or(ErrorKind::Error)
    }

    /// The message id / error structure name, e.g. `com.vmware.vapi.std.errors.not_found`.
    pub fn message_id(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "com.vmware.vapi.std.errors.invalid_argument",
            ErrorKind::Unauthenticated => "com.vmware.vapi.std.errors.unauthenticated",
            ErrorKind::Unauthorized => "com.vmware.vapi.std.errors.unauthorized",
            ErrorKind::NotFound => "com.vmware.vapi.std.errors.not_found",
            ErrorKind::OperationNotFound => "com.vmware.vapi.std.errors.operation_not_found",
            ErrorKind::UnableToAllocateResource => "com.vmware.vapi.std.errors.unable_to_allocate_resource",
            ErrorKind::AlreadyInDesiredState => "com.vmware.vapi.std.errors.already_in_desired_state",
            ErrorKind::NotAllowedInCurrentState => "com.vmware.vapi.std.errors.not_allowed_in_current_state",
            ErrorKind::TimedOut => "com.vmware.vapi.std.errors.timed_out",
            ErrorKind::ServiceUnavailable => "com.vmware.vapi.std.errors.service_unavailable",
            ErrorKind::Error => "com.vmware.vapi.std.errors.error",
        }
    }

    /// The HTTP status REST answers with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidArgument
            | ErrorKind::UnableToAllocateResource
            | ErrorKind::AlreadyInDesiredState
            | ErrorKind::NotAllowedInCurrentState => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::Unauthorized => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::OperationNotFound => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::TimedOut | ErrorKind::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Error => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error an API operation answers with: a kind and a message for the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", kind.error_type())]
pub struct ApiError {
    pub kind: ErrorKind,
    /// Shown to the client as `default_message`; never carries internals.
    pub message: String,
    /// When the client may try again (REST: a `Retry-After` header, in seconds).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The endpoint is too busy for this now; the client may try again after `after`.
    pub fn busy(message: impl Into<String>, after: std::time::Duration) -> ApiError {
        ApiError {
            retry_after: Some(after),
            ..ApiError::new(ErrorKind::ServiceUnavailable, message)
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InvalidArgument, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Unauthenticated, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }

    /// A failure inside the endpoint. The details go to the log, the client gets `what`.
    pub fn internal(what: &str, detail: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "API: {what}");
        ApiError::new(ErrorKind::Error, format!("{what}; see the cloud endpoint's log"))
    }
}

impl From<InventoryError> for ApiError {
    fn from(e: InventoryError) -> ApiError {
        match e {
            InventoryError::BadCredentials => ApiError::unauthenticated(e.to_string()),
            InventoryError::NotFound { .. } => ApiError::not_found(e.to_string()),
            InventoryError::ServedElsewhere { .. } => ApiError::invalid_argument(e.to_string()),
            // Database paths and SQLite messages stay in the log.
            other => ApiError::internal("the inventory could not answer", &other),
        }
    }
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> ApiError {
        match e {
            LoginError::Inventory(i) => ApiError::from(i),
            // Said as the inventory says it, so that nothing tells the two apart.
            LoginError::BadCredentials { .. } => ApiError::from(InventoryError::BadCredentials),
            busy @ LoginError::Busy { retry_after, .. } => ApiError::busy(busy.to_string(), retry_after),
            LoginError::Internal(detail) => ApiError::internal("the login failed inside the endpoint", &detail),
            refused => ApiError::unauthenticated(refused.to_string()),
        }
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> ApiError {
        let e = match e {
            HostError::Inventory(i) => return ApiError::from(i),
            other => other,
        };
        let kind = match &e {
            HostError::NotFound(_) => ErrorKind::NotFound,
            HostError::AlreadyInState { .. } => ErrorKind::AlreadyInDesiredState,
            HostError::NotRunning { .. } | HostError::RolledBack { .. } | HostError::TestBoot { .. } => {
                ErrorKind::NotAllowedInCurrentState
            }
            HostError::Memory { .. } | HostError::Cpus { .. } => ErrorKind::UnableToAllocateResource,
            // Another endpoint runs the VM's host and cannot be asked now: the client may
            // try again once the operator has acted on the message.
            HostError::NoPeer { .. } | HostError::PeerUnreachable { .. } => ErrorKind::ServiceUnavailable,
            HostError::OtherHost { .. } => ErrorKind::NotAllowedInCurrentState,
            // The peer's answer, as it gave it: the client sees what the VM's host said.
            HostError::Peer {
                error_type, message, ..
            } => return ApiError::new(ErrorKind::of_error_type(error_type), message.clone()),
            HostError::Io { .. } => return ApiError::internal("the host could not read or write the VM's files", &e),
            // The operator of the endpoint must act; the message names the package.
            HostError::Qemu(QemuError::NotInstalled { .. } | QemuError::BadBinary { .. }) => {
                tracing::error!(error = %e, "API: cannot power on");
                return ApiError::new(
                    ErrorKind::Error,
                    "the cloud host cannot run VMs: QEMU (qemu-system-x86_64) is not installed on the endpoint; \
                     see the endpoint's log",
                );
            }
            // File paths and QEMU's output stay in the log.
            _ => return ApiError::internal("the host could not change the VM's power state", &e),
        };
        ApiError::new(kind, e.to_string())
    }
}

/// The REST body of an error: `{"error_type","messages":[{"id","default_message","args"}]}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error_type: &'static str,
    pub messages: [LocalizableMessage<'a>; 1],
}

#[derive(Debug, Serialize)]
pub struct LocalizableMessage<'a> {
    pub id: &'static str,
    pub default_message: &'a str,
    pub args: [&'a str; 0],
}

impl ApiError {
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error_type: self.kind.error_type(),
            messages: [LocalizableMessage {
                id: self.kind.message_id(),
                default_message: &self.message,
                args: [],
            }],
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.kind.status(), axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: "0" would invite an immediate retry.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.max(1).into());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_vsphere_shape() {
        let e = ApiError::not_found("VM vm-99 is not in the inventory");
        let json = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "error_type": "NOT_FOUND",
                "messages": [{
                    "id": "com.vmware.vapi.std.errors.not_found",
                    "default_message": "VM vm-99 is not in the inventory",
                    "args": []
                }]
            })
        );
        assert_eq!(e.kind.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn a_peers_error_keeps_its_kind() {
        for kind in ALL_KINDS {
            assert_eq!(ErrorKind::of_error_type(kind.error_type()), kind);
        }
        let e = ApiError::from(HostError::Peer {
            host: "esx-a".into(),
            error_type: "ALREADY_IN_DESIRED_STATE".into(),
            message: "VM vm-14 is already POWERED_ON".into(),
        });
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::AlreadyInDesiredState, "VM vm-14 is already POWERED_ON")
        );
        assert_eq!(ErrorKind::of_error_type("SOMETHING_NEW"), ErrorKind::Error);
    }

    #[test]
    fn database_errors_do_not_leak_paths() {
        let e = ApiError::from(InventoryError::Db {
            path: "/secret/inventory.sqlite3".into(),
            source: rusqlite::Error::InvalidQuery.into(),
        });
        assert_eq!(e.kind, ErrorKind::Error);
        assert!(!e.message.contains("secret"), "{}", e.message);
        let e = ApiError::from(InventoryError::BadCredentials);
        assert_eq!(e.kind.status(), StatusCode::UNAUTHORIZED);
    }
}
